"""Evaluators as plug-ins: every module of this package that defines `EVALUATOR` is one
(base.py says what an evaluator is). A run's `config.evals` names its evaluators, each a
section with `type`, `split`, `every_steps` and the type's own settings.

The classification, retrieval and kNN measures of train/evaluate.py run at every
evaluation as before, their keys unprefixed; the evaluators listed here run beside them.
"""

import functools

import ml_collections

from sora_jax import config as config_lib
from sora_jax import plugins
from sora_jax.evaluators.base import Context, Evaluator

__all__ = [
    "Context",
    "Evaluator",
    "build",
    "check",
    "due",
    "flatten",
    "registry",
    "schedule",
    "settings_of",
]

COMMON = {"type": "", "split": "test", "every_steps": 0}
# Keys of an evaluation's JSON that an evaluator's name would overwrite.
RESERVED = (
    "split",
    "step",
    "details",
    "top1",
    "top5",
    "map",
    "num_examples",
    "audio_only",
    "video_only",
    "retrieval",
    "retrieval_r1",
    "knn",
    "evals",
    "confusion_matrix",
)


@functools.cache
def registry() -> dict[str, type[Evaluator]]:
    """type -> evaluator class, for every module here that defines EVALUATOR."""
    return plugins.discover(__name__, __path__, "EVALUATOR", "type")


def settings_of(section: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """An evaluator's section with its type's defaults under what the config gives."""
    evaluator = registry()[section.type]
    return ml_collections.ConfigDict(COMMON | evaluator.defaults | section.to_dict())


def check(config: ml_collections.ConfigDict) -> None:
    """ConfigError naming evals.NAME.KEY for an unknown type, a bad schedule, or settings
    the type refuses. (Whether the split exists is checked with the dataset.)"""
    for name, section in config.get("evals", {}).items():
        key = f"evals.{name}"
        config_lib.check("/" not in name, key, "a name without '/' (metrics are NAME/METRIC)")
        config_lib.check(name not in RESERVED, key, f"{name!r} names a built-in measure")
        config_lib.one_of(section.get("type", ""), f"{key}.type", registry())
        settings = settings_of(section)
        unknown = set(settings) - set(COMMON) - set(registry()[settings.type].defaults)
        config_lib.check(not unknown, key, f"{sorted(unknown)} are not {settings.type} settings")
        config_lib.check(settings.every_steps >= 0, f"{key}.every_steps", "must be >= 0")
        registry()[settings.type].check(key, settings, config)


def data_problems(config: ml_collections.ConfigDict) -> list[str]:
    """Every evaluator's data_problems, for pipeline.check_dataset."""
    problems = []
    for name, section in config.get("evals", {}).items():
        settings = settings_of(section)
        problems += registry()[settings.type].data_problems(f"evals.{name}", settings, config)
    return problems


def schedule(config: ml_collections.ConfigDict) -> dict[str, int]:
    """name -> every_steps of each evaluator (0: at every evaluation of the run); read once,
    before the loop, which asks `due` at every step."""
    evals = config.get("evals", {})
    return {name: settings_of(section).every_steps for name, section in evals.items()}


def due(every: dict[str, int], step: int, evaluating: bool) -> list[str]:
    """The evaluators to run after `step`: those with every_steps 0 when the run
    evaluates, and those whose every_steps divides the step."""
    return [n for n, k in every.items() if (k == 0 and evaluating) or (k and step % k == 0)]


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested measures -> {"A/B/C": number}: what TensorBoard, metrics.jsonl and
    checkpoint.best_metric take (text, such as a slice's name, is left out)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def build(config: ml_collections.ConfigDict, context: Context) -> dict[str, Evaluator]:
    """name -> a ready evaluator (steps compiled lazily, data workers started), for every
    evaluator the config lists."""
    return {
        name: registry()[section.type](name, settings_of(section), context)
        for name, section in config.get("evals", {}).items()
    }
