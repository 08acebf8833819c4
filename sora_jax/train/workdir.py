"""A work dir belongs to one run: one sora-train at a time, and one config for its life.

Two trainers on one work dir once both exited 0 while one run's checkpoints, metrics and
config.json silently replaced the other's; a resume with a changed config trains on from
checkpoints made by another model or objective. Both are refused here, before anything is
compiled or written.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import socket

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sora_jax import config as config_lib

# Keys a resumed run may change: they say how long to train and how often to log, evaluate,
# checkpoint or profile, where the same data lies, and how it is read; none changes what is
# learned up to the checkpoint. (A longer total_steps also stretches the LR schedule:
# the documented way to train on.)
MAY_CHANGE_ON_RESUME = (
    "total_steps",
    "log_every",
    "eval_every",
    "profile_steps",
    "cpu_fast_compile",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "data.dir",
    "data.workers",
    "data.eval_batch_size",
    "distributed",
)


class WorkdirBusyError(RuntimeError):
    """Another live sora-train owns the work dir."""


class Lock:
    """An exclusive lock on WORKDIR/.lock, held while the run trains. The kernel drops it
    when the owner exits, however it exits, so a killed run never leaves it stuck. It
    relies on flock(2): local disks and NFS honour it; some FUSE mounts of object stores do
    not. Process 0 takes it for a multi-process run, and every process learns whether it
    got it, so all stop together. A work dir the lock created is removed on release if
    the run wrote nothing into it (it failed a check first)."""

    def __init__(self, workdir: str | pathlib.Path):
        self.path = pathlib.Path(workdir) / ".lock"
        self._file = None
        self._created = not self.path.parent.exists()
        owner = ""
        if jax.process_index() == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a+")
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.seek(0)
                owner = self._file.read().strip() or "another process"
                self._file.close()
                self._file = None
            else:
                self._file.truncate(0)
                self._file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                self._file.flush()
        busy = bool(owner)
        if jax.process_count() > 1:
            busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
        if busy:
            raise WorkdirBusyError(
                f"{self.path.parent} is in use by another sora-train ({owner or 'see process 0'}): "
                "wait for it to finish, or give this run another --workdir"
            )

    def release(self) -> None:
        if self._file is None:
            return
        if self._created and [p.name for p in self.path.parent.iterdir()] == [".lock"]:
            self.path.unlink()  # while still held: any other opener was refused
            with contextlib.suppress(OSError):  # unless something arrived meanwhile
                self.path.parent.rmdir()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in MAY_CHANGE_ON_RESUME:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """A run resuming from checkpoints keeps the config it was started with (but for
    MAY_CHANGE_ON_RESUME); the differences are all named at once, with both values."""
    if not (workdir / "config.json").exists() or not (workdir / "checkpoints").is_dir():
        return
    as_json = lambda c: json.loads(c.to_json_best_effort(sort_keys=True))
    before = _flat(as_json(config_lib.load(workdir)))
    now = _flat(as_json(config))
    shown = lambda flat, key: repr(flat[key]) if key in flat else "(no such key)"
    changed = [
        f"config.{key}: {shown(before, key)} in the run, {shown(now, key)} now"
        for key in sorted(before.keys() | now.keys())
        if before.get(key) != now.get(key) and key not in MAY_CHANGE_ON_RESUME
    ]
    if changed:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with another config, which this one would resume:\n  "
            + "\n  ".join(changed)
            + "\nstart a new --workdir, or pass --allow_config_change to resume it with this one"
        )
