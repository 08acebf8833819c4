"""Config checks that run before anything compiles, each error naming the key."""

import json
import pathlib

import ml_collections

from sora_jax.kernels import onednn
from sora_jax.models import DTYPES, FUSIONS
from sora_jax.models.audio import CELLS


class ConfigError(ValueError):
    """A config value that cannot work, named by its dotted key."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def _one_of(config: ml_collections.ConfigDict, key: str, choices) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    _check(value in choices, key, f"{value!r} is not one of {sorted(choices)}")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError for a config that would fail later (or silently misbehave)."""
    m, d, o = config.model, config.data, config.optimizer
    _one_of(config, "model.dtype", DTYPES)
    _one_of(config, "model.fusion.kind", FUSIONS)
    _one_of(config, "model.audio.cell", CELLS)
    _one_of(config, "model.visual.norm", ("none", "group", "layer"))
    _one_of(config, "model.visual.temporal_pool", ("mean", "max", "attention"))
    for key, group in (("conv_backend", m.visual), ("lstm_backend", m.audio)):
        where = f"model.{'visual' if group is m.visual else 'audio'}.{key}"
        backend = group.get(key, "auto")  # absent from older saved configs
        _check(backend in onednn.BACKENDS, where, f"{backend!r} is not one of {onednn.BACKENDS}")
        if backend == "onednn":
            why_not = onednn.unavailable_reason()
            _check(why_not is None, where, f"'onednn' cannot run: {why_not}")
    _one_of(config, "optimizer.name", ("adamw", "sgd"))
    _one_of(config, "optimizer.schedule", ("cosine", "constant"))
    v = m.visual
    _check(
        len(v.widths) == len(v.blocks) == len(v.strides),
        "model.visual",
        f"widths {tuple(v.widths)}, blocks {tuple(v.blocks)} and strides "
        f"{tuple(v.strides)} must have one entry per stage",
    )
    _check(
        all(x > 0 for x in (*v.widths, *v.blocks, *v.strides)),
        "model.visual",
        "widths, blocks and strides must be positive",
    )
    _check(m.num_classes >= 2, "model.num_classes", f"{m.num_classes} < 2")
    _check(0.0 <= m.modality_dropout < 1.0, "model.modality_dropout", "must be in [0, 1)")
    _check(m.audio.get("unroll", 1) >= 1, "model.audio.unroll", "must be >= 1")
    _check(
        len(m.audio.spec_augment) == 4,
        "model.audio.spec_augment",
        "(time masks, max width, mel masks, max width)",
    )
    if m.fusion.kind == "attention":
        _check(
            m.fusion.dim % m.fusion.heads == 0,
            "model.fusion.heads",
            f"fusion.dim {m.fusion.dim} is not divisible by {m.fusion.heads} heads",
        )
    _check(
        d.num_frames >= 1 and d.frame_stride >= 1,
        "data.num_frames",
        "and frame_stride must be >= 1",
    )
    _check(d.fps > 0, "data.fps", "must be positive")
    _check(d.eval_spatial_views in (1, 3), "data.eval_spatial_views", "must be 1 or 3")
    _check(d.eval_temporal_views >= 1, "data.eval_temporal_views", "must be >= 1")
    _check(0 < d.min_crop_scale <= 1, "data.min_crop_scale", "must be in (0, 1]")
    _check(
        audio_samples(config) >= 400,
        "data.audio_samples",
        f"{audio_samples(config)} samples is shorter than one 25 ms log-mel window",
    )
    _check(config.total_steps > 0, "total_steps", "must be positive")
    _check(
        config.accum_steps >= 1 and config.batch_size % config.accum_steps == 0,
        "accum_steps",
        f"must divide batch_size {config.batch_size}",
    )
    _check(o.learning_rate > 0, "optimizer.learning_rate", "must be positive")
    _check(0 <= o.ema_decay < 1, "optimizer.ema_decay", "must be in [0, 1)")
    _check(config.checkpoint.every_steps > 0, "checkpoint.every_steps", "must be positive")
    _check(config.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    if num_devices is not None:
        _check(
            num_devices % config.mesh.fsdp == 0,
            "mesh.fsdp",
            f"{config.mesh.fsdp} does not divide the {num_devices} devices",
        )
        micro = config.batch_size // config.accum_steps
        _check(
            micro % num_devices == 0,
            "batch_size",
            f"micro-batch {micro} (batch_size / accum_steps) is not divisible by "
            f"the {num_devices} devices",
        )
        _check(
            d.eval_batch_size % num_devices == 0,
            "data.eval_batch_size",
            f"{d.eval_batch_size} is not divisible by the {num_devices} devices",
        )


def audio_samples(config: ml_collections.ConfigDict) -> int:
    """Audio samples per clip at 16 kHz: explicit, or the frames' time span."""
    d = config.data
    if d.audio_samples:
        return int(d.audio_samples)
    return round(d.num_frames * d.frame_stride / d.fps * 16_000)


def save(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Write the final config beside the checkpoints, for resumption, eval and export."""
    path = pathlib.Path(workdir) / "config.json"
    path.write_text(config.to_json_best_effort(indent=2, sort_keys=True))


def load(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run in `workdir` was trained with."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sora-train work dir?")
    return ml_collections.ConfigDict(_tuples(json.loads(path.read_text())))


def _tuples(tree):
    """JSON turns tuples into lists; configs use tuples (ConfigDict types are strict)."""
    if isinstance(tree, dict):
        return {k: _tuples(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return tuple(_tuples(v) for v in tree)
    return tree
