"""Train-step throughput of a config's model: clips/s, step time, FLOPs and MFU.

  python bench/train_step.py --config configs/bench_reference.py [--config.batch_size=32]

Runs the trainer's own jitted step (same shardings, donation and optimizer) on random
clips over every local device; FLOPs come from XLA's cost analysis of the compiled step,
and the peak is a float32 matmul measured in the same run. Last line: JSON.
"""

import copy
import sys
import time

import common
import jax
import numpy as np

from sora_jax.data.pipeline import to_global
from sora_jax.inputs import InputSpec
from sora_jax.kernels import onednn
from sora_jax.train import fit, setup
from sora_jax.train.state import init_state
from sora_jax.train.step import make_train_step


def random_batch(config, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = InputSpec.from_config(config).random(batch, rng)
    return out | {"label": rng.integers(0, config.model.num_classes, batch).astype(np.int32)}


def model_flops(config, state, batch) -> float:
    """FLOPs of the step from XLA's cost analysis, counted on XLA's own convolutions: the
    same mathematics, but XLA cannot see inside the oneDNN custom calls that run on CPU."""
    config = copy.deepcopy(config)
    config.model.visual.conv_backend = "xla"
    config.model.audio.lstm_backend = "xla"
    run = setup.build(config)
    step = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    return fit.compile_step(step, state, batch)[1].flops


def measure(config, steps: int = 20, warmup: int = 3, count_flops: bool = True) -> dict:
    """Time the trainer's step on random clips; FLOPs from XLA's cost analysis of the timed
    program, or, when it calls oneDNN kernels XLA cannot count, of a second compile of its
    XLA-only variant (skipped with count_flops=False)."""
    run = setup.build(config)
    init = lambda r: init_state(run.model, run.tx, run.inputs, config, r)
    state = jax.jit(init, out_shardings=run.state_sharding)(run.rng)
    batch = to_global(random_batch(config, config.batch_size), run.batch_sharding)
    step = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    compiled, report = fit.compile_step(step, state, batch)  # the executable timed below
    compile_s = report.compile_s
    if not count_flops:
        flops = float("nan")
    elif set(report.custom_calls) & set(onednn.CUSTOM_CALL_TARGETS):
        flops = model_flops(config, state, batch)
    else:  # XLA's own program: its count is whole
        flops = report.flops
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)  # a benchmark syncs every step; the trainer does not
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    return {
        "batch": config.batch_size,
        "dtype": config.model.dtype,
        "clips_per_s": config.batch_size / step_s,
        "step_ms": step_s * 1e3,
        "step_ms_p10_p90": [
            float(np.percentile(times, 10)) * 1e3,
            float(np.percentile(times, 90)) * 1e3,
        ],
        "flops_per_step": flops,
        "achieved_flops_per_s": flops / step_s,
        "compile_s": compile_s,
        "final_loss": float(metrics["loss"]),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)
    config = common.load_config(args.config, args.set)
    result = {
        "benchmark": "train_step",
        "config": args.config,
        "overrides": args.set,
        **measure(config, args.steps, args.warmup),
    }
    peak = common.matmul_peak_flops()
    result.update(
        peak_matmul_flops_per_s=peak, mfu=result["achieved_flops_per_s"] / peak, **common.machine()
    )
    common.emit(
        result,
        args.out,
        [
            ("clips/s", f"{result['clips_per_s']:.1f}"),
            ("step", f"{result['step_ms']:.1f} ms (median of {args.steps})"),
            ("FLOPs/step", f"{result['flops_per_step'] / 1e9:.2f} G"),
            ("achieved", f"{result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s"),
            ("matmul peak", f"{peak / 1e9:.1f} GFLOP/s"),
            ("MFU", f"{result['mfu']:.1%}"),
            ("compile", f"{result['compile_s']:.1f} s"),
            ("device", f"{result['device']} x{result['device_count']}"),
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
