"""The demo: a small audio-visual model that learns the built-in demo dataset on a CPU.

`make demo` runs it: sora-train --config configs/demo.py --workdir runs/demo
Every key is documented in configs/base.py; this file lists what the demo changes.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(
        dir="data/prepared",
        name="sora_demo",
        fps=8.0,
        num_frames=4,
        crop_size=32,
        min_crop_scale=0.6,
        eval_temporal_views=2,
        eval_spatial_views=1,
        # Two grain worker processes keep the demo's data wait near 1% on a 2-core CPU;
        # in-process reader threads compete with the step for the interpreter and the cores.
        workers=2,
        eval_batch_size=32,
    )
    c.model.update(num_classes=4, embed_dim=64, dtype="float32", modality_dropout=0.3)
    c.model.visual.update(
        widths=(16, 32, 64), blocks=(1, 1, 1), strides=(2, 2, 2), temporal_pool="mean", remat=False
    )
    c.model.audio.update(
        hidden=64, layers=1, bidirectional=False, num_mel_bins=32, spec_augment=(1, 8, 1, 4)
    )
    c.model.fusion.update(kind="gated", dim=64, heads=4)
    c.optimizer.update(learning_rate=3e-3, warmup_steps=30, weight_decay=1e-4, ema_decay=0.0)
    c.batch_size, c.total_steps = 32, 300
    c.mesh.fsdp = 1
    c.log_every, c.eval_every = 25, 0
    c.checkpoint.update(every_steps=100, keep=2)
    return base.apply_preset(c, arg)
