"""Run-level config checks, and saving and loading the config beside the checkpoints.

A leaf: anything may import it (the data pipeline does) without pulling in flax, the
models or the kernels. Each part checks the keys it understands, where it can see what
they mean: this file the run's keys (data, optimizer, schedule, checkpoints, mesh,
logging), `sora_jax.models.check_config` the model's, the data pipeline the dataset's.
`sora_jax.train.setup.check_config` runs them all before anything compiles.
"""

import json
import os

import ml_collections

from sora_jax import storage
from sora_jax.workdir import Workdir

SAMPLE_RATE = 16_000  # Hz: prepared audio and the model's log-mel front end
# What evaluation reports, so what checkpoints rank by: classification (supervised runs)
# and the mean recall@1 of cross-modal retrieval (contrastive runs).
CLASSIFICATION_METRICS = ("top1", "top5", "map")
METRICS = (*CLASSIFICATION_METRICS, "retrieval_r1")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # what jax.export compiles for


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key."""


def trains_classifier(config: ml_collections.ConfigDict) -> bool:
    """An objective of the run reads the labels (the supervised loss): its classifier is
    trained, and it is scored by class (top-1, mAP) and exported with class scores."""
    from sora_jax import objectives  # the objectives build on this module

    return any(o.uses_labels for o, _ in objectives.chosen(config).values())


def trains_alignment(config: ml_collections.ConfigDict) -> bool:
    """An objective of the run needs the projection heads (the contrastive loss): its model
    has the aligned space, and it is scored by retrieval."""
    from sora_jax import objectives

    return "projections" in objectives.needs(config)


def check(condition: bool, key: str, message: str) -> None:
    """Raise ConfigError naming `config.<key>` unless `condition` holds."""
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def one_of(value, key: str, choices) -> None:
    check(value in choices, key, f"{value!r} is not one of {sorted(choices)}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError for a run-level key that would fail later or silently misbehave.
    With `num_devices`, also the keys that must divide the devices (checked before the
    mesh is built, so the error names the key)."""
    d, o, c = config.data, config.optimizer, config.checkpoint
    check(d.num_frames >= 1, "data.num_frames", "must be >= 1")
    check(d.frame_stride >= 1, "data.frame_stride", "must be >= 1")
    check(d.fps > 0, "data.fps", "must be positive")
    check(8 <= d.crop_size <= 1024, "data.crop_size", f"{d.crop_size} is not in [8, 1024]")
    check(0 < d.min_crop_scale <= 1, "data.min_crop_scale", "must be in (0, 1]")
    check(d.eval_spatial_views in (1, 3), "data.eval_spatial_views", "must be 1 or 3")
    check(d.eval_temporal_views >= 1, "data.eval_temporal_views", "must be >= 1")
    check(d.train_views in (1, 2), "data.train_views", "must be 1 or 2")
    check(d.eval_batch_size >= 1, "data.eval_batch_size", "must be >= 1")
    for i, part in enumerate(d.get("mixture", ())):
        check(
            isinstance(part, dict) and set(part) == {"dir", "name", "weight"},
            f"data.mixture[{i}]",
            f"{part!r} is not a dict of dir, name and weight",
        )
        check(part["weight"] > 0, f"data.mixture[{i}].weight", "must be positive")
    check(d.folds >= 0, "data.folds", "must be >= 0 (0: train on the whole split)")
    if d.folds:
        check(d.folds >= 2, "data.folds", "must be >= 2 to hold one out (0: none)")
        check(0 <= d.holdout_fold < d.folds, "data.holdout_fold", f"must be in [0, {d.folds})")
        check(not d.get("mixture", ()), "data.folds", "holds out clips of data.name alone")
    check(d.workers >= 0, "data.workers", "must be >= 0 (0: decode in the training process)")
    check(d.audio_samples >= 0, "data.audio_samples", "must be >= 0 (0: the frames' span)")
    check(
        audio_samples(config) >= 400,
        "data.audio_samples",
        f"{audio_samples(config)} samples is shorter than one 25 ms log-mel window",
    )
    check(config.batch_size >= 1, "batch_size", "must be >= 1")
    check(config.total_steps > 0, "total_steps", "must be positive")
    check(
        config.accum_steps >= 1 and config.batch_size % config.accum_steps == 0,
        "accum_steps",
        f"must be >= 1 and divide batch_size {config.batch_size}",
    )
    one_of(o.name, "optimizer.name", ("adamw", "sgd"))
    one_of(o.schedule, "optimizer.schedule", ("cosine", "constant"))
    check(o.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    check(o.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
    check(o.weight_decay >= 0, "optimizer.weight_decay", "must be >= 0")
    check(0 <= o.momentum < 1, "optimizer.momentum", "must be in [0, 1)")
    check(o.grad_clip >= 0, "optimizer.grad_clip", "must be >= 0 (0 disables)")
    check(0 <= o.ema_decay < 1, "optimizer.ema_decay", "must be in [0, 1) (0 disables)")
    check(config.mesh.fsdp >= 1, "mesh.fsdp", "must be >= 1")
    check(config.log_every >= 1, "log_every", "must be >= 1")
    check(config.eval_every >= 0, "eval_every", "must be >= 0 (0: only at the end)")
    check(c.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    check(c.keep >= 1, "checkpoint.keep", "must be >= 1")
    from sora_jax import objectives

    objectives.check(config)
    for name, (objective, _) in objectives.chosen(config).items():
        check(
            config.accum_steps == 1 or not objective.in_batch_negatives,
            "accum_steps",
            f"must be 1 with objectives.{name}: every clip of the global batch is a "
            "negative for every other, so the batch cannot be split into micro-batches",
        )
    check(config.eval.knn_k >= 1, "eval.knn_k", "must be >= 1")
    check(config.eval.knn_bank_size >= 1, "eval.knn_bank_size", "must be >= 1")
    check(config.optimizer.pretrained_lr_scale > 0, "optimizer.pretrained_lr_scale", "must be > 0")
    if "/" in c.best_metric:  # an evaluator's: NAME/METRIC
        evaluator = c.best_metric.split("/")[0]
        check(
            evaluator in config.get("evals", {}),
            "checkpoint.best_metric",
            f"{c.best_metric!r}: no evaluator {evaluator!r} in config.evals "
            f"(has {sorted(config.get('evals', {}))})",
        )
    elif c.best_metric == "retrieval_r1":
        check(
            trains_alignment(config),
            "checkpoint.best_metric",
            "retrieval_r1 needs objectives.contrastive.weight > 0",
        )
    else:
        one_of(c.best_metric, "checkpoint.best_metric", METRICS)
        check(
            trains_classifier(config),
            "checkpoint.best_metric",
            f"{c.best_metric} needs objectives.supervised.weight > 0 (use retrieval_r1 for "
            "pretraining)",
        )
    if c.best_metric == "top5":
        check(
            config.model.num_classes > 5 and not config.model.multi_label,
            "checkpoint.best_metric",
            "top5 needs a single-label model with more than 5 classes",
        )
    check(
        len(config.profile_steps) in (0, 2)
        and all(s >= 1 for s in config.profile_steps)
        and list(config.profile_steps) == sorted(config.profile_steps),
        "profile_steps",
        f"{tuple(config.profile_steps)} is not () or (first, last) with 1 <= first <= last",
    )
    dist = config.distributed
    check(dist.heartbeat_timeout_s > 0, "distributed.heartbeat_timeout_s", "must be positive")
    one_of(dist.cpu_collectives, "distributed.cpu_collectives", ("gloo", "mpi", "none"))
    for platform in config.export.platforms:
        one_of(platform, "export.platforms", PLATFORMS)
    check(
        isinstance(config.export.get("saved_model", True), bool),
        "export.saved_model",
        "must be True or False",
    )
    if num_devices is not None:
        check(
            num_devices % config.mesh.fsdp == 0,
            "mesh.fsdp",
            f"{config.mesh.fsdp} does not divide the {num_devices} devices",
        )
        micro = config.batch_size // config.accum_steps
        check(
            micro % num_devices == 0,
            "batch_size",
            f"micro-batch {micro} (batch_size / accum_steps) is not divisible by "
            f"the {num_devices} devices",
        )
        check(
            d.eval_batch_size % num_devices == 0,
            "data.eval_batch_size",
            f"{d.eval_batch_size} is not divisible by the {num_devices} devices",
        )


def audio_samples(config: ml_collections.ConfigDict) -> int:
    """Audio samples per clip at 16 kHz: explicit, or the frames' time span."""
    d = config.data
    if d.audio_samples:
        return int(d.audio_samples)
    return round(d.num_frames * d.frame_stride / d.fps * SAMPLE_RATE)


def save(config: ml_collections.ConfigDict, workdir: "str | os.PathLike[str]") -> None:
    """Write the final config beside the checkpoints, for resumption, eval and export;
    whole or not at all (a killed write must not leave a run that cannot be resumed). How
    this process joined its run (coordinator, process count and id) is not saved: a work dir
    outlives its launch, and sora-eval or sora-export reading it would wait for peers that
    are gone."""
    saved = config.copy_and_resolve_references()
    if "distributed" in saved:
        saved.distributed.update(coordinator="", num_processes=0, process_id=-1)
    storage.write_atomic(
        Workdir(workdir).config, saved.to_json_best_effort(indent=2, sort_keys=True)
    )


def from_dict(tree: dict) -> ml_collections.ConfigDict:
    """A config saved as JSON (config.json, a model card's), keys added since filled in.
    Runs from before objectives were plug-ins kept their weights as `loss.supervised` and
    `loss.contrastive`: those become `objectives.NAME.weight`."""
    from sora_jax import objectives

    tree = dict(tree)
    if "objectives" not in tree:
        weights = tree.pop("loss", None) or {"supervised": 1.0}
        tree["objectives"] = {name: {"weight": w} for name, w in weights.items()}
    config = ml_collections.ConfigDict(_tuples(tree))
    for name, settings in objectives.defaults().items():  # objectives added since
        if name not in config.objectives:
            config.objectives[name] = settings
        for key, value in settings.items():
            if key not in config.objectives[name]:
                config.objectives[name][key] = value
    for key, default in SAVED_BEFORE_KEY.items():
        *parents, leaf = key.split(".")
        group = config
        for p in parents:
            if p not in group:
                group[p] = ml_collections.ConfigDict()
            group = group[p]
        if leaf not in group:
            group[leaf] = default
    return config


def load(workdir: "str | os.PathLike[str]") -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with (keys added since filled in)."""
    path = Workdir(workdir).config
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sora-train work dir?")
    try:
        return from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is damaged ({e}): not a config sora-train wrote") from e


# Keys that work dirs written by earlier versions lack, with the value those runs used.
SAVED_BEFORE_KEY = {
    "profile_steps": (),
    "cpu_fast_compile": False,
    "model.visual.conv_backend": "auto",
    "model.visual.conv_bias_before_norm": True,
    "model.audio.lstm_backend": "auto",
    "model.audio.unroll": 1,
    "model.audio.time_stack": 1,
    "data.train_views": 1,
    "model.projection.dim": 128,
    "model.projection.temperature": 0.07,
    "model.projection.min_temperature": 0.01,
    "init_from": "",
    "init_parts": ("visual", "audio", "fusion", "head"),
    "optimizer.freeze": (),
    "optimizer.pretrained_lr_scale": 1.0,
    "eval.knn_k": 20,
    "eval.knn_bank_size": 50_000,
    "data.mixture": (),
    "data.folds": 0,
    "data.holdout_fold": 0,
    "evals": {},
}


def _tuples(tree):
    """JSON turns tuples into lists; configs use tuples (ConfigDict types are strict)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
