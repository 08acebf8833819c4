"""A work dir belongs to one run: one sora-train at a time, and one config for its life.

Two trainers on one work dir once both exited 0 while one run's checkpoints, metrics and
config.json silently replaced the other's; a resume with a changed config trains on from
checkpoints made by another model or objective. Both are refused here, before anything is
compiled or written.
"""

import contextlib
import fcntl
import json
import logging
import os
import socket

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sora_jax import config as config_lib
from sora_jax.lease import LEASE_S, BucketLease
from sora_jax.workdir import Workdir

log = logging.getLogger("sora_jax")

# Keys a resumed run may change: they say how long to train and how often to log, evaluate,
# checkpoint or profile, where the same data lies, and how it is read; none changes what is
# learned up to the checkpoint. (A longer total_steps also stretches the LR schedule: the
# documented way to train on. Not data.workers: the data reader's saved position is one per
# worker, and grain cannot carry it to another count.)
MAY_CHANGE_ON_RESUME = (
    "total_steps",
    "log_every",
    "eval_every",
    "profile_steps",
    "cpu_fast_compile",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "data.dir",
    "data.eval_batch_size",
    "distributed",
    "evals",  # what is measured, never what is learned
)


class WorkdirBusyError(RuntimeError):
    """Another live sora-train owns the work dir."""


class Lock:
    """The work dir's one owner, held while the run trains. On a local disk an exclusive
    flock(2) on WORKDIR/.lock and on the folder itself, which the kernel drops however the
    owner exits. In a bucket
    (no flock there) a lease: WORKDIR/.lock created only if absent and renewed by its
    owner; a dead owner's expires after `lease_s`, at once if it was on this host. Process
    0 takes it for a multi-process run, and every process learns whether it got it, so all
    stop together. A local work dir the lock created is removed on release if the run wrote
    nothing into it (it failed a check first)."""

    def __init__(self, workdir: "str | os.PathLike[str]", lease_s: float = LEASE_S):
        workdir = Workdir(workdir)
        self.path = workdir.lock
        self._file = None
        self._lease: BucketLease | None = None
        owner = ""
        if jax.process_index() == 0:
            if workdir.remote:
                self._lease = BucketLease(os.fspath(self.path), lease_s)
                owner = self._lease.acquire()
            else:
                owner = self._flock()
        busy = bool(owner)
        if jax.process_count() > 1:
            busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
        if busy:
            raise WorkdirBusyError(
                f"{workdir} is in use by another sora-train ({owner or 'see process 0'}): "
                "wait for it to finish, or give this run another --workdir"
            )

    def _flock(self) -> str:
        self._created = not self.path.parent.exists()
        self._folder: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(os.fspath(self.path), "a+")  # noqa: SIM115 (held until release)
        except OSError as e:  # a folder in its place, a read-only or immutable file, ...
            raise WorkdirBusyError(
                f"cannot take the work dir's lock {self.path}: {e.strerror}"
            ) from e
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            self._file = None
            return owner
        # The folder too: `rm WORKDIR/.lock` under a running owner would otherwise let a
        # second trainer lock a new file. (A filesystem that cannot lock a folder, as NFS,
        # keeps the file's lock alone.)
        try:
            self._folder = os.open(os.fspath(self.path.parent), os.O_RDONLY | os.O_DIRECTORY)
            fcntl.flock(self._folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._folder)
            self._folder = None
            self._file.close()
            self._file = None
            return "another process, whose .lock file was removed while it ran"
        except OSError:
            if self._folder is not None:
                os.close(self._folder)
            self._folder = None
        self._file.truncate(0)
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self._file.flush()
        return ""

    @property
    def lost(self) -> bool:
        """The lease could not be renewed and another process holds it now (process 0)."""
        return self._lease is not None and self._lease.lost

    def release(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        if self._file is None:
            return
        if self._created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
            self.path.unlink()  # while still held: any other opener was refused
            with contextlib.suppress(OSError):  # unless something arrived meanwhile
                self.path.parent.rmdir()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None
        if self._folder is not None:
            os.close(self._folder)  # drops its lock
            self._folder = None


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in MAY_CHANGE_ON_RESUME:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in MAY_CHANGE_ON_RESUME)


def check_config_unchanged(
    config: ml_collections.ConfigDict, workdir: "str | os.PathLike[str]"
) -> None:
    """A run resuming from checkpoints keeps the config it was started with (but for
    MAY_CHANGE_ON_RESUME); the differences are all named at once, with both values."""
    workdir = Workdir(workdir)
    if not workdir.config.exists() or not workdir.has_checkpoints():
        return
    as_json = lambda c: json.loads(c.to_json_best_effort(sort_keys=True))
    before = _flat(as_json(config_lib.load(workdir)))
    now = _flat(as_json(config))
    shown = lambda flat, key: repr(flat[key]) if key in flat else "(no such key)"
    changed = [
        f"config.{key}: {shown(before, key)} in the run, {shown(now, key)} now"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and not _may_change(key)
    ]
    if changed:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with another config, which this one would resume:\n  "
            + "\n  ".join(changed)
            + "\nstart a new --workdir, or pass --allow_config_change to resume it with this one"
        )
