"""Timelines: the model's window slid over a whole file or a live stream, one score per
window, in memory bounded by a few windows however long the input.

    events = decode_incrementally(container, fps, short_side)   # frames and sound, as decoded
    for window in sliding_windows(events, spec, hop, ...):       # each as soon as it is whole
        ...                                                      # batched for the device

A window is the view evaluation takes (the centre crop of T frames every `frame_stride`
frames, each frame through the JPEG round trip of the stored dataset, and the sound of the
same span), so a window's inputs equal the evaluation view that starts at the same frame.
Windows start every `hop` frames; at the end one more window ends at the input's last
frame, so the whole input is covered.
"""

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from .decode import SAMPLE_RATE, decode_jpeg, encode_jpeg
from .sampling import ClipSpec, centre_box, frame_indices, resize

# A stream's sound may run behind its picture (muxers interleave within a few seconds);
# past this lag a window is scored with the sound that has arrived, so a stream whose
# sound stops early cannot make the frames pile up.
MAX_AUDIO_LAG_SECONDS = 10.0


@dataclasses.dataclass
class Window:
    start: int  # first frame, at the model's fps
    end: int  # one past the last frame of the input it covers
    inputs: dict[str, np.ndarray]  # one view of the model's inputs, no batch axis
    ready_at: float  # time.perf_counter() when its last frame and sound had arrived


class _Frames:
    """Preprocessed frames [S, S, 3] by index, dropping those no window will need."""

    def __init__(self, spec: ClipSpec, jpeg_quality: int):
        self.spec, self.jpeg_quality = spec, jpeg_quality
        self.held: dict[int, np.ndarray] = {}
        self.count = 0

    def add(self, frame: np.ndarray) -> None:  # [H, W, 3] uint8 as decoded
        stored = decode_jpeg(encode_jpeg(frame, self.jpeg_quality))  # as the dataset stores it
        h, w = stored.shape[:2]
        self.held[self.count] = resize(stored, centre_box(h, w), self.spec.crop_size)
        self.count += 1

    def window(self, start: int, available: int) -> tuple[np.ndarray, np.ndarray]:
        indices, mask = frame_indices(start, self.spec, available)
        return np.stack([self.held[int(i)] for i in indices]), mask  # [T, S, S, 3], [T]

    def drop_before(self, index: int) -> None:
        for i in [i for i in self.held if i < index]:
            del self.held[i]


class _Sound:
    """16 kHz samples from `base` on, dropping those no window will need."""

    def __init__(self):
        self.samples, self.base = np.zeros(0, np.int16), 0

    @property
    def end(self) -> int:
        return self.base + len(self.samples)

    def add(self, piece: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, piece])

    def window(self, offset: int, length: int) -> tuple[np.ndarray, int]:
        piece = self.samples[offset - self.base : offset - self.base + length]
        out = np.zeros(length, np.int16)
        out[: len(piece)] = piece
        return out, len(piece)

    def drop_before(self, offset: int) -> None:
        if offset > self.base:
            self.samples = self.samples[offset - self.base :]
            self.base = offset


