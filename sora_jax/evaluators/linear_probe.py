"""linear_probe: what a linear classifier on the frozen embeddings reaches, fitted in closed
form at every evaluation, so a pretraining curve shows transfer accuracy as it trains
(big_vision's few-shot evaluator). Ridge regression onto +-1 one-hot targets, fitted on
`train_split` (its first `max_train_clips`), scored by top-1 on `split`.

The labelled data may be another prepared dataset than the run's (`dataset`, `data_dir`:
pretraining reads unlabeled clips, the probe a labelled set prepared at the same fps).

Settings: train_split ("train"), embedding ("embedding": the fused one;
"video_embedding" or "audio_embedding": a sense alone), l2 (1e-3, times the mean squared
feature), max_train_clips (10000), dataset and data_dir ("": the run's).
"""

from typing import ClassVar

import jax.numpy as jnp
import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator
from sora_jax.train.step import clip_senses, clip_vectors

EMBEDDINGS = {"embedding": None, "video_embedding": "has_video", "audio_embedding": "has_audio"}


def _dataset(settings, config) -> tuple[str, str]:
    return (settings.data_dir or config.data.dir, settings.dataset or config.data.name)


def fit_ridge(x: np.ndarray, labels: np.ndarray, classes: int, l2: float) -> np.ndarray:
    """Weights [E + 1, C] (the last row a bias) of ridge regression from x [N, E] onto
    +-1 one-hot labels, in float64; `l2` scaled by the mean squared feature, so one
    setting suits embeddings of any scale."""
    x = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    targets = np.where(np.arange(classes)[None, :] == labels[:, None], 1.0, -1.0)
    gram = x.T @ x
    gram[np.diag_indices_from(gram)] += l2 * np.mean(x[:, :-1] ** 2) * len(x)
    return np.linalg.solve(gram, x.T @ targets)


def probe_top1(weights: np.ndarray, x: np.ndarray, labels: np.ndarray) -> float:
    scores = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1) @ weights
    return float(np.mean(np.argmax(scores, axis=1) == labels))


class LinearProbeEvaluator(SliceableEvaluator):
    type = "linear_probe"
    defaults: ClassVar[dict] = {
        "train_split": "train",
        "embedding": "embedding",
        "l2": 1e-3,
        "max_train_clips": 10_000,
        "dataset": "",
        "data_dir": "",
    }

    @classmethod
    def check(cls, key, settings, config):
        config_lib.one_of(settings.embedding, f"{key}.embedding", EMBEDDINGS)
        config_lib.check(settings.l2 > 0, f"{key}.l2", "must be > 0")
        config_lib.check(settings.max_train_clips >= 2, f"{key}.max_train_clips", "must be >= 2")
        config_lib.check(not config.model.multi_label, key, "needs single-label data")

    @classmethod
    def data_problems(cls, key, settings, config):
        from sora_jax.data import pipeline

        dataset = _dataset(settings, config)
        try:
            summary = pipeline.dataset_summary(*dataset)
        except FileNotFoundError as e:
            return [f"config.{key}.dataset: {e}"]
        problems = [
            f"config.{key}: no split {split!r} in {dataset[1]} (has {sorted(summary.splits)})"
            # (The run's own dataset's `split` is checked for every evaluator.)
            for split in (settings.train_split, *([settings.split] if settings.dataset else []))
            if split not in summary.splits
        ]
        if not summary.class_names:
            problems.append(f"config.{key}: dataset {dataset[1]} has no labels to probe")
        if summary.fps != config.data.fps:
            problems.append(
                f"config.{key}: dataset {dataset[1]} was prepared at {summary.fps} fps, the "
                f"run reads {config.data.fps}"
            )
        return problems

    def __init__(self, name, settings, context):
        from sora_jax.data import pipeline

        super().__init__(name, settings, context)
        self.dataset_location = where = _dataset(settings, context.config)
        self.classes = len(pipeline.dataset_summary(*where).class_names)
        self._train = context.reader(settings.train_split, where, settings.max_train_clips)
        self._test = context.reader(settings.split, where)
        self._step = context.jit(self._embed)

    def _embed(self, params, batch):
        out = self.context.apply_views(params, batch)
        key, sense = self.settings.embedding, EMBEDDINGS[self.settings.embedding]
        has = clip_senses(batch)[sense] if sense else jnp.ones(batch["frames"].shape[:1], bool)
        return {"x": clip_vectors(out, batch, (key,))[key], "has": has}

    headline = "top1"

    def outputs(self, params):
        """Fitted on the train split, then per test clip: whether the probe is right, and
        whether the majority class would be."""
        train, train_labels = self._train.run(self._step, params)
        test, test_labels = self._test.run(self._step, params)
        train_x, train_y = train["x"][train["has"]], train_labels[train["has"]]
        weights = fit_ridge(train_x, train_y, self.classes, self.settings.l2)
        majority = np.bincount(train_y, minlength=self.classes).argmax()
        scores = np.concatenate([test["x"], np.ones((len(test["x"]), 1))], axis=1) @ weights
        # What the fit itself scored: the same for every slice of the test clips.
        self._fit = {"train_top1": probe_top1(weights, train_x, train_y), "num_train": len(train_y)}
        return {
            "right": np.argmax(scores, axis=1) == test_labels,
            "majority_right": test_labels == majority,
            "has": test["has"],
        }

    def summarize(self, outputs, keep):
        keep = keep & outputs["has"]
        if not keep.any():
            return {"num_examples": 0}
        return self._fit | {
            "top1": float(np.mean(outputs["right"][keep])),
            "majority_top1": float(np.mean(outputs["majority_right"][keep])),  # no embedding
            "num_examples": int(keep.sum()),
        }

    def dataset(self):
        return self.dataset_location

    def close(self):
        self._train.close()
        self._test.close()


EVALUATOR = LinearProbeEvaluator
