"""classification: the classifier's top-1, top-5 and mAP on a split, from the clips fused
and from each sense alone (audio_only/, video_only/: the fusion head with the other sense
absent, over the clips that have the sense). The same measures every supervised run's
evaluation reports unprefixed; as an evaluator they can be taken per slice (`slices`) or on
another split. Needs the supervised objective.

Settings: none beyond type, split and every_steps.
"""

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator
from sora_jax.train import metrics as metrics_lib
from sora_jax.train.step import clip_scores, clip_senses

HEADLINES = ("top1", "top5", "map", "num_examples")  # of a classification report


class ClassificationEvaluator(SliceableEvaluator):
    type = "classification"
    headline = "top1"

    @classmethod
    def check(cls, key, settings, config):
        config_lib.check(
            config_lib.trains_classifier(config),
            key,
            "scores the classifier: the run needs the supervised objective",
        )

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        self._reader = context.reader(settings.split)
        self._step = context.jit(self._scores)

    def _scores(self, params, batch):
        out = self.context.apply_views(params, batch)
        multi = self.context.config.model.multi_label
        return clip_scores(out, batch, multi) | clip_senses(batch)  # as the built-in step

    def outputs(self, params):
        outputs, labels = self._reader.run(self._step, params)
        return outputs | {"label": labels}

    def summarize(self, outputs, keep):
        names, multi = self.context.class_names, self.context.config.model.multi_label
        kept = {k: v[keep] for k, v in outputs.items()}
        by_mode = metrics_lib.classification_by_mode(kept, kept["label"], names, multi)
        report = {}
        for mode, measured in by_mode.items():
            prefix = "" if mode == "full" else f"{mode}/"
            report |= {f"{prefix}{k}": measured[k] for k in HEADLINES if k in measured}
        return report

    def close(self):
        self._reader.close()


EVALUATOR = ClassificationEvaluator
