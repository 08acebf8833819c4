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
    # Compiled for v5e:4x4 (128 clips per chip) and v5p:2x2x2 (256), keeping the tower's
    # activations takes 8.0 of 16 and 15.7 of 95 GiB per chip, and the compiler expects a
    # step 22% and 17% shorter than recomputing them (BENCHMARKS.md section 7). With more
    # clips per chip, `sora-train`'s fit check says when to turn remat back on.
    c.model.visual.remat = False
    # No bias on the convs a norm follows (the norm's shift stands in for it). Compiled for
    # v5e:4x4 the step then moves 8% fewer HBM bytes and is expected 9% shorter; with the
    # `wide` preset it is compute-bound (BENCHMARKS.md section 7). Runs of this config
    # from before 2026-12-03 had those biases.
    c.model.visual.conv_bias_before_norm = False
    c.checkpoint.best_metric = "map"
    return base.apply_preset(c, arg)
