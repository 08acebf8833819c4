"""sora-compile: compile a run for a TPU slice that is not attached, before paying for one.

  sora-compile --config configs/kinetics_sounds.py --topology v5e:4x4 [--slices 2]
      [--config.KEY=VALUE ...] [--nosearch]
  sora-compile --config configs/kinetics_sounds.py --topology cuda:8

Builds the mesh, model, optimizer state, train step and eval step exactly as sora-train
would on that slice, compiles them with libtpu (`pip install -e '.[tpu]'`; no TPU needed)
and prints a table, then one JSON object as the last line of stdout: per-chip bytes of
parameters, optimizer state, batch, temporaries and the total; whether the train and eval
steps fit the chip's HBM and by what margin; FLOPs and HBM traffic per chip per step, and
the lower bound on the step time they imply (topology.py says whose figures); where that
traffic goes, by part of the model and pass (traffic.py); the step time XLA:TPU's own cycle
estimates add up to at the chip's clock, and the MFU that leaves; the collectives of the
train program, the bytes each chip sends in them and the least time that takes on the
slice's interconnect (collectives.py); its custom calls; and the largest global batch that
fits, found by compiling in as few compiles as the bytes allow (analysis.search_largest;
--nosearch skips it).
--dump_hlo=FILE keeps the compiled train step's HLO text. Exit 0 when it compiled, fitting
or not; 2 for a config or topology that cannot compile.

`--topology cuda:N` (N GPUs) goes as far as JAX goes without a GPU: the steps lowered for
CUDA (aot/cuda.py). The JSON then has the shardings' bytes and the custom calls; the
figures only a compile gives (temporaries, fits, FLOPs, collectives) are null, and
`not_checked` says why.
"""

import json
import os
import sys
from typing import TYPE_CHECKING

from absl import app, flags
from ml_collections import config_flags

from sora_jax import process

if TYPE_CHECKING:  # the heavy imports wait until flags are parsed
    from sora_jax.aot.analysis import RunReport
    from sora_jax.aot.cuda import LoweredRun
    from sora_jax.aot.topology import Chip

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (optionally FILE:PRESET).", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "A TPU slice, VERSION:SHAPE (e.g. v5e:4x4), or cuda:N for N GPUs."
)
_SLICES = flags.DEFINE_integer("slices", 1, "Slices of that shape (multislice).")
_SEARCH = flags.DEFINE_boolean("search", True, "Search for the largest batch that fits.")
_MAX_COMPILES = flags.DEFINE_integer("max_compiles", 8, "Compiles the batch search may use.")
_SEARCH_MINUTES = flags.DEFINE_float(
    "search_minutes",
    30.0,
    "No compile of the batch search starts after this long (a production step takes "
    "minutes to compile); the result then says exact: false.",
)
_DUMP_HLO = flags.DEFINE_string(
    "dump_hlo", None, "Write the compiled train step's HLO text here, to read its kernels."
)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def report_dict(
    topology: str, slices: int, chip: "Chip", run: "RunReport", search: dict | None
) -> dict:
    """The command's JSON: the figures of one compiled run on one slice."""
    from sora_jax.aot import analysis, collectives

    train = run.train
    memory = chip.hbm_bytes
    compute_s = train.flops / chip.peak_flops
    memory_s = run.hbm_bytes / chip.hbm_bytes_per_s
    expected_s = sum(run.train_cycles.values()) / chip.clock_hz
    return {
        "topology": topology,
        "slices": slices,
        "devices": run.devices,
        "chip": chip.name,
        "batch_size": run.batch_size,
        "fits": analysis.fits(run, memory),
        "device_memory_bytes": memory,
        "margin_bytes": memory - max(train.total_bytes, run.eval.total_bytes),
        "bytes_per_device": {
            "params": run.params_bytes,
            "opt_state": run.opt_state_bytes,
            "batch": run.batch_bytes,
            "temp": train.temp_bytes,
            "total": train.total_bytes,
        },
        "eval_bytes_per_device": {"temp": run.eval.temp_bytes, "total": run.eval.total_bytes},
        "flops_per_step": train.flops,  # per chip
        # The HBM bytes the train step's kernels read and write per chip, at least
        # (aot/traffic.py), and by part of the model; then the compiler's `bytes accessed`,
        # which also charges operands held in on-chip memory.
        "hbm_bytes_per_step": run.hbm_bytes,
        "bytes_by_part": run.train_traffic,
        "bytes_accessed_per_step": train.bytes_accessed,
        # XLA:TPU's own estimate of each kernel's cycles, by part (aot/traffic.py; the
        # field is undocumented). Asynchronous copies, collectives and scalar operations
        # carry none: they count as free.
        "estimated_cycles_by_part": run.train_cycles,
        "flops_per_byte": train.flops / max(run.hbm_bytes, 1),
        "ridge_flops_per_byte": chip.ridge_flops_per_byte,
        "step_time_bound_s": max(compute_s, memory_s),
        "bound_by": "compute" if compute_s >= memory_s else "memory",
        # What the compiler expects: its kernels one after another at the chip's clock,
        # and the share of the chip's peak that leaves. The FLOPs are the program's, so
        # with model.visual.remat on they include the recompute (a hardware utilisation).
        "expected_step_time_s": expected_s,
        "expected_mfu": compute_s / expected_s if expected_s else None,
        "remat": run.remat,
        "chip_figures": {
            "peak_bf16_flops_per_s": chip.peak_flops,
            "hbm_bytes_per_s": chip.hbm_bytes_per_s,
            "clock_hz": chip.clock_hz,
            "clock_source": chip.clock_source,
            "ici_bidirectional_bytes_per_s": chip.ici_bytes_per_s or None,
        },
        "collectives": train.collectives,
        # What one chip sends to the others a step, by collective (aot/collectives.py),
        # and the least time that takes: all of it at the chip's ICI bandwidth one way
        # (null across slices, or for a chip whose ICI bandwidth is not published). Not
        # in the expected step time: XLA overlaps collectives with compute where it can.
        "collective_bytes_per_step": run.collective_bytes,
        "collective_time_bound_s": collectives.time_bound(run.collective_bytes, chip, slices),
        "custom_calls": sorted(set(train.custom_calls) | set(run.eval.custom_calls)),
        "compile_s": {"train": train.compile_s, "eval": run.eval.compile_s},
        "largest_fitting_batch": search,
    }


