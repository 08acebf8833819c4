"""slices: another evaluator's measures per value of a clip metadata column, the worst
slice and its gap to the whole split, each with its clip count (the seed's fairness and
transparency challenge: a model that is right on average can fail one group of users,
one source or one recording device).

The metadata comes from sora-prep: a CSV's columns beside path, label and split (e.g.
`group`, `source`, `device`) are kept per clip. A slice with fewer than `min_clips` clips
is reported but marked `too_small` and never named the worst: its figure is noise.

Settings: of (the name of another evaluator in config.evals, one that can be sliced:
classification, linear_probe, av_sync), column, min_clips (20).

Reported: overall (the other evaluator's measures on every clip), slices (value -> its
measures, num_clips, too_small), worst (the slice lowest in the other's headline measure,
e.g. top1), gap (overall minus worst, in that measure), and the counts.
"""

from typing import ClassVar

import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluators.base import Evaluator, SliceableEvaluator


class SlicesEvaluator(Evaluator):
    type = "slices"
    defaults: ClassVar[dict] = {"of": "", "column": "", "min_clips": 20}

    @classmethod
    def check(cls, key, settings, config):
        from sora_jax import evaluators

        others = config.get("evals", {})
        config_lib.check(
            settings.of in others and settings.of != key.split(".")[-1],
            f"{key}.of",
            f"{settings.of!r} is not another evaluator in config.evals (has {sorted(others)})",
        )
        target = evaluators.registry()[others[settings.of].type]
        config_lib.check(
            issubclass(target, SliceableEvaluator),
            f"{key}.of",
            f"the {target.type} evaluator cannot be sliced",
        )
        config_lib.check(bool(settings.column), f"{key}.column", "name a metadata column")
        config_lib.check(settings.min_clips >= 1, f"{key}.min_clips", "must be >= 1")

    @classmethod
    def data_problems(cls, key, settings, config):
        from sora_jax.data import pipeline

        d = config.data
        columns = pipeline.dataset_summary(d.dir, d.name).metadata_columns
        if settings.column in columns:
            return []
        return [
            f"config.{key}.column: dataset {d.name} keeps no column {settings.column!r} per "
            f"clip (it has {list(columns)}: a CSV's columns beside path, label and split)"
        ]

    def __init__(self, name, settings, context):
        from sora_jax import evaluators

        super().__init__(name, settings, context)
        section = context.config.evals[settings.of]
        self._target = evaluators.registry()[section.type](
            settings.of, evaluators.settings_of(section), context
        )
        self._values = None  # the column's value per clip, read at the first call

    def __call__(self, params):
        from sora_jax.data import pipeline

        target, headline = self._target, self._target.headline
        outputs = target.outputs(params)
        if self._values is None:
            clips = pipeline.clip_metadata(*target.dataset(), target.settings.split)
            self._values = np.array([c.get(self.settings.column, "") for c in clips])
        every = np.ones(len(self._values), bool)
        overall = target.summarize(outputs, every)
        slices = {}
        for value in sorted(set(self._values.tolist())):
            keep = self._values == value
            measured = target.summarize(outputs, keep)
            count = int(keep.sum())
            slices[value or "(empty)"] = measured | {
                "num_clips": count,
                "too_small": count < self.settings.min_clips,
            }
        trusted = {v: m for v, m in slices.items() if not m["too_small"] and headline in m}
        report = {"column": self.settings.column, "overall": overall, "slices": slices}
        report |= {"num_slices": len(slices), "num_trusted": len(trusted)}
        if trusted and headline in overall:
            worst = min(trusted, key=lambda v: trusted[v][headline])
            report["worst"] = {
                "slice": worst,
                headline: trusted[worst][headline],
                "num_clips": trusted[worst]["num_clips"],
            }
            report["gap"] = overall[headline] - trusted[worst][headline]
        return report

    def close(self):
        self._target.close()


EVALUATOR = SlicesEvaluator
