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
import threading
import time

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sora_jax import config as config_lib
from sora_jax import process
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
)

# A bucket lease's life (s) unless renewed: how long a killed owner on another host keeps
# a work dir from the next run. The owner renews it every third of that.
LEASE_S = 60.0


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
        self._lease: _BucketLease | None = None
        owner = ""
        if jax.process_index() == 0:
            if workdir.remote:
                self._lease = _BucketLease(os.fspath(self.path), lease_s)
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


class _BucketLease:
    """A lease on one object: created with the precondition "no such object yet" (GCS's
    generation 0), renewed by rewriting it on the precondition "the generation I wrote last",
    so two writers can never both succeed. It records its owner and when it expires; a
    waiter takes over an expired lease by the same precondition. Expiry is wall-clock time:
    hosts' clocks must agree to well within the lease (NTP keeps cloud VMs within ms)."""

    def __init__(self, url: str, lease_s: float):
        from google.cloud import storage as gcs

        bucket, name = url.removeprefix("gs://").split("/", 1)
        self.url, self.lease_s = url, lease_s
        self._blob = gcs.Client(project=None).bucket(bucket).blob(name)
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> str:
        return json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "expires": time.time() + self.lease_s,
            }
        )

    def _write(self, generation: int) -> bool:
        from google.api_core import exceptions

        try:
            self._blob.upload_from_string(self._record(), if_generation_match=generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return False
        self._generation = self._blob.generation
        return True

    def acquire(self) -> str:
        """ "" if this process holds the lease now, else who does."""
        from google.api_core import exceptions

        for _ in range(3):  # the holder may release or renew between our read and write
            if self._write(0):
                break
            try:
                held, generation = self._blob.download_as_text(), None
                self._blob.reload()
                generation = self._blob.generation
            except exceptions.NotFound:
                continue  # released meanwhile: try to create it again
            try:
                holder = json.loads(held)
                expired = holder["expires"] < time.time()
                dead_here = holder["host"] == socket.gethostname() and not process.alive(
                    holder["pid"]
                )
                who = f"pid {holder['pid']} on {holder['host']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                expired, dead_here, who = True, False, "an unreadable lease"
            if not (expired or dead_here):
                left = holder["expires"] - time.time()
                return f"{who}, whose lease on {self.url} runs {left:.0f} s more unless renewed"
            log.warning(
                "taking over %s from %s (%s)",
                self.url,
                who,
                "expired" if expired else "no longer running",
            )
            if self._write(generation):
                break
        else:
            return "another process that took the lease meanwhile"
        self._thread = threading.Thread(target=self._renew, name="workdir-lease", daemon=True)
        self._thread.start()
        return ""

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                renewed = self._write(self._generation)
            except Exception as e:  # a passing network fault: the lease has time left
                log.warning("could not renew the lease on %s (%s); retrying", self.url, e)
                continue
            if not renewed:
                self.lost = True
                log.error("lost the lease on %s to another process: stopping", self.url)
                return

    def release(self) -> None:
        from google.api_core import exceptions

        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._generation is not None and not self.lost:
            with contextlib.suppress(exceptions.PreconditionFailed, exceptions.NotFound):
                self._blob.delete(if_generation_match=self._generation)


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix + key not in MAY_CHANGE_ON_RESUME:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


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
        if before.get(key) != now.get(key) and key not in MAY_CHANGE_ON_RESUME
    ]
    if changed:
        raise config_lib.ConfigError(
            f"{workdir} holds a run with another config, which this one would resume:\n  "
            + "\n  ".join(changed)
            + "\nstart a new --workdir, or pass --allow_config_change to resume it with this one"
        )
