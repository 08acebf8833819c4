"""What training, evaluation, export and the benchmarks share, below all of them: config
checks, joining a multi-process run, the mesh, model, optimizer and the sharded layout of
the train state, and loading parameters for inference.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from sora_jax import config as config_lib
from sora_jax import evaluators, models, objectives, storage
from sora_jax.data import pipeline
from sora_jax.inputs import InputSpec
from sora_jax.train import checkpoint, sharding
from sora_jax.train.state import TrainState, init_state, make_optimizer
from sora_jax.workdir import Workdir


def check_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Every key the run depends on, before anything compiles: ConfigError names the
    first one that cannot work."""
    config_lib.validate(config, num_devices)
    models.check_config(config.model)
    evaluators.check(config)
    named_parts = {"init_parts": config.init_parts, "optimizer.freeze": config.optimizer.freeze}
    for key, parts in named_parts.items():
        for part in parts:
            config_lib.one_of(part, key, objectives.parts(config))
    if not config_lib.trains_alignment(config):
        for key, parts in named_parts.items():
            config_lib.check(
                "projection" not in parts,
                key,
                "'projection': only runs with the contrastive objective have projection heads",
            )


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join a multi-process run: from the config, or auto-detected (TPU pods, SLURM) with
    distributed.num_processes=-1. A single process with nothing configured does nothing."""
    d = config.distributed
    if jax.distributed.is_initialized() or not (d.coordinator or d.num_processes == -1):
        return
    # Only matters for CPU devices (tests, laptops); accelerators use their own links.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs = {"heartbeat_timeout_seconds": d.heartbeat_timeout_s}
    if d.coordinator:
        jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)


def check_processes_agree(
    config: ml_collections.ConfigDict, summary: pipeline.DatasetSummary
) -> None:
    """Fail, naming the process, if processes were started with different configs or see
    different datasets (a stale copy on one host): such runs silently diverge."""
    if jax.process_count() == 1:
        return
    as_dict = config.to_dict()
    as_dict.pop("distributed", None)  # process_id differs by design
    facts = {"config": json.dumps(as_dict, sort_keys=True, default=str), "dataset": repr(summary)}
    digest = lambda text: int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1
    mine = np.array([digest(v) for v in facts.values()], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, facts]
    for process, theirs in enumerate(everyone):
        for i, what in enumerate(facts):
            if theirs[i] != everyone[0][i]:
                raise config_lib.ConfigError(
                    f"process {process} has a different {what} from process 0 (this is "
                    f"process {jax.process_index()}): start every process with the same "
                    f"config and the same prepared dataset"
                )


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's static parts: nothing here holds an array."""

    mesh: Mesh
    model: models.SoraModel
    tx: optax.GradientTransformation
    rng: jax.Array
    inputs: InputSpec  # per-clip input sizes
    abstract_state: TrainState  # shapes, dtypes and shardings of the train state
    state_sharding: TrainState  # a NamedSharding per array of the state

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Setup:
    """Mesh, model, optimizer and the sharded layout of the train state, without
    allocating it: shared by the trainer, evaluation, export and the benchmarks."""
    devices = list(jax.devices() if devices is None else devices)
    check_config(config, num_devices=len(devices))
    mesh = sharding.make_mesh(config.mesh.fsdp, devices)
    model = objectives.build_model(config)
    tx = make_optimizer(config)
    rng = jax.random.key(config.seed)
    spec = InputSpec.from_config(config)
    abstract = jax.eval_shape(lambda: init_state(model, tx, spec, config, rng))
    state_sharding = sharding.tree_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    return Setup(mesh, model, tx, rng, spec, abstract, state_sharding)


def check_same_dataset(
    workdir: "str | os.PathLike[str]", summary: pipeline.DatasetSummary, config
) -> None:
    """The data a work dir's run reads now is the data it trained on (WORKDIR/dataset.json,
    written when it started; a run from before it was kept is not checked): another
    dataset behind the same data.dir (renamed classes, other clips) once gave confident,
    wrong answers with exit 0."""
    recorded = Workdir(workdir).dataset
    if not recorded.exists():
        return
    changes = pipeline.dataset_changes(json.loads(recorded.read_text()), summary)
    if changes:
        raise config_lib.ConfigError(
            f"dataset {config.data.name} under {config.data.dir} is not the one the run in "
            f"{workdir} trained on:\n  "
            + "\n  ".join(changes)
            + "\npoint data.dir (--data-dir) at the run's data"
        )


def record_dataset(workdir: "str | os.PathLike[str]", summary: pipeline.DatasetSummary) -> None:
    """Keep what identifies a fresh run's data beside its config (process 0)."""
    storage.write_atomic(Workdir(workdir).dataset, json.dumps(summary.facts(), indent=1))


@dataclasses.dataclass(frozen=True)
class Restored:
    """Parameters loaded from a work dir for inference, and what they run with."""

    setup: Setup
    params: dict
    step: int
    dataset: pipeline.DatasetSummary


def load_for_inference(
    config: ml_collections.ConfigDict,
    workdir: "str | os.PathLike[str]",
    step: int | str | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> Restored:
    """The parameters of a work dir's checkpoint (the latest, a step, or "best" or
    "latest": checkpoint.chosen_step), sharded over the mesh; only the parameters are read
    (checkpoint.restore_params)."""
    summary = pipeline.check_dataset(config)
    check_same_dataset(workdir, summary, config)
    run = build(config, devices)
    manager = checkpoint.make_manager(workdir, config, read_only=True)
    last_eval = Workdir(workdir).eval_result(config.data.eval_split)
    evaluated = {}
    if step == "best" and last_eval.exists():
        result = json.loads(last_eval.read_text())
        evaluated[result.get("step")] = result
    step = checkpoint.chosen_step(manager, step, config.checkpoint.best_metric, evaluated)
    params, step = checkpoint.restore_params(manager, step, run.abstract_state)
    return Restored(run, params, step, summary)
