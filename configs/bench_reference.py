"""The benchmark reference model (BENCHMARKS.md): fixed so numbers compare across runs.

8 frames of 112x112; visual stages of widths 32, 64, 128, 256, each a 3x3 conv with
stride 2 then a 3x3 conv with stride 1, ReLU after each, no normalisation, no residual;
global average over space then mean over frames; log-mel of 200 frames x 64 bins into a
one-layer LSTM of 256 units, mean over time; fusion by concat, Dense 512, ReLU, Dense 10;
batch 16; float32; AdamW 1e-3.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(
        name="bench",
        num_frames=8,
        frame_stride=1,
        crop_size=112,
        min_crop_scale=0.6,
        fps=8.0,
        audio_samples=400 + 199 * 160,  # exactly 200 log-mel frames
        eval_temporal_views=2,
        eval_spatial_views=1,
        workers=2,
        eval_batch_size=32,
    )
    c.model.update(num_classes=10, embed_dim=512, dtype="float32", modality_dropout=0.0)
    c.model.visual.update(
        widths=(32, 64, 128, 256),
        blocks=(1, 1, 1, 1),
        strides=(2, 2, 2, 2),
        norm="none",
        residual=False,
        temporal_pool="mean",
        remat=False,
    )
    c.model.audio.update(
        cell="lstm",
        hidden=256,
        layers=1,
        bidirectional=False,
        num_mel_bins=64,
        spec_augment=(0, 0, 0, 0),
        unroll=4,
    )
    c.model.fusion.update(kind="concat", dim=64, heads=4)
    c.optimizer.update(
        name="adamw",
        learning_rate=1e-3,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        grad_clip=0.0,
        ema_decay=0.0,
    )
    c.batch_size, c.total_steps = 16, 300
    c.mesh.fsdp = 1
    c.log_every, c.eval_every = 25, 0
    c.checkpoint.update(every_steps=100, keep=2)
    return base.apply_preset(c, arg)
