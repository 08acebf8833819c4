"""A Kinetics-Sounds-sized run (32 classes, ~20k clips): a realistic single-pod example.

Prepare: sora-prep kinetics_sounds.csv --layout kinetics --out gs://BUCKET/data
  --name kinetics_sounds --fps 12.5 --short-side 128 --workers 64
"""

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    c = demo.get_config()
    c.data.update(
        dir="gs://BUCKET/data",
        name="kinetics_sounds",
        fps=12.5,
        num_frames=16,
        frame_stride=2,
        crop_size=112,
        min_crop_scale=0.3,
        eval_temporal_views=4,
        eval_spatial_views=3,
        workers=16,
        eval_batch_size=64,
    )
    c.model.update(num_classes=32, embed_dim=512, dtype="bfloat16", modality_dropout=0.2)
    c.model.visual.update(
        widths=(64, 128, 256, 512),
        blocks=(2, 2, 2, 2),
        strides=(2, 2, 2, 2),
        norm="group",
        residual=True,
        temporal_pool="attention",
        remat=True,
    )
    c.model.audio.update(
        cell="lstm",
        hidden=512,
        layers=2,
        bidirectional=True,
        num_mel_bins=64,
        spec_augment=(2, 40, 2, 12),
    )
    c.model.fusion.update(kind="attention", dim=512, heads=8)
    c.optimizer.update(
        name="adamw",
        learning_rate=1e-3,
        warmup_steps=2_000,
        weight_decay=0.05,
        grad_clip=1.0,
        ema_decay=0.9999,
    )
    c.batch_size = 512
    c.total_steps = 60_000
    c.mesh.fsdp = 4
    c.log_every = 100
    c.eval_every = 5_000
    c.checkpoint.update(every_steps=1_000, keep=3, best_metric="top1")
    return c
