"""A lease on one bucket object: how one process owns something in a bucket, which has no
flock. The work dir's lock (train/ownership.py) and sora-prep's per-dataset lock hold one.
"""

import contextlib
import json
import logging
import os
import socket
import threading
import time

from sora_jax import process

log = logging.getLogger("sora_jax")

# A lease's life (s) unless renewed: how long a killed owner on another host keeps what it
# held from the next process. The owner renews it every third of that.
LEASE_S = 60.0


class BucketLease:
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
        self._thread = threading.Thread(target=self._renew, name=f"lease {self.url}", daemon=True)
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