def sliding_windows(
    events: Iterable[tuple[str, np.ndarray]],
    spec: ClipSpec,
    hop: int,
    has_video: bool,
    has_audio: bool,
    jpeg_quality: int = 90,
) -> Iterator[Window]:
    """Windows of `spec` every `hop` frames over decoded `events` ("frame" / "audio", as
    `decode_incrementally` gives them), each yielded as soon as its frames and sound have
    arrived. `has_video` / `has_audio`: whether the input has a picture / a sound stream.
    A window without any sound says so (has_audio False), as does one of a sound without
    a picture (has_video False, every frame masked)."""
    if hop < 1:
        raise ValueError(f"hop must be at least one frame, not {hop}")
    span = (spec.num_frames - 1) * spec.frame_stride + 1
    frames, sound = _Frames(spec, jpeg_quality), _Sound()
    lag = int(MAX_AUDIO_LAG_SECONDS * spec.fps)
    next_start, last_start = 0, None

    def offset(start: int) -> int:  # the window's first sample
        return round(start / spec.fps * SAMPLE_RATE)

    def sound_frames() -> int:  # a sound without a picture: its length in frames
        return int(sound.end / SAMPLE_RATE * spec.fps)

    def make(start: int, available: int, now: float) -> Window:
        audio, audio_len = sound.window(offset(start), spec.audio_samples)
        if has_video:
            pixels, mask = frames.window(start, available)
        else:
            size = spec.crop_size
            pixels = np.zeros((spec.num_frames, size, size, 3), np.uint8)
            mask = np.zeros(spec.num_frames, bool)
        inputs = {
            "frames": pixels,  # [T, S, S, 3] uint8
            "frame_mask": mask,  # [T]
            "audio": audio,  # [A] int16
            "audio_len": np.int32(audio_len),
            "has_video": np.bool_(has_video),
            "has_audio": np.bool_(audio_len > 0),
        }
        return Window(start, min(start + span, available), inputs, now)

    def whole(start: int) -> bool:  # all of the window has arrived
        if has_video and frames.count < start + span:
            return False
        if not has_audio:
            return True
        needed = offset(start) + spec.audio_samples
        return sound.end >= needed or (has_video and frames.count >= start + span + lag)

    def forget_before(start: int) -> None:
        frames.drop_before(start)
        sound.drop_before(offset(start))

    for kind, data in events:
        if kind == "frame":
            frames.add(data)
        else:
            sound.add(data)
        while whole(next_start):
            yield make(next_start, next_start + span, time.perf_counter())
            last_start, next_start = next_start, next_start + hop
            forget_before(last_start + 1)  # the tail window may start anywhere after it
    # The input has ended: its length is known, the last windows can be cut.
    available = frames.count if has_video else sound_frames()
    now = time.perf_counter()
    while next_start + span <= available:
        yield make(next_start, available, now)
        last_start, next_start = next_start, next_start + hop
    final = max(available - span, 0)
    if last_start is None or (last_start + span < available and final > last_start):
        yield make(final, available, now)  # the tail (or the one window of a short input)


def read_ahead(events: Iterator, size: int = 32) -> Iterator:
    """`events`, produced in a thread of their own up to `size` ahead: FFmpeg decodes
    and scales the next frames while this thread cuts and scores windows (both release
    the interpreter for their C work, so on two cores they overlap). An exception in the
    producer is raised here, where the events are consumed; closing this generator
    stops the producer."""
    buffer: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()
    end = object()

    def offer(item) -> bool:  # False once the consumer has gone
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for event in events:
                if not offer(event):
                    return
            offer(end)
        except BaseException as e:  # handed to the consumer, raised there
            offer(e)

    producer = threading.Thread(target=produce, name="sora-decode", daemon=True)
    producer.start()
    try:
        while (event := buffer.get()) is not end:
            if isinstance(event, BaseException):
                raise event
            yield event
    finally:
        stop.set()
        producer.join()


class StreamReader:
    """A live input for `open_stream`: standard input or a file still being written.
    `read` returns what has arrived (never waits for a whole buffer, so windows go out as
    soon as their data is in); a file being written is followed until it has not grown
    for `idle_seconds`. It has no `seek`: FFmpeg reads it front to back."""

    def __init__(self, fd: int, name: str, follow: bool = False, idle_seconds: float = 5.0):
        self.fd, self.name, self.follow, self.idle_seconds = fd, name, follow, idle_seconds
        self.bytes_read = 0

    @classmethod
    def of(cls, path: str, idle_seconds: float = 5.0) -> "StreamReader":
        """'-': standard input; else a (possibly growing) file."""
        if path == "-":
            return cls(0, "-")
        return cls(os.open(path, os.O_RDONLY), path, follow=True, idle_seconds=idle_seconds)

    def read(self, size: int = -1) -> bytes:
        size = size if size > 0 else 1 << 16
        data = os.read(self.fd, size)
        waited = 0.0
        while not data and self.follow and waited < self.idle_seconds:
            time.sleep(0.05)
            waited += 0.05
            data = os.read(self.fd, size)
        self.bytes_read += len(data)
        return data

    def close(self) -> None:
        if self.fd != 0:
            os.close(self.fd)