def print_table(r: dict) -> None:
    b = r["bytes_per_device"]
    rows = [
        ("slice", f"{r['slices']} x {r['topology']} ({r['devices']} chips)"),
        ("global batch", str(r["batch_size"])),
        ("params / chip", _size(b["params"])),
        ("optimizer state / chip", _size(b["opt_state"])),
        ("batch / chip", _size(b["batch"])),
        ("temporaries / chip", _size(b["temp"])),
        ("train step / chip", f"{_size(b['total'])} of {_size(r['device_memory_bytes'])}"),
        ("eval step / chip", _size(r["eval_bytes_per_device"]["total"])),
        ("fits", f"{r['fits']} (margin {_size(r['margin_bytes'])})"),
        ("FLOPs / chip / step", f"{r['flops_per_step']:.3e}"),
        ("HBM traffic / chip / step", _size(r["hbm_bytes_per_step"])),
        ("FLOP per byte", f"{r['flops_per_byte']:.0f} (ridge {r['ridge_flops_per_byte']:.0f})"),
        ("step time >=", f"{r['step_time_bound_s'] * 1e3:.3g} ms ({r['bound_by']}-bound)"),
        ("step time, the compiler's", _expected(r)),
        ("collectives", ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "none"),
        ("sent to other chips / step", _sent(r)),
        ("custom calls", ", ".join(r["custom_calls"]) or "none"),
        ("compile", f"train {r['compile_s']['train']:.1f} s, eval {r['compile_s']['eval']:.1f} s"),
    ]
    if r["largest_fitting_batch"]:
        s = r["largest_fitting_batch"]
        found = f"{s['batch_size']}" + ("" if s["exact"] else "+")
        rows.append(("largest batch that fits", f"{found} ({s['compiles']} more compiles)"))
    moved = sum(sum(p.values()) for p in r["bytes_by_part"].values()) or 1
    for part, p in r["bytes_by_part"].items():
        share = (p["forward"] + p["backward"]) / moved
        split = f"forward {_size(p['forward'])}, backward {_size(p['backward'])}"
        rows.append((f"traffic: {part}", f"{share:5.1%} ({split})"))
    cycles = sum(r["estimated_cycles_by_part"].values()) or 1
    for part, c in r["estimated_cycles_by_part"].items():
        rows.append((f"compiler's cycles: {part}", f"{c / cycles:5.1%}"))
    _print_rows(rows)


def _expected(r: dict) -> str:
    if not r["expected_mfu"]:
        return "no estimate in this program"
    ms, clock = r["expected_step_time_s"] * 1e3, r["chip_figures"]["clock_hz"] / 1e9
    return f"{ms:.3g} ms at {clock:.2f} GHz, MFU {r['expected_mfu']:.1%}"


