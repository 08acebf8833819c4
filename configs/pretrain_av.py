"""Audio-visual contrastive pretraining on unlabeled video: a clip's picture and its own
sound are a positive pair, every other clip of the global batch a negative.

    sora-prep VIDEOS --out DATA --name NAME --layout unlabeled
    sora-train --config configs/pretrain_av.py --workdir runs/pretrain --config.data.name=NAME

The loss is symmetric InfoNCE (video->audio and audio->video) on L2-normalised
projections of each sense's embedding, with a learned, clamped temperature; its
similarity matrix spans the whole global batch across devices and hosts, so the batch
size is the number of negatives: keep it large on a pod. Evaluation is cross-modal
retrieval on the held-out split (and k-nearest-neighbour top-1 on labelled data); the
best checkpoint is the one with the best mean recall@1. Then carry the encoder to a
labelled task with configs/linear_probe.py or configs/finetune.py.

Presets: `small` (a few hundred clips at 128 px on a CPU in minutes, the sizes of
configs/small.py) and `runlocal`.
"""

import ml_collections

from configs import base, small


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.batch_size = 4096  # global: every clip is a negative for the 4095 others
    c.total_steps = 100_000
    c.optimizer.update(learning_rate=2e-3, warmup_steps=5_000, ema_decay=0.0)
    if arg == "small":
        arg = small.small_preset(c, arg, total_steps=300)
        c.batch_size = 64  # twice small.py's: more negatives
        c.optimizer.update(learning_rate=2e-3, warmup_steps=30)
    c.data.name = "unlabeled"
    c.objectives.supervised.weight = 0.0  # labels, if any, are never read
    c.objectives.contrastive.weight = 1.0
    # Each sense's embedding is computed with the other absent (models/sora.py): hiding
    # one at random would only waste the fused pass, which this loss does not use.
    c.model.modality_dropout = 0.0
    c.model.projection.update(temperature=0.1)
    c.checkpoint.best_metric = "retrieval_r1"
    return base.apply_preset(c, arg)
