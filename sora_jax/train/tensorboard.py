"""TensorBoard scalars written without TensorFlow.

`flax.metrics.tensorboard` imports all of TensorFlow to write a few scalars: 2.3 s of
start-up and 480 MB of host memory (measured here) in every training process, and
TensorFlow's start-up log lines. The event file is a TFRecord file of `Event` protos;
the `tensorboard` package has both the protos and the record framing, without
TensorFlow.

In a bucket, where an object cannot be appended to, the events go to a local file that is
uploaded whole at each flush (scalars only: a few MB for a long run), so TensorBoard reading
the bucket follows the run as it trains.
"""

import itertools
import os
import socket
import tempfile
import time

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

from sora_jax import storage

_WRITERS = itertools.count()  # unique file names for writers opened in the same second


class ScalarWriter:
    """Appends scalars to a new event file in `logdir` (one file per writer, as
    TensorBoard expects: a resumed run adds a file beside the earlier ones)."""

    def __init__(self, logdir: str | os.PathLike):
        logdir = storage.path(logdir)
        host, pid = socket.gethostname(), os.getpid()
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{host}.{pid}.{next(_WRITERS)}"
        if storage.is_remote(logdir):
            self._file = tempfile.NamedTemporaryFile(prefix="sora_events_")  # noqa: SIM115
        else:
            logdir.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "xb")  # noqa: SIM115 (closed by close())
        self._records = RecordWriter(self._file)
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: event_pb2.Event) -> None:
        self._records.write(event.SerializeToString())

    def scalar(self, tag: str, value: float, step: int) -> None:
        value = summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
        summary = summary_pb2.Summary(value=[value])
        self._write(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._records.flush()
        if storage.is_remote(self.path):
            storage.copy_file(storage.path(self._file.name), self.path)

    def close(self) -> None:
        if not self._records.closed:
            self.flush()
            self._records.close()
