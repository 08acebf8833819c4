"""orbax checkpoints of the train state and the data iterator, in `WORKDIR/checkpoints`.

Saves are asynchronous and atomic (orbax writes to a temporary directory and renames it
when complete), so a process killed at any moment leaves the previous checkpoint as the
readable latest one. Kept: the last `keep` checkpoints plus the best by `best_metric`.

Atomic is not intact: orbax reads flipped bytes back without a word (parameters of NaN
and 3e38, a top-1 fallen from 1.0 to 0.25). So each finished checkpoint gets the SHA-256
of every file in it (`sealed`), checked before any restore; a corrupt latest checkpoint
is passed over for the newest intact one, saying so, by resume, eval and export alike.
A checkpoint without digests (written by an older version, or the trainer was killed
between orbax finishing it and the digests being written) is used unchecked.
"""

import hashlib
import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from sora_jax import storage
from sora_jax.train.state import TrainState
from sora_jax.workdir import Workdir

log = logging.getLogger("sora_jax")

DIGESTS = "sora_sha256.json"  # in each checkpoint's folder, beside orbax's files


class CorruptCheckpointError(RuntimeError):
    """No intact checkpoint to restore (the one asked for, or all of them, are corrupt)."""


class OutOfSpaceError(RuntimeError):
    """The work dir's disk cannot hold the next checkpoint: stopped before writing it."""


_SPARE_BYTES = 1 << 20  # beside a checkpoint's arrays: metadata, the data state, digests


def make_manager(
    workdir: "str | os.PathLike[str]", config: ml_collections.ConfigDict, read_only: bool = False
) -> ocp.CheckpointManager:
    c = config.checkpoint
    # Every checkpoint's scores are written with it (as orbax does once best_fn is set), so
    # the best one is known after a restart too; one never evaluated ranks last.
    score = lambda metrics: metrics.get(c.best_metric, float("-inf"))
    preservation = policies.AnyPreservationPolicy(
        [
            policies.LatestN(n=c.keep),
            policies.BestN(get_metric_fn=score, reverse=False, n=1),
        ]
    )
    # Readers (eval, export) open without creating anything; orbax's own read_only mode
    # would do too, but warns on every open.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        best_fn=score,
        enable_async_checkpointing=not read_only,
        create=not read_only,
    )
    return ocp.CheckpointManager(Workdir(workdir).checkpoints, options=options)


