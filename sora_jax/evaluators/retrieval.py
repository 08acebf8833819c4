"""retrieval: cross-modal retrieval in the run's aligned space. Does a clip's picture find
its own sound among every clip's sound on the split (and the other way round)? Recall@1/5/10
and median rank, over the clips with both senses (train/representation.py). The measures a
contrastive run's evaluation reports as `retrieval`; as an evaluator they can be taken on
another split or per slice (`slices`: a clip is then sought among its slice's clips).

Settings: none beyond type, split and every_steps. Needs the contrastive objective.
"""

import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator
from sora_jax.train import representation
from sora_jax.train.step import PROJECTIONS, clip_senses, clip_vectors


class RetrievalEvaluator(SliceableEvaluator):
    type = "retrieval"
    headline = "v2a_r1"

    @classmethod
    def check(cls, key, settings, config):
        config_lib.check(
            config_lib.trains_alignment(config),
            key,
            "retrieves in the aligned space: the run needs the contrastive objective",
        )

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        self._reader = context.reader(settings.split)
        self._step = context.jit(self._project)

    def _project(self, params, batch):
        out = self.context.apply_views(params, batch)
        return clip_vectors(out, batch, PROJECTIONS) | clip_senses(batch)

    def outputs(self, params):
        return self._reader.run(self._step, params)[0]

    def summarize(self, outputs, keep):
        both = keep & outputs["has_video"] & outputs["has_audio"]
        report = representation.retrieval_report(
            outputs["video_projection"][keep], outputs["audio_projection"][keep], both[keep]
        )
        report.pop("warning", None)  # a number per key here; chance_r1 says the same
        return report | {"num_clips": int(np.sum(keep))}

    def close(self):
        self._reader.close()


EVALUATOR = RetrievalEvaluator
