"""An AudioSet-sized run (527 labels, multi-label, ~2M clips): a multi-pod example.

Prepare: sora-prep audioset.csv --out gs://BUCKET/data --name audioset --fps 10
  --short-side 128 (on Beam for the full set); rank by mean average precision.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(
        dir="gs://BUCKET/data",
        name="audioset",
        fps=10.0,
        num_frames=10,
        frame_stride=1,
        workers=32,
    )
    c.model.update(num_classes=527, multi_label=True, embed_dim=1024)
    c.model.fusion.update(kind="gated", dim=1024)
    c.batch_size, c.total_steps = 2048, 250_000
    c.mesh.fsdp = 8
    c.checkpoint.best_metric = "map"
    return base.apply_preset(c, arg)
