"""What an evaluator is: a named measure of a run's parameters on one split, run during
training and by sora-eval, that never sees the trainer.

A new evaluator is one module in this package that defines `EVALUATOR`, a subclass of
`Evaluator`; a config lists it in `config.evals` under a name of its choosing:

    c.evals = {"sync": {"type": "av_sync", "split": "test", "every_steps": 0}}

`every_steps` 0 runs it at every evaluation (data.eval_every and the end of training).
Its metrics appear as `eval/NAME/METRIC` in TensorBoard, under NAME in the evaluation's
JSON (sora-eval's last line and WORKDIR/eval_SPLIT.json), and checkpoint.best_metric may
name one as "NAME/METRIC". README "Extending" walks through one.
"""

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sora_jax.inputs import MODEL_INPUTS
from sora_jax.train.sharding import gathered


@dataclasses.dataclass(frozen=True)
class Context:
    """What an evaluator may use: the run's config, the model's apply function and the
    mesh its batches are sharded over, and readers of a split's evaluation batches."""

    config: ml_collections.ConfigDict
    apply: Callable[..., dict]  # the flax model's apply: (variables, inputs, **kw) -> outputs
    mesh: Mesh
    batch_sharding: NamedSharding
    class_names: tuple[str, ...]
    # reader(split, dataset=None, limit=None) -> an object whose .run(step, params) gives
    # `step`'s per-clip outputs for every clip of the split (its first `limit`) once, in
    # the split's order, and the labels; .close(). `dataset`: (dir, name) of another
    # prepared dataset, prepared at the run's fps.
    reader: Callable[..., Any]

    def apply_views(self, params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The model on every view of an evaluation batch [B, V, ...], as rows [B * V]:
        the fused clip and each sense alone (modality_embeddings). The parameters are
        gathered whole first, as in the train and eval steps (train/sharding.gathered)."""
        rows, _, _ = flatten_views({k: batch[k] for k in MODEL_INPUTS})
        return self.apply({"params": gathered(params, self.mesh)}, rows, modality_embeddings=True)

    def jit(self, fn: Callable) -> Callable:
        """`fn(params, batch)` compiled once, its per-clip outputs gathered whole on every
        process (what a reader's run collects)."""
        return jax.jit(fn, out_shardings=NamedSharding(self.mesh, PartitionSpec()))


class Evaluator(abc.ABC):
    """Subclasses set `type` and `defaults` (their settings beside type, split and
    every_steps) and define __call__; or derive from SliceableEvaluator."""

    type: str = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, name: str, settings: ml_collections.ConfigDict, context: Context):
        self.name, self.settings, self.context = name, settings, context

    @classmethod
    def check(cls, key: str, settings: ml_collections.ConfigDict, config) -> None:
        """Raise config.ConfigError naming `key`.SETTING for settings that cannot work."""
        return None  # by default: no settings of its own to check

    @classmethod
    def data_problems(cls, key: str, settings: ml_collections.ConfigDict, config) -> list[str]:
        """What is wrong with the data it would read (checked with the run's dataset,
        before compiling), as "config.KEY: ..." lines; the split it reads is checked for
        every evaluator."""
        return []

    @abc.abstractmethod
    def __call__(self, params: Any) -> dict[str, float]:
        """The measures of `params` (the run's inference parameters): name -> number."""

    def close(self) -> None:
        """Stop any data workers."""
        return None  # by default: it keeps none


class SliceableEvaluator(Evaluator):
    """An evaluator whose measures come from per-clip outputs, so that they can also be
    taken over any subset of the clips (the `slices` evaluator). `headline` names the
    measure slices are ranked by (higher: better)."""

    headline: str = ""

    def __call__(self, params: Any) -> dict[str, float]:
        per_clip = self.outputs(params)
        return self.summarize(per_clip, np.ones(len(next(iter(per_clip.values()))), bool))

    @abc.abstractmethod
    def outputs(self, params: Any) -> dict[str, np.ndarray]:
        """Per clip of its split, in the split's order: name -> [N, ...]."""

    @abc.abstractmethod
    def summarize(self, outputs: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, float]:
        """The measures over the clips where `keep` [N] is True."""

    def dataset(self) -> tuple[str, str]:
        """(data dir, name) of the dataset whose `split` it measures."""
        d = self.context.config.data
        return d.dir, d.name


def flatten_views(batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], int, int]:
    """Evaluation batches [B, V, ...] -> rows [B * V, ...], with B and V."""
    B, V = batch["frames"].shape[:2]
    return {k: v.reshape(B * V, *v.shape[2:]) for k, v in batch.items()}, B, V
