"""Contrastive pretraining as the global batch grows: the similarity matrix is
[B, B], so its cost grows with the square of the batch while the towers' grows linearly.

For each global batch B, over the CPU devices (--devices, forced): compile and step time
of (1) the contrastive loss and its gradient alone, on [B, 128] unit vectors sharded over
the devices, and (2) the whole pretraining train step of --config (default: the
`small` preset of configs/pretrain_av.py).

  python bench/pretrain.py [--batches 64 256 1024] [--devices 8]
"""

import os
import sys

if __name__ == "__main__":  # the device count must be set before jax is imported
    _devices = sys.argv[sys.argv.index("--devices") + 1] if "--devices" in sys.argv else "8"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={_devices}"

import time

import common
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from train_step import random_batch

from sora_jax.data.pipeline import to_global
from sora_jax.objectives import contrastive as objective
from sora_jax.train import setup, sharding
from sora_jax.train.state import init_state
from sora_jax.train.step import make_train_step


def _timed(compiled, args, repeats: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    return common.median_time(lambda: jax.block_until_ready(compiled(*args)), repeats)


def similarity_cost(batch: int, dim: int, repeats: int) -> dict:
    mesh = sharding.make_mesh(1)
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    video, audio = (
        jax.device_put(unit(rng.normal(size=(batch, dim))).astype(np.float32), rows)
        for _ in range(2)
    )
    valid = jax.device_put(np.ones(batch, bool), rows)

    def loss(v, a):
        return objective.contrastive_loss(v, a, valid, jnp.float32(10.0), mesh)[0]

    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(video, audio).compile()
    compile_s = time.perf_counter() - start
    return {"compile_s": compile_s, "step_ms": 1e3 * _timed(compiled, (video, audio), repeats)}


def train_step_cost(config, batch: int, repeats: int) -> dict:
    config.batch_size = batch
    run = setup.build(config)
    state = jax.jit(
        lambda r: init_state(run.model, run.tx, run.inputs, config, r),
        out_shardings=run.state_sharding,
    )(run.rng)
    data = to_global(random_batch(config, batch), run.batch_sharding)
    step = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    start = time.perf_counter()
    compiled = step.lower(run.abstract_state, data).compile()
    compile_s = time.perf_counter() - start
    state = jax.block_until_ready(compiled(state, data))[0]  # warm-up
    times = []
    for _ in range(repeats):  # each step takes the state the last one returned
        begin = time.perf_counter()
        state = jax.block_until_ready(compiled(state, data))[0]
        times.append(time.perf_counter() - begin)
    step_s = sorted(times)[len(times) // 2]
    return {"compile_s": compile_s, "step_ms": 1e3 * step_s, "clips_per_s": batch / step_s}


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.set_defaults(config="configs/pretrain_av.py:small")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--devices", type=int, default=8, help="forced CPU devices")
    p.add_argument("--dim", type=int, default=128, help="projection width for (1)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    similarity, train = {}, {}
    for batch in args.batches:
        similarity[str(batch)] = similarity_cost(batch, args.dim, args.repeats)
        config = common.load_config(args.config, args.set)
        train[str(batch)] = train_step_cost(config, batch, args.repeats)
    result = {
        "benchmark": "pretrain",
        "config": args.config,
        "projection_dim": args.dim,
        "similarity": similarity,
        "train_step": train,
        **common.machine(),
    }
    table = [
        (
            f"B={b}",
            f"loss+grad {similarity[b]['step_ms']:.2f} ms (compile "
            f"{similarity[b]['compile_s']:.2f} s); train step {train[b]['step_ms']:.0f} ms, "
            f"{train[b]['clips_per_s']:.0f} clips/s (compile {train[b]['compile_s']:.1f} s)",
        )
        for b in similarity
    ]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
