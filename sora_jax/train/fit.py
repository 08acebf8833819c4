"""Will a step fit? Compile it on abstract inputs and compare the compiler's memory figures
with the device's, before anything is allocated.

A run too large for its devices would otherwise fail minutes in, as an out-of-memory
traceback after the state was initialised and the data workers started. sora-train and
sora-eval compile their steps first (the compiled steps are the ones they then run, so
nothing compiles twice) and fail at once with the figures and the keys to change.
sora-compile reads the same figures for TPU slices that are not attached (aot/).
"""

import dataclasses
import re
import time
from collections.abc import Sequence

import jax
import ml_collections

from sora_jax.aot import loop_flops
from sora_jax.config import ConfigError

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# An HLO instruction's opcode follows its result shape: `%x = f32[8]{0} all-reduce(...)`;
# asynchronous collectives appear as a -start/-done pair, counted once by their -start.
_COLLECTIVE = re.compile(r" (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compiled step, per device."""

    compile_s: float
    argument_bytes: int
    output_bytes: int
    alias_bytes: int  # donated inputs whose buffers the outputs reuse
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    collectives: dict[str, int]
    custom_calls: list[str]

    @property
    def total_bytes(self) -> int:
        """Peak device memory of the step: its live arguments and results (a donated
        input's buffer counted once), its temporaries and its code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


# For programs that run a few dozen times. Most of a small step's XLA:CPU compile is making
# machine code for its ~500 kernels: LLVM's optimisations off, and XLA's older kernel
# emitter (straight to LLVM IR) instead of its MLIR fusion emitters. Measured on a 2-core
# AMD EPYC, compile and then time per step:
#                          XLA's defaults     optimisations off   + older emitter
#   demo, runlocal         13.0 s, 18 ms      9.0 s, 32 ms        4.6 s, 28 ms
#   pretrain_av, runlocal  17.2 s, 21 ms      14.1 s, 40 ms       9.2 s, 33 ms
#   demo                   18.0 s, 99 ms      13.5 s, 261 ms      6.2 s, 201 ms
CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def compiler_options(devices: Sequence[jax.Device], fast: bool) -> dict[str, int | bool]:
    """The XLA options of a program for `devices`: CPU_FAST_COMPILE when `fast` and they
    are CPUs (the steps with config.cpu_fast_compile; the initialiser, which runs once,
    always), else XLA's defaults (always on accelerators)."""
    on_cpu = all(d.platform == "cpu" for d in devices)
    return dict(CPU_FAST_COMPILE) if fast and on_cpu else {}


def compile_step(
    jitted, *abstract_args, options: dict | None = None
) -> tuple[jax.stages.Compiled, StepReport]:
    """`jitted` compiled for `abstract_args` (ShapeDtypeStructs with shardings) with XLA
    `options` (compiler_options()), and what the compiler says about the program."""
    start = time.perf_counter()
    compiled = jitted.lower(*abstract_args).compile(compiler_options=options)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # a list of one in older JAX
    text = compiled.as_text()
    collectives = {name: 0 for name in COLLECTIVES}
    for name in _COLLECTIVE.findall(text):
        collectives[name] += 1
    report = StepReport(
        compile_s=seconds,
        argument_bytes=memory.argument_size_in_bytes,
        output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes,
        temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes,
        # XLA's count charges a loop's body once; add the trips it leaves out (the
        # micro-batches of accum_steps, an LSTM scan).
        flops=float(cost.get("flops", 0.0)) + loop_flops.repeated_flops(text),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        collectives={k: v for k, v in collectives.items() if v},
        custom_calls=sorted(set(_CUSTOM_CALL.findall(text))),
    )
    return compiled, report


def _host_available_bytes() -> int:
    """MemAvailable: what the kernel says can be allocated without swapping."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo")


def device_memory_bytes(devices: Sequence[jax.Device]) -> tuple[int | None, str]:
    """Memory one device of the run may use, and where the figure comes from: an
    accelerator's own limit; for CPU devices, the host's available memory shared by this
    process's devices. None when the platform does not say."""
    device = devices[0]
    if device.platform == "cpu":
        local = sum(d.process_index == jax.process_index() for d in devices)
        try:
            return _host_available_bytes() // max(local, 1), f"host memory available / {local}"
        except OSError:
            return None, "unknown"
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    return (int(limit) if limit else None), f"{device.device_kind} memory"


def check_fits(
    what: str,
    report: StepReport,
    devices: Sequence[jax.Device],
    config: ml_collections.ConfigDict,
    lower: Sequence[str],
    higher: Sequence[str],
) -> None:
    """ConfigError naming the keys that shrink the step unless it fits one device: those
    to `lower` (the first is the error's key) and those to raise (`higher`)."""
    limit, source = device_memory_bytes(devices)
    if limit is None or report.total_bytes <= limit:
        return

    def settings(keys: Sequence[str]) -> str:
        values = []
        for key in keys:
            value = config
            for part in key.split("."):
                value = value[part]
            values.append(f"{key}={value}")
        return ", ".join(values)

    raise ConfigError(
        f"config.{lower[0]}: the {what} needs {report.total_bytes / GiB:.2f} GiB per device "
        f"({report.argument_bytes / GiB:.2f} GiB of inputs, {report.temp_bytes / GiB:.2f} GiB "
        f"of temporaries) but a device has {limit / GiB:.2f} GiB ({source}). Lower "
        f"{settings(lower)}, or raise {settings(higher)}; model.visual.remat=True and "
        f"model.dtype=bfloat16 shrink the activations"
    )


# What shrinks each step's memory per device: keys to lower, keys to raise.
TRAIN_KEYS = (("batch_size", "data.num_frames", "data.crop_size"), ("accum_steps", "mesh.fsdp"))
EVAL_KEYS = (
    ("data.eval_batch_size", "data.eval_temporal_views", "data.eval_spatial_views"),
    ("mesh.fsdp",),
)
