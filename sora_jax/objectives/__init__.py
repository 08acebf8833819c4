"""Training objectives as plug-ins: every module of this package that defines `OBJECTIVE`
is one (base.py says what an objective is). A run's `config.objectives` holds a section
per objective, `weight` and its own settings; those with weight > 0 are the run's.

Everything that depends on what a run learns asks here: the step (the loss and its
metrics, the extra inputs), the model (which outputs and heads to build), the state and
transfer (which parameter parts exist), evaluation and export (is there a classifier, an
aligned space).
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from sora_jax import config as config_lib
from sora_jax import plugins
from sora_jax.objectives.base import NEEDS, Objective

__all__ = ["NEEDS", "Objective", "check", "chosen", "defaults", "needs", "registry", "total"]


@functools.cache
def registry() -> dict[str, Objective]:
    """name -> objective, for every module here that defines OBJECTIVE."""
    return plugins.discover(__name__, __path__, "OBJECTIVE", "name")


def defaults() -> ml_collections.ConfigDict:
    """config.objectives as configs/base.py starts it: every objective's section, weight 0
    but the supervised loss's 1."""
    return ml_collections.ConfigDict(
        {
            name: {"weight": 1.0 if name == "supervised" else 0.0, **objective.defaults}
            for name, objective in registry().items()
        }
    )


def chosen(
    config: ml_collections.ConfigDict,
) -> dict[str, tuple[Objective, ml_collections.ConfigDict]]:
    """The run's objectives, weight > 0: name -> (objective, its settings)."""
    known = registry()
    return {
        name: (known[name], settings)
        for name, settings in config.objectives.items()
        if name in known and settings.weight > 0
    }


def check(config: ml_collections.ConfigDict) -> None:
    """ConfigError, naming the key, for an unknown objective, a bad weight, no objective at
    all, or settings an objective refuses."""
    known = registry()
    for name, settings in config.objectives.items():
        config_lib.one_of(name, "objectives", known)
        config_lib.check(settings.weight >= 0, f"objectives.{name}.weight", "must be >= 0")
    config_lib.check(
        bool(chosen(config)),
        "objectives",
        f"no objective has weight > 0 (known: {', '.join(known)})",
    )
    for objective, settings in chosen(config).values():
        objective.check(settings, config)


def needs(config: ml_collections.ConfigDict) -> frozenset[str]:
    """The model outputs (base.NEEDS) the run's objectives need."""
    return frozenset().union(*(o.needs for o, _ in chosen(config).values()))


def heads(config: ml_collections.ConfigDict) -> dict:
    """name -> the flax head an objective adds to the model (its parameters' part)."""
    built = {name: o.head(s, config) for name, (o, s) in chosen(config).items()}
    return {name: head for name, head in built.items() if head is not None}


def build_model(config: ml_collections.ConfigDict):
    """The run's model: the towers and fusion, and what its objectives need (the
    contrastive projection heads, the objectives' own heads)."""
    from sora_jax import models

    return models.build_model(
        config.model, contrastive="projections" in needs(config), heads=heads(config)
    )


def parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The parameter parts the run's model has names for: init_parts and freeze take them."""
    from sora_jax import models

    return (*models.PARTS, *heads(config))


def model_inputs(
    inputs: dict[str, jax.Array], config: ml_collections.ConfigDict, rng: jax.Array
) -> dict[str, jax.Array]:
    """The extra inputs the run's objectives derive from a training batch."""
    extra = {}
    for i, (objective, settings) in enumerate(chosen(config).values()):
        extra |= objective.model_inputs(inputs, settings, config, jax.random.fold_in(rng, i))
    return extra


def total(
    out: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    views: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(the weighted sum of the run's objectives, every objective's metrics) of one batch
    from the model's outputs; rows [B * views], a clip's windows side by side."""
    loss, metrics = jnp.zeros((), jnp.float32), {}
    for objective, settings in chosen(config).values():
        part, reported = objective.loss(out, batch, settings, config, mesh, views)
        loss += settings.weight * part
        metrics |= reported
    return loss, metrics
