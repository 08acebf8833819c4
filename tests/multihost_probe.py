"""Run under launch/local.py by test_multihost.py: reports, as JSON, how this process
holds one sharded parameter and its optimizer moments."""

import json
import sys

import jax
import numpy as np

from configs import demo
from sora_jax.train import setup
from sora_jax.train.state import init_state


def main() -> None:
    config = demo.get_config()
    flags = dict(arg.split("=", 1) for arg in sys.argv[1:])
    config.distributed.update(
        coordinator=flags["--config.distributed.coordinator"],
        num_processes=int(flags["--config.distributed.num_processes"]),
        process_id=int(flags["--config.distributed.process_id"]),
    )
    setup.maybe_initialize_distributed(config)
    config.mesh.fsdp = jax.device_count()
    run = setup.build(config)
    init = lambda r: init_state(run.model, run.tx, run.inputs, config, r)
    state = jax.jit(init, out_shardings=run.state_sharding)(run.rng)
    kernel = state.params["visual"]["stage2_block0"]["conv_b"]["kernel"]
    mu = state.opt_state[1][0].mu["visual"]["stage2_block0"]["conv_b"]["kernel"]
    report = {
        "process": jax.process_index(),
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "global_shape": list(kernel.shape),
        "spec": [str(s) for s in kernel.sharding.spec],
        "local_shard_shapes": [list(s.data.shape) for s in kernel.addressable_shards],
        "local_bytes": int(sum(s.data.nbytes for s in kernel.addressable_shards)),
        "global_bytes": int(np.prod(kernel.shape) * kernel.dtype.itemsize),
        "mu_spec": [str(s) for s in mu.sharding.spec],
        "mu_local_shard_shapes": [list(s.data.shape) for s in mu.addressable_shards],
    }
    print("PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
