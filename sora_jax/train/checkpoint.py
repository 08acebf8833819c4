"""orbax checkpoints of the train state and the data iterator, in `WORKDIR/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it
when complete), so a process killed at any moment leaves the previous checkpoint as the
readable latest one. Kept: the last `keep` checkpoints plus the best by `best_metric`.
"""

import pathlib
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sora_jax.train.state import TrainState


def make_manager(
    workdir: str | pathlib.Path, config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
    c = config.checkpoint
    preservation = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=c.keep),
            policies.BestN(
                get_metric_fn=lambda metrics: metrics[c.best_metric],
                reverse=False,
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    # Readers (eval, export) open without creating anything; orbax's own read_only mode
    # would do too, but warns on every open.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=not read_only,
        create=not read_only,
    )
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    return ocp.CheckpointManager(directory, options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: Any,  # a pytree: the TrainState
    iterator: grain.DatasetIterator | None = None,
    metrics: dict | None = None,
) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(iterator)
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def _abstract(abstract_state: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), abstract_state
    )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: TrainState,
    iterator: grain.DatasetIterator | None = None,
) -> TrainState:
    """The state at `step`, laid out as `abstract_state`'s shardings say; the iterator,
    if given, is moved to where it was when that checkpoint was written."""
    items = {"state": ocp.args.StandardRestore(_abstract(abstract_state))}
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_params(
    manager: ocp.CheckpointManager,
    step: int | None,
    abstract_state: TrainState,
    use_ema: bool = True,
) -> tuple[dict, int]:
    """Only the parameters to evaluate (the EMA ones when the run kept them): the
    optimizer state (twice the parameters' size with Adam) and the other copy of the
    parameters are never read, so a changed optimizer config does not matter either.
    `manager` must be one that only restores this way (orbax binds a manager to one
    handler per item), as `make_manager(read_only=True)`."""
    wanted = "ema_params" if use_ema and abstract_state.ema_params is not None else "params"
    target = _abstract(getattr(abstract_state, wanted))
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), target
    )
    return _restore_subtree(manager, step, wanted, target, restore_args)


def restore_params_to_host(
    manager: ocp.CheckpointManager, step: int | None, abstract_params: Any, ema: bool
) -> tuple[dict, int]:
    """A checkpoint's parameters (the EMA ones if `ema`) as NumPy arrays on this host,
    whatever mesh wrote them: for starting another run from them (train/transfer.py)."""
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract_params)
    return _restore_subtree(
        manager, step, "ema_params" if ema else "params", abstract_params, restore_args
    )


def _restore_subtree(
    manager: ocp.CheckpointManager, step: int | None, name: str, target: Any, restore_args: Any
) -> tuple[Any, int]:
    """One subtree of the saved state (the latest checkpoint's, or `step`'s); nothing else
    is read."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # partial_restore: read the one subtree in `target`, whatever else the state holds.
    item = ocp.args.PyTreeRestore(
        item={name: target}, restore_args={name: restore_args}, partial_restore=True
    )
    return manager.restore(step, args=ocp.args.Composite(state=item))["state"][name], step