def _sent(r: dict) -> str:
    sent = _size(sum(r["collective_bytes_per_step"].values()))
    if r["collective_time_bound_s"] is None:
        return f"{sent} (no ICI bound: several slices, or no published ICI bandwidth)"
    return f"{sent}, >= {r['collective_time_bound_s'] * 1e3:.3g} ms on the ICI"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def _gpu_count(name: str) -> int:
    """'cuda:8' -> 8, or ValueError."""
    count = name.partition(":")[2]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"topology {name!r}: expected cuda:N with N GPUs, e.g. cuda:8")
    return int(count)


def lowered_dict(name: str, run: "LoweredRun") -> dict:
    """The command's JSON for GPUs: what lowering shows, and null for what it cannot."""
    from sora_jax.aot import cuda

    return {
        "topology": name,
        "platform": "cuda",
        "devices": run.devices,
        "batch_size": run.batch_size,
        "compiled": False,
        "fits": None,
        "device_memory_bytes": None,
        "bytes_per_device": {
            "params": run.params_bytes,
            "opt_state": run.opt_state_bytes,
            "batch": run.batch_bytes,
            "temp": None,
            "total": None,
        },
        "flops_per_step": None,
        "step_time_bound_s": None,
        "collectives": None,
        "custom_calls": run.custom_calls,
        "stablehlo_bytes": run.stablehlo_bytes,
        "not_checked": cuda.NOT_CHECKED,
    }


def _lower_for_gpus(config) -> None:
    from sora_jax.aot import cuda
    from sora_jax.config import ConfigError

    try:
        count = _gpu_count(_TOPOLOGY.value)
        # One CPU device stands in for each GPU; set before JAX starts its CPU backend.
        flag = f"--xla_force_host_platform_device_count={count}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        import jax

        run = cuda.lower_run(config, jax.devices("cpu")[:count], "cuda")
    except (ConfigError, ValueError) as e:
        print(f"sora-compile: {e}", file=sys.stderr)
        sys.exit(2)
    result = lowered_dict(_TOPOLOGY.value, run)
    b = result["bytes_per_device"]
    _print_rows(
        [
            ("GPUs", f"{result['devices']} (lowered for CUDA, not compiled)"),
            ("global batch", str(result["batch_size"])),
            ("params / GPU", _size(b["params"])),
            ("optimizer state / GPU", _size(b["opt_state"])),
            ("batch / GPU", _size(b["batch"])),
            ("custom calls", ", ".join(result["custom_calls"]) or "none"),
            ("not checked", result["not_checked"]),
        ]
    )
    print(json.dumps(result))


def say(line: str) -> None:
    """Progress, one line per compile, on stderr (stdout's last line is the JSON)."""
    print(f"sora-compile: {line}", file=sys.stderr, flush=True)


def _compile(argv) -> None:
    del argv
    from sora_jax.aot import analysis, topology
    from sora_jax.config import ConfigError

    config = _CONFIG.value
    if _TOPOLOGY.value.startswith("cuda:"):
        _lower_for_gpus(config)
        return
    try:
        chip, _ = topology.parse(_TOPOLOGY.value)
        devices = topology.tpu_devices(_TOPOLOGY.value, _SLICES.value)
        if crash := topology.known_crash(chip, len(devices)):
            print(f"sora-compile: warning: {crash}", file=sys.stderr, flush=True)
        say(f"compiling the train and eval steps for {_TOPOLOGY.value} ({len(devices)} devices)")
        run = analysis.compile_run(config, devices, dump_hlo=_DUMP_HLO.value)
    except (ConfigError, ValueError, RuntimeError) as e:
        print(f"sora-compile: {e}", file=sys.stderr)
        sys.exit(2)
    search = None
    if _SEARCH.value:
        say(
            f"searching for the largest batch that fits, in {_MAX_COMPILES.value} compiles or "
            f"{_SEARCH_MINUTES.value:g} minutes at most (--nosearch skips it)"
        )
        search = analysis.largest_fitting_batch(
            config,
            devices,
            chip.hbm_bytes,
            run,
            _MAX_COMPILES.value,
            _SEARCH_MINUTES.value * 60,
            say,
        )
    result = report_dict(_TOPOLOGY.value, _SLICES.value, chip, run, search)
    print_table(result)
    print(json.dumps(result))


def main() -> None:
    """sora-compile."""
    # It compiles for the topology's devices and computes nothing: even on a TPU VM the
    # attached chips (maybe training) are left alone.
    os.environ["JAX_PLATFORMS"] = "cpu"
    process.configure()
    flags.mark_flags_as_required(["config", "topology"])
    app.run(_compile)
