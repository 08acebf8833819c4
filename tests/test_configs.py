"""Every config in configs/: validated, built and traced abstractly (no compile, no data),
as written and as its `runlocal` preset; the checks name the key that cannot work."""

import importlib
import pathlib
import re
import types

import jax
import ml_collections
import pytest

from sora_jax import config as config_lib
from sora_jax.train import fit, setup
from sora_jax.train.step import abstract_batch, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


def _load(name: str, preset: str | None) -> ml_collections.ConfigDict:
    module = importlib.import_module(f"configs.{name}")
    return module.get_config() if name == "base" else module.get_config(preset)


@pytest.mark.parametrize("preset", [None, "runlocal"])
@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_validates_and_its_train_step_traces(name, preset):
    config = _load(name, preset)
    devices = jax.devices()[: max(config.mesh.fsdp, 1)]
    run = setup.build(config, devices)  # checks every key first
    batch = abstract_batch(config, run.inputs, config.batch_size, run.batch_sharding)
    step = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    state, metrics = jax.eval_shape(step, run.abstract_state, batch)
    assert metrics["loss"].shape == ()
    # The step returns a state of the shapes it was given (setup.build traced init_state).
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
    assert shapes(state) == shapes(run.abstract_state)


def test_runlocal_shrinks_any_config_to_a_laptop_run():
    for name in CONFIGS:
        if name == "base":
            continue
        config = _load(name, "runlocal")
        assert config.batch_size <= 8 and config.total_steps <= 20, name
        assert max(config.model.visual.widths) <= 16 and config.data.workers == 0, name
    with pytest.raises(ValueError, match="unknown preset 'tiny'"):
        _load("demo", "tiny")


def test_wide_widens_the_first_stage_to_the_second_and_changes_nothing_else():
    wide, plain = _load("kinetics_sounds", "wide"), _load("kinetics_sounds", None)
    assert tuple(wide.model.visual.widths) == (128, 128, 256, 512)
    wide.model.visual.widths = plain.model.visual.widths
    assert wide.to_dict() == plain.to_dict()
    assert tuple(_load("demo", "wide").model.visual.widths) == (32, 32, 64)


# Keys no other check would catch before they crash or silently misbehave: each with a
# bad value, and the text the error must hold besides the key.
BAD_VALUES = [
    ("log_every", 0, ">= 1"),
    ("eval_every", -1, ">= 0"),
    ("checkpoint.best_metric", "top_1", "not one of"),
    ("checkpoint.every_steps", 0, ">= 1"),
    ("data.workers", -1, ">= 0"),
    ("data.crop_size", 4, "not in [8, 1024]"),
    ("data.eval_batch_size", 0, ">= 1"),
    ("batch_size", 0, ">= 1"),
    ("mesh.fsdp", 0, ">= 1"),
    ("optimizer.warmup_steps", -5, ">= 0"),
    ("optimizer.momentum", 1.0, "[0, 1)"),
    ("profile_steps", (5, 2), "first <= last"),
    ("distributed.cpu_collectives", "nccl", "not one of"),
    ("export.platforms", ("cpu", "metal"), "not one of"),
    ("model.audio.hidden", 0, ">= 1"),
    ("model.visual.norm", "batch", "not one of"),
    ("model.fusion.kind", "sum", "not one of"),
    ("model.dtype", "float16", "not one of"),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_a_bad_value_names_its_key(key, value, message):
    config = _load("demo", None)
    *parents, leaf = key.split(".")
    group = config
    for part in parents:
        group = group[part]
    group[leaf] = value
    with pytest.raises(config_lib.ConfigError, match=rf"config\.{key}: .*{re.escape(message)}"):
        setup.check_config(config)


def test_fsdp_that_does_not_divide_the_devices_is_named_before_the_mesh_is_built():
    config = _load("demo", "runlocal")
    config.mesh.fsdp = 3
    with pytest.raises(config_lib.ConfigError, match=r"config\.mesh\.fsdp: 3 does not divide"):
        setup.build(config, jax.devices()[:8])


def test_runlocal_compiles_its_steps_fast_on_the_cpu_only():
    """runlocal's few steps compile without LLVM's optimisations (fit.CPU_FAST_COMPILE);
    full configs, and every run on an accelerator, compile with XLA's defaults."""
    cpu = jax.devices()[:1]
    runlocal = _load("demo", "runlocal").cpu_fast_compile
    assert fit.compiler_options(cpu, runlocal) == fit.CPU_FAST_COMPILE
    assert fit.compiler_options(cpu, _load("demo", None).cpu_fast_compile) == {}
    tpu = types.SimpleNamespace(platform="tpu")  # a TPU device, as far as this reads
    assert fit.compiler_options([tpu], runlocal) == {}
