"""Expected cycles for this project's Pallas kernels, which XLA:TPU's cost model leaves out.

A Pallas kernel reaches XLA as an opaque custom call (`tpu_custom_call`, compiled by
Mosaic), and XLA writes no `estimated_cycles` for it: summed as traffic.py sums kernels,
it would be free. libtpu can count one: its static LLO profile
(`--xla_jf_dump_static_llo_profile_to`) schedules the compiled kernel's bundles, loops
and all, and writes the count into the kernel's `bundle_analysis_data`. For XLA's own
large matmuls it agrees with the cost model within 1% (a [4096]^3 bfloat16 matmul on v5e:
1.077M cycles against 1.082M); for small kernels it is lower, leaving out the ~2,400
cycles the cost model adds to each (BENCHMARKS.md section 7). But that profile aborts
the whole compile on some of XLA's own kernels (a gather fusion: "Unsupported DMA
direction"), so it cannot be switched on for a train step. Each Pallas kernel is
compiled alone instead, in a subprocess with the profile on, at its operands' shapes.

The profile undercounts waiting on HBM (it put the LSTM kernels below their own traffic
at the chip's bandwidth), so a kernel's expected cycles are the larger of its profile and
its HBM bytes at the chip's bandwidth: a kernel is never faster than the data it moves.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Sequence

from sora_jax.aot import topology, traffic

# device_kind -> a slice of that chip libtpu compiles for. The profile's DMA model knows
# v5e, v5p and v6e; for v4 it aborts ("only supported on VF/VL/GF/GL").
_ONE_CHIP_SLICE = {"TPU v5 lite": "v5e:2x2", "TPU v5": "v5p:2x2x1", "TPU v6 lite": "v6e:2x2"}
_UNPROFILED = {"TPU v4": "v4"}
# The pallas_call's name, under the transformations that wrap it: ".../jvp(NAME)/pallas_call"
_PALLAS_NAME = re.compile(r'op_name="[^"]*?(\w+)\)*/pallas_call"')
_OPERANDS = re.compile(r"operand_layout_constraints=\{((?:[^{}]|\{[^{}]*\})*)\}")
_PROFILE_FLAG = "--xla_jf_dump_static_llo_profile_to"
_DTYPES = {"bf16": "bfloat16", "f32": "float32", "s32": "int32"}  # HLO's names -> NumPy's


def _kernels():
    # The kernels this project writes, by their pallas_call name -> (operands -> result).
    # Imported here: the subprocess needs them, the parent only their names.
    from sora_jax.kernels import pallas_lstm

    return {
        "lstm_forward": lambda gx, w: pallas_lstm.lstm_forward(gx, w),
        # Its operands are (dhs, activations, cs, cs, w.T): cs is read twice, for c and for
        # the block before's last c.
        "lstm_backward": lambda dhs, acts, cs, _, w_t: pallas_lstm.lstm_backward(
            dhs, acts, cs, w_t.T
        ),
    }


def _pallas_kernel(launch: traffic.Launch) -> tuple[str, list] | None:
    """(its name, [[dtype, dims], ...] of its operands) for a Pallas kernel, else None."""
    k = launch.kernel
    if k.opcode != "custom-call" or "tpu_custom_call" not in k.rest:
        return None
    name, operands = _PALLAS_NAME.search(k.rest), _OPERANDS.search(k.rest)
    if not name or not operands:  # a figure without it would be silently short
        raise ValueError(f"a Pallas kernel whose name or operands are not known: {k.name}")
    shapes = [[dtype, dims] for dtype, dims in traffic.arrays(operands.group(1))]
    return name.group(1), shapes


def with_pallas_cycles(
    launched: Sequence[traffic.Launch], device_kind: str
) -> list[traffic.Launch]:
    """`launched` with each of this project's Pallas kernels given its expected cycles
    (the module docstring says how). ValueError for a Pallas kernel this module cannot
    rebuild: left at zero cycles, a figure would silently leave it out."""
    found = {}
    for i, launch in enumerate(launched):
        kernel = _pallas_kernel(launch)
        if launch.cycles == 0 and kernel is not None:
            found[i] = kernel
    if not found:
        return list(launched)
    known = set(_kernels())
    unknown = {name for name, _ in found.values()} - known
    if unknown:
        raise ValueError(f"Pallas kernels {sorted(unknown)} have no standalone compile here")
    distinct = sorted({json.dumps(k) for k in found.values()})
    if device_kind in _ONE_CHIP_SLICE:
        slice_name = _ONE_CHIP_SLICE[device_kind]
        cycles = _profile(slice_name, [json.loads(k) for k in distinct])
    elif device_kind in _UNPROFILED:
        slice_name = f"{_UNPROFILED[device_kind]}:2x2x1"
        cycles = [0] * len(distinct)
        warnings.warn(
            f"libtpu cannot profile Pallas kernels for {device_kind}: each counts as its "
            "HBM traffic at the chip's bandwidth, so the expected step is short by their "
            "compute",
            stacklevel=2,
        )
    else:
        raise ValueError(f"no compile-only slice known for {device_kind!r}")
    chip, _ = topology.parse(slice_name)
    profiled = dict(zip(distinct, cycles, strict=True))
    out = list(launched)
    for i, kernel in found.items():
        launch = out[i]
        hbm_cycles = launch.hbm_bytes / chip.hbm_bytes_per_s * chip.clock_hz
        cycles = max(profiled[json.dumps(kernel)], round(hbm_cycles))
        out[i] = launch._replace(cycles=cycles)
    return out


def _profile(slice_name: str, kernels: list) -> list[int]:
    """Each (name, operands) kernel's static LLO profile cycles, compiled alone in a
    subprocess (the profile is switched on when libtpu starts)."""
    with tempfile.TemporaryDirectory() as dump:
        env = dict(os.environ)
        env["LIBTPU_INIT_ARGS"] = f"{env.get('LIBTPU_INIT_ARGS', '')} {_PROFILE_FLAG}={dump}"
        done = subprocess.run(
            [sys.executable, "-m", "sora_jax.aot.mosaic", slice_name],
            input=json.dumps(kernels),
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode:
        raise RuntimeError(f"profiling Pallas kernels failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> None:  # in the subprocess: kernels as JSON on stdin -> cycles on stdout
    import jax

    from sora_jax import process
    from sora_jax.kernels import platform

    process.quiet_libtpu()
    device = topology.tpu_devices(sys.argv[1])[0]
    one_chip = jax.sharding.SingleDeviceSharding(device)
    kernels = _kernels()
    cycles = []
    for name, operands in json.loads(sys.stdin.read()):
        args = [
            jax.ShapeDtypeStruct(dims, _DTYPES.get(dtype, dtype), sharding=one_chip)
            for dtype, dims in operands
        ]
        with platform.targeting("tpu"):
            compiled = jax.jit(kernels[name]).lower(*args).compile()
        launched = traffic.launches(compiled.as_text())
        cycles.append(sum(k.cycles * k.times for k in launched if _pallas_kernel(k)))
    print(json.dumps(cycles))


if __name__ == "__main__":
    _main()
