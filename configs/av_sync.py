"""Audio-visual synchronisation pretraining: the contrastive objective (what a sound is
about) and the av_sync objective (when it happens), each by weight; the av_sync evaluator
measures, on held-out clips, whether the model tells a clip's true soundtrack from the same
soundtrack shifted by 0.5-1.5 s.

    sora-prep demo videos/timing --set timing
    sora-prep videos/timing --out data/prepared --name timing --layout unlabeled --fps 8
    sora-train --config configs/av_sync.py:small --workdir runs/sync

`--config.objectives.av_sync.weight=0` trains the contrastive-only control on the same
data (BENCHMARKS.md §12 has both). The audio window must be at least twice
objectives.av_sync.min_offset_s: 16 frames at 8 fps give 2 s.

Presets: `small` (the timing set on a CPU in a few minutes) and `runlocal`.
"""

import ml_collections

from configs import base, pretrain_av


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = pretrain_av.get_config("small" if arg == "small" else None)
    c.data.update(name="timing", fps=8.0, num_frames=16, frame_stride=1)
    c.objectives.av_sync.weight = 1.0
    c.evals = {
        "sync": {"type": "av_sync", "split": "test", "min_offset_s": 0.5, "max_offset_s": 1.5}
    }
    c.checkpoint.best_metric = "sync/accuracy"
    if arg == "small":  # measured in BENCHMARKS.md §12 (bench/av_sync.py)
        c.data.update(crop_size=32, eval_temporal_views=2)
        c.batch_size, c.total_steps = 32, 200
        c.eval_every = c.checkpoint.every_steps = 100
        c.log_every = 25
        return c
    c = base.apply_preset(c, arg)
    if arg == "runlocal":
        c.data.num_frames = 8  # 1 s of sound: twice the smallest shift
    return c
