"""Fine-tuning: the whole model trains from a pretrained encoder, the pretrained parts at
a tenth of the learning rate of the new classifier.

    sora-train --config configs/finetune.py --workdir runs/finetune \
      --config.init_from=runs/pretrain --config.data.name=LABELLED --config.model.num_classes=N

Presets: `small` (configs/pretrain_av.py:small's model, on a few hundred labelled clips)
and `runlocal`.
"""

import ml_collections

from configs import base, small


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.total_steps, c.eval_every = 20_000, 2_000
    c.optimizer.warmup_steps = 1_000
    arg = small.small_preset(c, arg, total_steps=300)
    c.init_parts = ("visual", "audio", "fusion")
    c.optimizer.pretrained_lr_scale = 0.1
    return base.apply_preset(c, arg)
