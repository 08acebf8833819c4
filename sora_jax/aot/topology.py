"""TPU slices that are not attached: their devices, for compiling, and their chips' figures.

With `libtpu` installed (`pip install -e '.[tpu]'`), `jax.experimental.topologies` describes
any slice libtpu knows (`v5e:4x4` is 16 v5e chips; `v4:2x2x4` 16 v4 chips) as compile-only
devices on a machine without a TPU: `jax.jit(...).lower(...).compile()` on a mesh of them
gives the executable XLA would run on that slice, with its memory and cost analysis.

The chips' figures are Google's published ones (Cloud TPU documentation, the system
architecture page of each version: tpu/docs/v4, v5e, v5p, v6e): peak bfloat16 matmul
throughput, HBM capacity and bandwidth, per chip. They bound a step's time from below;
they do not predict it. The clock turns XLA:TPU's own estimate of each kernel's cycles
into the time it expects (`Chip.clock_hz`).
"""

import dataclasses
import importlib.metadata
import math

import jax

from sora_jax import process


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int  # per chip
    peak_flops: float  # bfloat16 FLOP/s per chip
    hbm_bytes_per_s: float
    # Two TensorCores that JAX drives as one device ("megacore"), as it does on a real
    # v4 or v5p: libtpu's compile-only v4 topology otherwise has a device per core, each
    # with half the chip, and every per-chip figure here would be a core's.
    megacore: bool = False
    # The clock XLA:TPU's `estimated_cycles` count in (aot/traffic.py), and where it comes
    # from. Google publishes no clock for v5e, v5p or v6e; a peak is MXUs x MACs per MXU x
    # 2 FLOP x clock, so a documented MXU count gives it. tests/test_aot.py checks each
    # against the compiler: its estimate of a large bfloat16 matmul must come within a
    # few percent of the published peak at this clock, and never beat it.
    clock_hz: float = 0.0
    clock_source: str = ""
    # Bidirectional inter-chip interconnect (ICI) bandwidth per chip, over all its links,
    # as each version's page has it; 0 where the page gives none (v4).
    ici_bytes_per_s: float = 0.0

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity above which a step is bound by compute, not memory."""
        return self.peak_flops / self.hbm_bytes_per_s


GiB = 1 << 30
_MXU_128 = 128 * 128 * 2  # FLOP per cycle of one 128x128 matrix unit
CHIPS = {
    "v4": Chip(
        "v4",
        32 * GiB,
        275e12,
        1200e9,
        megacore=True,
        clock_hz=275e12 / (2 * 4 * _MXU_128),
        clock_source="peak / (2 TensorCores x 4 MXUs of 128x128): 1.05 GHz, the clock of "
        "the TPU v4 paper (Jouppi et al., ISCA 2023)",
    ),
    "v5e": Chip(
        "v5e",
        16 * GiB,
        197e12,
        819e9,
        clock_hz=197e12 / (4 * _MXU_128),
        clock_source="peak / (1 TensorCore x 4 MXUs of 128x128), as the v5e page has it",
        ici_bytes_per_s=400e9,
    ),
    "v5p": Chip(
        "v5p",
        95 * GiB,
        459e12,
        2765e9,
        megacore=True,
        clock_hz=459e12 / (2 * 4 * _MXU_128),
        clock_source="peak / (2 TensorCores x 4 MXUs of 128x128), as the v5p page has it",
        ici_bytes_per_s=1200e9,
    ),
    # The v6e page's two 256x256 MXUs would need 3.5 GHz for 918 TFLOP/s, and at 3.5 GHz
    # XLA:TPU's own estimate of a matmul would beat the published peak: that reading is
    # wrong somewhere. This is the compiler's: the clock at which its estimate of a
    # [32768, 32768] x [32768, 32768] bfloat16 matmul runs at the peak (libtpu 0.0.42.1:
    # 2.138 GHz, rounded down so that it never beats the peak).
    # On the other chips that reading comes out 4.6-5.5% above the MXU-derived clock,
    # so v6e's expected times may be as much too short.
    "v6e": Chip(
        "v6e",
        32 * GiB,
        918e12,
        1638e9,
        clock_hz=2.13e9,
        clock_source="calibrated: XLA:TPU's cycle estimate of a 32768^3 bfloat16 matmul "
        "at the published peak (the v6e page's MXUs do not add up to it)",
        ici_bytes_per_s=800e9,
    ),
}


def parse(topology: str) -> tuple[Chip, str]:
    """'v5e:4x4' -> (the v5e chip, '4x4'), or ValueError naming what is known."""
    version, _, shape = topology.partition(":")
    if version not in CHIPS or not shape:
        raise ValueError(
            f"topology {topology!r}: expected VERSION:SHAPE with VERSION one of "
            f"{sorted(CHIPS)}, e.g. v5e:4x4 or v4:2x2x4"
        )
    return CHIPS[version], shape


def tpu_devices(topology: str, slices: int = 1) -> list[jax.Device]:
    """The compile-only devices of `slices` slices of `topology`, e.g. ('v5e:16x16', 2)
    for 512 chips in two slices joined by the data-centre network."""
    chip, shape = parse(topology)  # ValueError for a topology libtpu would not know
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            "compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'"
        ) from e
    from jax.experimental import topologies

    process.quiet_libtpu()  # no TPU here: libtpu must not look for one
    kwargs = {"num_slices": slices} if slices > 1 else {}
    if chip.megacore:
        kwargs["chip_config_name"] = "megacore"
    try:
        description = topologies.get_topology_desc(topology, "tpu", **kwargs)
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"topology {topology!r} x {slices} slices: {e}") from e
    devices = list(description.devices)
    chips = slices * math.prod(int(side) for side in shape.split("x"))
    if len(devices) != chips:  # the figures are per chip: one device must be one chip
        raise ValueError(
            f"topology {topology!r}: libtpu gave {len(devices)} devices for {chips} chips"
        )
    return devices


def known_crash(chip: Chip, chips: int) -> str | None:
    """Why this compile may die in libtpu, when the installed libtpu was seen to: a
    segmentation fault ends the process, so it can only be said beforehand."""
    try:
        version = importlib.metadata.version("libtpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    if chip.name == "v6e" and chips > 4 and version.startswith("0.0.42."):
        return (
            f"libtpu {version} (the one jax 0.10.2 pins) crashed with a segmentation fault "
            f"compiling this project's train steps for v6e slices of more than 4 chips; "
            f"v6e:2x2 compiles, and so did libtpu 0.0.52 (BENCHMARKS.md section 7)"
        )
    return None
