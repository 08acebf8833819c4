"""knn: k-nearest-neighbour top-1 of each clip of `split` among the first `bank_size`
clips of `bank_split`, in the fused embedding and in each sense's alone (DINO's weighted
vote, train/representation.py): whether clips of a class lie together, with no classifier
trained. The measures a contrastive run on labelled data reports as `knn`; as an evaluator
they can be taken on another split, from any run, or per slice.

Settings: bank_split ("train"), bank_size (50000), k (20). Needs single-label data.
"""

from typing import ClassVar

import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator
from sora_jax.train import representation
from sora_jax.train.step import EMBEDDINGS, clip_senses, clip_vectors

SPACES = {
    "top1": ("embedding", None),
    "video_top1": ("video_embedding", "has_video"),
    "audio_top1": ("audio_embedding", "has_audio"),
}


class KnnEvaluator(SliceableEvaluator):
    type = "knn"
    headline = "top1"
    defaults: ClassVar[dict] = {"bank_split": "train", "bank_size": 50_000, "k": 20}

    @classmethod
    def check(cls, key, settings, config):
        config_lib.check(settings.k >= 1, f"{key}.k", "must be >= 1")
        config_lib.check(settings.bank_size >= 1, f"{key}.bank_size", "must be >= 1")
        config_lib.check(not config.model.multi_label, key, "needs single-label data")

    @classmethod
    def data_problems(cls, key, settings, config):
        from sora_jax.data import pipeline

        summary = pipeline.dataset_summary(config.data.dir, config.data.name)
        problems = []
        if settings.bank_split not in summary.splits:
            problems.append(f"config.{key}.bank_split: no split {settings.bank_split!r}")
        if not summary.class_names:
            problems.append(f"config.{key}: dataset {config.data.name} has no labels")
        return problems

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        self._reader = context.reader(settings.split)
        self._bank = context.reader(settings.bank_split, None, settings.bank_size)
        self._step = context.jit(self._embed)

    def _embed(self, params, batch):
        out = self.context.apply_views(params, batch)
        return clip_vectors(out, batch, EMBEDDINGS) | clip_senses(batch)

    def outputs(self, params):
        queries, labels = self._reader.run(self._step, params)
        bank, bank_labels = self._bank.run(self._step, params)
        self._bank_outputs = (bank, bank_labels)
        return queries | {"label": labels}

    def summarize(self, outputs, keep):
        bank, bank_labels = self._bank_outputs
        classes, k = len(self.context.class_names), self.settings.k
        report = {"k": k, "bank_size": len(bank_labels), "num_examples": int(keep.sum())}
        for name, (key, has) in SPACES.items():
            query = keep if has is None else keep & outputs[has]
            known = np.ones(len(bank_labels), bool) if has is None else bank[has]
            report[name] = representation.knn_top1(
                outputs[key][query],
                outputs["label"][query],
                bank[key][known],
                bank_labels[known],
                k,
                classes,
            )
        return report

    def close(self):
        self._reader.close()
        self._bank.close()


EVALUATOR = KnnEvaluator
