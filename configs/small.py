"""Your first run on your own small labelled set: a few hundred clips, ten-odd classes,
trained on a CPU in minutes. Start here, not from demo.py (which is tuned to its four
toy classes at 32 px).

    sora-prep YOUR_CLIPS --out data/prepared --name mine
    sora-train --config configs/small.py --workdir runs/mine \
      --config.data.name=mine --config.model.num_classes=N

Against demo.py it sees more of each frame (48 px crops of the prepared 128 px, where
demo.py's 32 px lose small shapes), hides one sense in half the training clips so each
sense learns to name the class alone (a clip with a silent or off-screen sound is still
classified), averages the two senses' features (mean fusion), and trains longer with an
evaluation every 200 steps. `tests/test_pretrain.py` holds it to learning
`sora-prep demo OUT --set paired` (ten classes, each with a look and a sound of its own).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    shrink_to_small_data(c)
    c.data.name = "mine"
    c.model.num_classes = 10
    return base.apply_preset(c, arg)


def small_preset(c: ml_collections.ConfigDict, arg: str | None, total_steps: int) -> str | None:
    """The `small` preset of the pretraining and transfer configs: with arg "small", `c`
    shrunk to this file's sizes, `total_steps` long, evaluated and checkpointed three times.
    Returns the preset left for base.apply_preset."""
    if arg != "small":
        return arg
    shrink_to_small_data(c)
    # Three evaluations, each with its checkpoint: `--checkpoint best` chooses among them.
    c.total_steps = total_steps
    c.eval_every = c.checkpoint.every_steps = total_steps // 3
    return None


def shrink_to_small_data(c: ml_collections.ConfigDict) -> None:
    """A few hundred clips at 128 px on a CPU: the data, model and schedule sizes of this
    config. The pretraining and transfer configs' `small` presets use the same ones, so
    a small pretrained run carries over to a small downstream run."""
    c.data.update(
        fps=8.0,  # sora-prep's default
        num_frames=4,
        frame_stride=4,  # 4 frames over 2 s, and the 2 s of sound they span
        crop_size=48,
        min_crop_scale=0.5,
        eval_temporal_views=2,
        eval_spatial_views=1,
        workers=2,
        eval_batch_size=32,
    )
    c.model.update(embed_dim=64, dtype="float32", modality_dropout=0.5)
    c.model.visual.update(
        widths=(16, 32, 64), blocks=(1, 1, 1), strides=(2, 2, 2), temporal_pool="mean", remat=False
    )
    c.model.audio.update(
        hidden=64, layers=1, bidirectional=False, num_mel_bins=32, spec_augment=(1, 8, 1, 4)
    )
    c.model.fusion.update(kind="mean", dim=64, heads=4)
    c.model.projection.dim = 64
    c.optimizer.update(learning_rate=3e-3, warmup_steps=40, weight_decay=1e-4, ema_decay=0.0)
    c.batch_size, c.total_steps = 32, 400
    c.mesh.fsdp = 1
    c.log_every, c.eval_every = 50, 200
    c.checkpoint.update(every_steps=200, keep=2)
