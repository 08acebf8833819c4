"""Starting a run from another run's parameters: `config.init_from` and `init_parts`.

The source is a sora-train work dir (its latest checkpoint), one of its step dirs
(WORKDIR/checkpoints/STEP) or a sora-export dir. Its parameters are read to the host
whatever mesh wrote them, then laid out as this run's state is, part by part: the
visual tower, the audio branch, the fusion head, the classifier ("head") and the
contrastive projection heads (`models.PARTS`). A classifier for another number of
classes starts anew; any other difference fails, naming the parameter and both shapes.
"""

import json
import logging
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from sora_jax import config as config_lib
from sora_jax import models, objectives, storage
from sora_jax.inputs import InputSpec
from sora_jax.train import checkpoint
from sora_jax.workdir import Workdir

log = logging.getLogger("sora_jax")


def _source_config(path: epath.Path) -> tuple[ml_collections.ConfigDict, str]:
    """(the source's config, what kind of source it is)."""
    if (path / "model_card.json").exists() and (path / "params").is_dir():
        card = json.loads((path / "model_card.json").read_text())
        return config_lib.from_dict(card["config"]), "export"
    if Workdir(path).config.exists():
        return config_lib.load(path), "workdir"
    step_of = Workdir(path.parent.parent)
    if path.name.isdigit() and os.fspath(path.parent) == os.fspath(step_of.checkpoints):
        return config_lib.load(step_of), "step"
    raise FileNotFoundError(
        f"config.init_from: {path} is not a sora-train work dir, a step dir "
        f"(WORKDIR/checkpoints/STEP) or a sora-export dir"
    )


def load_source(path: "str | os.PathLike[str]") -> tuple[dict, str]:
    """(the source's inference parameters as NumPy arrays, a description for the log);
    `path` local or in a bucket."""
    path = storage.absolute(path)
    if not path.exists():
        raise FileNotFoundError(f"config.init_from: {path} does not exist")
    source_config, kind = _source_config(path)
    if kind == "export":
        params = ocp.StandardCheckpointer().restore(path / "params")
        return jax.tree.map(np.asarray, params), f"the export {path}"
    workdir, step = (path, None) if kind == "workdir" else (path.parent.parent, int(path.name))
    model = objectives.build_model(source_config)
    spec = InputSpec.from_config(source_config)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), models.dummy_inputs(spec), modality_embeddings=True)[
            "params"
        ]
    )
    manager = checkpoint.make_manager(workdir, source_config, read_only=True)
    try:
        ema = source_config.optimizer.ema_decay > 0
        params, step = checkpoint.restore_params_to_host(manager, step, abstract, ema)
    finally:
        manager.close()
    return params, f"step {step} of {workdir}"


def _flatten(tree: Any) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): leaf for path, leaf in leaves}


def _plan(
    wanted: dict[tuple[str, ...], tuple[int, ...]],
    available: dict[tuple[str, ...], Any],
    parts: tuple[str, ...],
    origin: str,
) -> tuple[list[tuple[str, ...]], bool]:
    """(the paths of this run's parameters to take from the source, whether the
    classifier starts anew), from shapes alone; a part the model lacks, a parameter the
    source lacks or a shape that differs is a ConfigError naming it."""
    absent = sorted(set(parts) - {models.param_part(p) for p in wanted})
    if absent:
        raise config_lib.ConfigError(
            f"config.init_parts: this run's model has no {absent} parameters to load "
            f"(projection heads exist only in runs with the contrastive objective)"
        )
    # A classifier for another class count is this run's own, as initialised.
    head = [p for p in wanted if models.param_part(p) == "head"]
    new_head = "head" in parts and any(
        p not in available or tuple(available[p].shape) != wanted[p] for p in head
    )
    load = []
    for path, shape in wanted.items():
        part = models.param_part(path)
        if part not in parts or (part == "head" and new_head):
            continue
        name = "/".join(path)
        if path not in available:
            raise config_lib.ConfigError(
                f"config.init_parts: {part} parameter {name} is not in {origin} (a run "
                f"without that part, or another architecture); leave {part!r} out"
                + (
                    ", or set model.visual.conv_bias_before_norm=False as that run has it"
                    if _is_conv_bias(name)
                    else ""
                )
            )
        if tuple(available[path].shape) != shape:
            raise config_lib.ConfigError(
                f"config.init_from: parameter {name} has shape "
                f"{tuple(available[path].shape)} in {origin} but {shape} in this run's model"
            )
        load.append(path)
    # A parameter of a loaded part that this run's model lacks would be dropped silently.
    extra = sorted(
        "/".join(path)
        for path in available
        if path not in wanted
        and models.param_part(path) in parts
        and not (models.param_part(path) == "head" and new_head)
    )
    if extra:
        conv_bias = any(_is_conv_bias(name) for name in extra)
        raise config_lib.ConfigError(
            f"config.init_from: {origin} has parameters this run's model lacks, which would "
            f"be dropped: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}"
            + (
                " (that run has a bias on the convs its norms follow: set "
                "model.visual.conv_bias_before_norm=True to load it whole)"
                if conv_bias
                else " (another architecture; leave its part out of config.init_parts)"
            )
        )
    return load, new_head


def _is_conv_bias(name: str) -> bool:
    """A bias of one of the visual tower's convs (models/visual.py ConvBlock)."""
    return re.search(r"^visual/.*/(conv_\w+|shortcut_proj)/bias$", name) is not None


def _shapes(params: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {path: tuple(leaf.shape) for path, leaf in _flatten(params).items()}


def check(abstract_params: Any, config: ml_collections.ConfigDict) -> tuple[dict, str]:
    """`config.init_from` read and held against this run's parameters (shapes only, so
    before anything is compiled): a missing source, part or parameter, or a shape that
    differs, fails here. Returns the source (`load_source`) for `initialise_from`."""
    source, origin = load_source(config.init_from)
    _plan(_shapes(abstract_params), _flatten(source), tuple(config.init_parts), origin)
    return source, origin


def merge(params: Any, source: dict, parts: tuple[str, ...], origin: str) -> Any:
    """`params` (this run's, sharded) with the leaves of `parts` taken from `source`
    (NumPy), each put on the devices as the leaf it replaces is."""
    wanted, available = _flatten(params), _flatten(source)
    paths, new_head = _plan(_shapes(params), available, parts, origin)
    if new_head:
        log.info("init_from: the classifier differs in shape from %s's: initialised anew", origin)
    loaded = {}
    for path in paths:
        leaf = wanted[path]
        value = np.asarray(available[path], leaf.dtype)
        loaded[path] = jax.make_array_from_callback(
            leaf.shape, leaf.sharding, lambda index, v=value: v[index]
        )
    log.info(
        "init_from: loaded %d parameter arrays (%s) from %s",
        len(loaded),
        ", ".join(sorted({models.param_part(p) for p in loaded})),
        origin,
    )
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: loaded.get(tuple(k.key for k in path), leaf), params
    )


def initialise_from(
    state: Any, config: ml_collections.ConfigDict, source: tuple[dict, str] | None = None
) -> Any:
    """A freshly initialised TrainState with `config.init_parts` loaded from
    `config.init_from` (its EMA too, when the run keeps one); `source`: what `check`
    already read, else it is read now."""
    params, origin = source or load_source(config.init_from)
    params = merge(state.params, params, tuple(config.init_parts), origin)
    ema = None if state.ema_params is None else jax.tree.map(lambda x: x.copy(), params)
    return state.replace(params=params, ema_params=ema)
