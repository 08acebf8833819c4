"""classification: the classifier's top-1, top-5 and mAP on a split, from the clips fused
and from each sense alone (audio_only/, video_only/: the fusion head with the other sense
absent, over the clips that have the sense). The same measures every supervised run's
evaluation reports unprefixed; as an evaluator they can be taken per slice (`slices`) or on
another split. Needs the supervised objective.

Settings: none beyond type, split and every_steps.
"""

import jax

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator, flatten_views
from sora_jax.inputs import MODEL_INPUTS
from sora_jax.train import metrics as metrics_lib
from sora_jax.train.step import MODE_LOGITS

SENSE = {"full": None, "audio_only": "has_audio", "video_only": "has_video"}


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
        rows, B, V = flatten_views({k: batch[k] for k in MODEL_INPUTS})
        out = self.context.apply({"params": params}, rows, modality_embeddings=True)
        multi = self.context.config.model.multi_label
        scores = {}
        for mode, key in MODE_LOGITS.items():
            p = jax.nn.sigmoid(out[key]) if multi else jax.nn.softmax(out[key])
            scores[mode] = p.reshape(B, V, -1).mean(axis=1)  # [B, C], over the views
        return scores | {k: batch[k].any(axis=1) for k in ("has_video", "has_audio")}

    def outputs(self, params):
        outputs, labels = self._reader.run(self._step, params)
        return outputs | {"label": labels}

    def summarize(self, outputs, keep):
        names, multi = self.context.class_names, self.context.config.model.multi_label
        report = {}
        for mode, sense in SENSE.items():
            counted = keep if sense is None else keep & outputs[sense]
            prefix = "" if mode == "full" else f"{mode}/"
            if not counted.any():
                report[f"{prefix}num_examples"] = 0
                continue
            full = metrics_lib.classification_report(
                outputs[mode][counted], outputs["label"][counted], names, multi
            )
            kept = ("top1", "top5", "map", "num_examples")
            report |= {f"{prefix}{k}": full[k] for k in kept if k in full}
        return report

    def close(self):
        self._reader.close()


EVALUATOR = ClassificationEvaluator
