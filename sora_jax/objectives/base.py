"""What an objective is: a named, weighted term of the training loss that says which model
outputs it needs, which parameters it adds, and which settings it takes.

A new objective is one module in this package that defines `OBJECTIVE`, an instance of a
subclass of `Objective`; sora_jax/objectives/__init__.py finds it, configs/base.py gives
it a config section (`objectives.NAME`, weight 0 until a config or a flag sets it), and
the step, the state, transfer, evaluation and export learn from the chosen objectives
what exists. README "Extending" walks through one.
"""

import abc
from typing import Any, ClassVar

import jax
import ml_collections
from jax.sharding import Mesh

# What the model can compute beyond the fused embedding and class scores; an objective asks
# for these by name, and the model computes the union of what the chosen objectives ask.
#   modality_embeddings: each sense's embedding alone (the fusion head, other sense absent)
#   projections:         the contrastive heads' unit vectors and the learned temperature
NEEDS = ("modality_embeddings", "projections")


class Objective(abc.ABC):
    """One term of the loss. Subclasses set the class attributes and define `loss`."""

    name: str = ""
    # It reads the batch's labels: the run trains and scores the classifier, and needs a
    # labelled dataset.
    uses_labels: bool = False
    needs: frozenset[str] = frozenset()  # of NEEDS
    # Its loss compares each clip with every other of the global batch: the batch cannot
    # be split into micro-batches (accum_steps must be 1).
    in_batch_negatives: bool = False
    # Its config section beside `weight`: every setting, with its default, documented
    # where it is read (the subclass's docstring).
    defaults: ClassVar[dict[str, Any]] = {}

    def check(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
        """Raise config.ConfigError, naming the key, for settings that cannot work."""
        return None  # by default: no settings of its own to check

    def head(self, settings: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
        """A flax module the model applies to its features (its parameters are the part
        named after the objective), or None. See SoraModel.heads."""
        return None

    def model_inputs(
        self,
        inputs: dict[str, jax.Array],
        settings: ml_collections.ConfigDict,
        config: ml_collections.ConfigDict,
        rng: jax.Array,
    ) -> dict[str, jax.Array]:
        """Extra model inputs this objective derives from a training batch's (e.g. a
        shifted soundtrack); {} by default."""
        return {}

    @abc.abstractmethod
    def loss(
        self,
        out: dict[str, jax.Array],
        batch: dict[str, jax.Array],
        settings: ml_collections.ConfigDict,
        config: ml_collections.ConfigDict,
        mesh: Mesh | None,
        views: int,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss [], metrics {name: []}) of one global batch of rows [B * views]."""
