"""Run by test_pretrain.py as 1 process x 4 devices and as 2 processes x 2 devices: the
contrastive loss of one fixed global batch, sharded over whatever devices there are,
printed as JSON. Each process supplies only its own rows of the batch."""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import pretrain_av
from sora_jax.objectives import contrastive as objective
from sora_jax.train import setup, sharding


def global_batch(size: int = 32, dim: int = 16) -> dict[str, np.ndarray]:
    """The same on every process: unit vectors, pictures and sounds loosely paired, and
    some clips without a sound or a picture."""
    rng = np.random.default_rng(0)
    video = rng.normal(size=(size, dim))
    audio = video + rng.normal(size=(size, dim))
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    has_audio, has_video = np.ones(size, bool), np.ones(size, bool)
    has_audio[[3, 17]] = False
    has_video[[10]] = False
    return {
        "video": unit(video),
        "audio": unit(audio),
        "has_video": has_video,
        "has_audio": has_audio,
    }


def main() -> None:
    config = pretrain_av.get_config("runlocal")
    flags = dict(arg.split("=", 1) for arg in sys.argv[1:])
    if "--config.distributed.coordinator" in flags:
        config.distributed.update(
            coordinator=flags["--config.distributed.coordinator"],
            num_processes=int(flags["--config.distributed.num_processes"]),
            process_id=int(flags["--config.distributed.process_id"]),
        )
    setup.maybe_initialize_distributed(config)
    mesh = sharding.make_mesh(1, jax.devices())
    rows = NamedSharding(mesh, P(sharding.BATCH_AXES))
    batch = global_batch()
    per_process = len(batch["video"]) // jax.process_count()
    mine = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    local = {k: v[mine] for k, v in batch.items()}
    arrays = {k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()}

    @jax.jit
    def loss(arrays):
        valid = arrays["has_video"] & arrays["has_audio"]
        return objective.contrastive_loss(
            arrays["video"], arrays["audio"], valid, np.float32(10.0), mesh
        )

    value, matched = jax.device_get(loss(arrays))
    report = {
        "process": jax.process_index(),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "loss": float(value),
        "match": float(matched),
    }
    print("PROBE " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