class Writer:
    """Saves a run's checkpoints (asynchronously) and seals the ones it saved: a
    checkpoint's digests are written only by the process that wrote it, once orbax has
    finished it. A checkpoint found without digests (its writer was killed before sealing
    it, or an older version wrote it) is never sealed afterwards: digests of bytes nobody
    saw written would vouch for whatever the disk now holds."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.written: set[int] = set()

    def save(
        self,
        step: int,
        state: Any,  # a pytree: the TrainState
        iterator: grain.DatasetIterator | None = None,
        metrics: dict | None = None,
    ) -> None:
        """Start writing checkpoint `step`; the ones before it are sealed first (orbax
        would wait for them to finish here anyway). OutOfSpaceError, before anything is
        written, when the disk cannot hold it: a write that fails half way fills orbax's
        background threads with tracebacks, and the disk with a checkpoint that is none."""
        self.seal()
        self._check_space(step, state)
        items = {"state": ocp.args.StandardSave(state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics or {}, force=True)
        self.written.add(step)

    def _check_space(self, step: int, state: Any) -> None:
        free = storage.free_bytes(epath.Path(self.manager.directory))
        arrays = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if hasattr(x, "size")
        )
        needed = int(1.1 * arrays / jax.process_count()) + _SPARE_BYTES  # its own shards
        short = free is not None and free < needed
        if jax.process_count() > 1:  # a checkpoint is collective: all stop, or none
            short = bool(np.asarray(multihost_utils.process_allgather(np.int32(short))).any())
        if short:
            last = max(self.manager.all_steps(), default=None)
            kept = f"the last checkpoint, step {last}, is intact" if last else "none written yet"
            free_mb = "?" if free is None else f"{free / 2**20:.0f}"
            raise OutOfSpaceError(
                f"{self.manager.directory} has {free_mb} MB free, checkpoint {step} needs about "
                f"{needed / 2**20:.0f} MB: stopped without writing it ({kept}); free some space "
                "and rerun the same command"
            )

    def seal(self) -> None:
        """Wait for the checkpoint being written, then record the digests of every one this
        writer saved that is still there (process 0 writes them, once all have finished)."""
        self.manager.wait_until_finished()
        if jax.process_index() != 0:
            return
        for step in sorted(self.written & set(self.manager.all_steps())):
            record = _step_dir(self.manager, step) / DIGESTS
            if not record.exists():
                storage.write_atomic(record, json.dumps(_digests(record.parent), indent=0))


def _step_dir(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    return epath.Path(manager.directory) / str(step)


def _digests(folder: epath.Path) -> dict[str, str]:
    digests = {}
    for name in storage.files_under(folder):
        if not name.startswith((DIGESTS, f".{DIGESTS}")):  # the record, or a killed write of it
            with (folder / name).open("rb") as f:
                digests[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


UNSEALED = "has no digests"  # problem_with's reason for a checkpoint nobody sealed


def problem_with(manager: ocp.CheckpointManager, step: int) -> str | None:
    """Why checkpoint `step` cannot be used, or None when it is intact: a file changed or
    missing since its digests were written, or no digests at all (it cannot be checked)."""
    folder = _step_dir(manager, step)
    record = folder / DIGESTS
    if not record.exists():
        return (
            f"{UNSEALED}: its writer did not seal it (killed before it could, or a version "
            "before digests wrote it), so its bytes cannot be checked"
        )
    try:
        recorded = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{record} is damaged"
    actual = _digests(folder)
    for name, digest in recorded.items():
        if name not in actual:
            return f"{folder / name} is missing"
        if actual[name] != digest:
            return f"{folder / name} changed after it was written"
    return None


def intact_step(manager: ocp.CheckpointManager, step: int | None = None) -> int | None:
    """`step` if it is intact (CorruptCheckpointError if not); without `step`, the newest
    intact checkpoint, warning about each newer one passed over; None if there is none, or
    only one without digests (its run was killed before sealing its first checkpoint).
    CorruptCheckpointError when checkpoints exist and none is intact."""
    if step is not None:
        problem = problem_with(manager, step)
        if problem:
            raise CorruptCheckpointError(f"checkpoint {step} {_verdict(problem)}: {problem}")
        return step
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        problem = problem_with(manager, step)
        if problem is None:
            return step
        log.warning("checkpoint %d %s (%s): passing over it", step, _verdict(problem), problem)
    if len(steps) == 1 and problem.startswith(UNSEALED):
        return None  # a run killed while sealing its first checkpoint: it starts again
    if steps:
        raise CorruptCheckpointError(
            f"no checkpoint in {manager.directory} is intact (steps {sorted(steps)}: corrupt or "
            "unverified). One without digests, written by a version before them, can be "
            "adopted if you trust its bytes: python -m sora_jax.train.checkpoint --seal "
            "WORKDIR STEP"
        )
    return None


def _verdict(problem: str) -> str:
    return "is unverified" if problem.startswith(UNSEALED) else "is corrupt"


def chosen_step(
    manager: ocp.CheckpointManager,
    which: int | str | None,
    metric: str,
    evaluated: dict[int, dict] | None = None,
) -> int | None:
    """The step `which` names: an int as it is, None or "latest" for the newest intact
    checkpoint (None again), "best" for the intact checkpoint with the highest `metric`
    among those evaluated: the scores saved with each checkpoint, and `evaluated` (step ->
    result, e.g. the final evaluation, made after its checkpoint was saved)."""
    if which is None or which == "latest":
        return None
    if which != "best":
        return int(which)
    scores = {s: (manager.metrics(s) or {}).get(metric) for s in manager.all_steps()}
    for step, result in (evaluated or {}).items():
        if step in scores and metric in result:
            scores[step] = result[metric]
    ranked = sorted((v, s) for s, v in scores.items() if v is not None)
    if not ranked:
        raise FileNotFoundError(
            f"no checkpoint in {manager.directory} was evaluated, so none is best by "
            f"{metric}: evaluate during training (config.eval_every), or name a step"
        )
    for _, step in reversed(ranked):
        problem = problem_with(manager, step)
        if problem is None:
            return step
        log.warning("checkpoint %d is corrupt (%s): passing over it for best", step, problem)
    raise CorruptCheckpointError(f"every evaluated checkpoint in {manager.directory} is corrupt")


def set_aside_newer_than(
    manager: ocp.CheckpointManager, step: int | None, workdir: "str | os.PathLike[str]"
) -> None:
    """Move the checkpoints after `step` (corrupt, or unverified: without digests) to
    WORKDIR/corrupt_checkpoints or WORKDIR/unverified_checkpoints, so the resumed run can
    write those steps again and nothing is deleted (a step set aside before keeps its
    place: the next one goes beside it as STEP.2, STEP.3, ...)."""
    newer = [s for s in manager.all_steps() if step is None or s > step]
    if newer and jax.process_count() > 1:  # every process has checked them before any move
        multihost_utils.sync_global_devices("corrupt checkpoints found")
    if newer and jax.process_index() == 0:
        for s in newer:
            unsealed = not (_step_dir(manager, s) / DIGESTS).exists()
            wd = Workdir(workdir)
            aside = wd.unverified_checkpoints if unsealed else wd.corrupt_checkpoints
            aside.mkdir(parents=True, exist_ok=True)
            target, copy = aside / str(s), 1
            while target.exists():
                copy += 1
                target = aside / f"{s}.{copy}"
            storage.move_tree(_step_dir(manager, s), target)
            kind = "unverified" if unsealed else "corrupt"
            log.warning("moved %s checkpoint %d to %s", kind, s, target)
    if newer:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("corrupt checkpoints set aside")
        manager.reload()


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
    step = intact_step(manager, step)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    # partial_restore: read the one subtree in `target`, whatever else the state holds.
    item = ocp.args.PyTreeRestore(
        item={name: target}, restore_args={name: restore_args}, partial_restore=True
    )
    return manager.restore(step, args=ocp.args.Composite(state=item))["state"][name], step


def _seal_by_hand(argv: list[str] | None = None) -> int:
    """python -m sora_jax.train.checkpoint --seal WORKDIR STEP: write the digests of a
    checkpoint that has none (from a version before digests), vouching for its bytes."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sora_jax.train.checkpoint")
    parser.add_argument("--seal", nargs=2, metavar=("WORKDIR", "STEP"), required=True)
    workdir, step = parser.parse_args(argv).seal
    folder = Workdir(workdir).checkpoints / step
    record = folder / DIGESTS
    if not folder.is_dir():
        parser.error(f"no checkpoint {folder}")
    if record.exists():
        parser.error(f"{folder} is sealed already")
    storage.write_atomic(record, json.dumps(_digests(folder), indent=0))
    print(f"sealed {folder}: from now on it is checked against these digests")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_seal_by_hand())
