"""A linear probe: the pretrained encoder frozen, only the classifier trains.

    sora-train --config configs/linear_probe.py --workdir runs/probe \
      --config.init_from=runs/pretrain --config.data.name=LABELLED --config.model.num_classes=N

The visual tower, audio branch and fusion head load from `init_from` (a pretraining work
dir, one of its step dirs or a sora-export dir) and stay as they are: optax.multi_transform
gives them zero updates and keeps no optimizer state for them, and no gradient flows
through them (train/state.py), so a step costs little more than the forward pass. What a
linear classifier on the frozen embedding reaches measures the representation. With no
`init_from` the same run probes a randomly initialised encoder: the control.

Presets: `small` (configs/pretrain_av.py:small's model, on a few hundred labelled clips)
and `runlocal`.
"""

import ml_collections

from configs import base, small

ENCODER = ("visual", "audio", "fusion")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.total_steps, c.eval_every = 10_000, 2_000
    arg = small.small_preset(c, arg, total_steps=200)  # a linear head learns fast
    c.init_parts = ENCODER
    c.optimizer.update(
        freeze=ENCODER, learning_rate=1e-2, warmup_steps=20, weight_decay=0.0, ema_decay=0.0
    )
    c.model.modality_dropout = 0.0  # the frozen encoder's embedding, as it is
    return base.apply_preset(c, arg)
