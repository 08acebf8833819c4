"""Decode any video FFmpeg reads into frames at a fixed rate and 16 kHz mono audio.

One function serves data preparation and prediction on raw files, so a deployed model
sees exactly the preprocessing it was trained with.
"""

import dataclasses
import io
import math
import os
import stat
from collections.abc import Iterator

import av
import av.video.reformatter
import numpy as np
from PIL import Image

SAMPLE_RATE = 16_000
# A file decoding to less than this fraction of its container's duration is truncated
# (sora-prep --min-complete; sora-predict and the client warn).
MIN_COMPLETE = 0.9
# Seconds without a new picture that are filled with the last frame (a variable-rate
# screen recording holds a still picture that long); a longer jump is closed up.
MAX_GAP_S = 30.0
# FFmpeg opens single pictures through these demuxers; they are not videos.
_PICTURE_FORMATS = {
    "image2",
    "png_pipe",
    "jpeg_pipe",
    "bmp_pipe",
    "webp_pipe",
    "gif",
    "tiff_pipe",
    "jpegls_pipe",
    "pgm_pipe",
    "ppm_pipe",
}

# What FFmpeg may do with a file it is given (the sources are untrusted downloads): read
# that local file, through the demuxers of plain media files and single pictures (refused
# below, with a reason). Not allowed: other protocols (http, tcp, pipe, concat:, ...) and the
# demuxers that open further inputs or devices (hls playlists, concat lists, dash, v4l2, ...),
# which would store whatever they point at as the clip.
_PROTOCOLS = "file"
_DEMUXERS = ",".join(
    sorted(
        {
            "mov",  # mov, mp4, m4a, 3gp, 3g2, mj2: one demuxer
            "matroska",  # matroska, webm
            "avi",
            "flv",
            "mpegts",
            "mpeg",
            "m4v",
            "h264",
            "hevc",
            "asf",  # wmv, wma
            "ogg",
            "mxf",
            "nut",
            "ivf",
            "dv",
            "rm",
            "wav",
            "w64",
            "aiff",
            "caf",
            "mp3",
            "aac",
            "flac",
            "amr",
            *_PICTURE_FORMATS,
        }
    )
)


class DecodeError(Exception):
    """A file that cannot become a clip; the message is the reason shown in reports."""


@dataclasses.dataclass
class DecodedVideo:
    frames: np.ndarray  # [N, H, W, 3] uint8, at `fps`, short side resized; N = 0: no picture
    audio: np.ndarray  # [S] int16 at 16 kHz mono; empty when there is no audio stream
    has_audio: bool
    fps: float
    source_fps: float  # the stream's average rate, for the report (0 without a picture)
    claimed_seconds: float = 0.0  # what the container says it holds (0: it does not say)
    notes: tuple[str, ...] = ()  # what decoding changed (gaps closed up)

    @property
    def has_video(self) -> bool:
        return len(self.frames) > 0

    @property
    def seconds(self) -> float:
        """How much decoded: the picture's length, or the sound's when it is longer."""
        return max(len(self.frames) / self.fps, len(self.audio) / SAMPLE_RATE)

    def truncated(self, min_complete: float = MIN_COMPLETE) -> str | None:
        """Why the file looks cut short, or None: what decoded falls below `min_complete`
        of the duration its container claims (a download cut off, a copy interrupted:
        FFmpeg decodes the part that is there without an error)."""
        closed = any("gap" in note for note in self.notes)  # then the claim counts the gaps
        if (
            closed
            or not self.claimed_seconds
            or self.seconds >= min_complete * self.claimed_seconds
        ):
            return None
        return (
            f"truncated: decoded {self.seconds:.1f} s of the {self.claimed_seconds:.1f} s "
            "its container claims"
        )


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    if short_side <= 0:
        return width, height
    scale = short_side / min(width, height)
    # Even sizes keep chroma-subsampled codecs and JPEG happy.
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


_OPTIONS = {"protocol_whitelist": _PROTOCOLS, "format_whitelist": _DEMUXERS}


def open_file(path: str | os.PathLike) -> "av.container.InputContainer":
    """A local media file opened for decoding, or DecodeError saying why it cannot be."""
    path = os.fspath(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        gone = "a dangling link" if os.path.islink(path) else "file not found"
        raise DecodeError(gone) from None
    except OSError as e:
        raise DecodeError(f"cannot read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device, socket or folder"
        raise DecodeError(f"not a regular file ({kind})")
    if info.st_size == 0:
        raise DecodeError("empty file")
    # "file:" keeps a name like "concat:a|b" a file name.
    return _open("file:" + os.path.abspath(path), _OPTIONS)


def open_stream(stream: "io.RawIOBase") -> "av.container.InputContainer":
    """A live stream (standard input, a file still being written) opened for decoding,
    with the same demuxers as files. It is read front to back, never seeked: it must be
    in a streamable container (Matroska/WebM, MPEG-TS, fragmented MP4, ...)."""
    # FFmpeg reads this much of a stream before the first frame comes out (default 5 MB,
    # seconds of a live feed): enough to find the streams of any of these containers.
    try:
        return _open(stream, _OPTIONS | {"probesize": "65536", "analyzeduration": "1000000"})
    except DecodeError as e:
        raise DecodeError(
            f"{e}; a live input must be in a streamable container (Matroska/WebM, MPEG-TS, "
            "fragmented MP4), e.g. ffmpeg ... -f matroska -"
        ) from e


def _open(source, options: dict) -> "av.container.InputContainer":
    try:
        container = av.open(source, container_options=options)
    except av.error.ArgumentError as e:  # what the whitelists refuse
        raise DecodeError(
            "not a plain media file (playlists, concat lists and devices are not opened)"
        ) from e
    except av.error.FFmpegError as e:
        raise DecodeError(f"not a readable media file ({type(e).__name__}: {e.strerror})") from e
    if container.format.name.split(",")[0] in _PICTURE_FORMATS:
        container.close()
        raise DecodeError(f"a still picture ({container.format.name}), not a video")
    if not container.streams.video and not container.streams.audio:
        container.close()
        raise DecodeError("no video or audio stream")
    return container


# FFmpeg's resampler refuses layouts of more channels than this ("Invalid argument"):
# such sound (ambisonics, microphone arrays: 32, 64 channels) is averaged to mono first.
_SWR_MAX_CHANNELS = 16


def _downmixed(frame: "av.AudioFrame") -> "av.AudioFrame":
    """The mean of a frame's channels, as a mono float frame at its rate."""
    x = frame.to_ndarray()
    channels = len(frame.layout.channels)
    x = x if frame.format.is_planar else x.reshape(-1, channels).T  # [C, S]
    if np.issubdtype(x.dtype, np.integer):
        info = np.iinfo(x.dtype)
        x = (x.astype(np.float32) - (info.max + info.min + 1) / 2) / ((info.max - info.min + 1) / 2)
    mono = np.ascontiguousarray(x.astype(np.float32).mean(axis=0, keepdims=True))
    out = av.AudioFrame.from_ndarray(mono, format="flt", layout="mono")
    out.sample_rate, out.pts, out.time_base = frame.sample_rate, frame.pts, frame.time_base
    return out


def decode_incrementally(
    container: "av.container.InputContainer",
    fps: float,
    short_side: int,
    max_seconds: float = 0.0,
    max_gap_s: float = MAX_GAP_S,
    notes: list[str] | None = None,
    position: dict | None = None,
) -> Iterator[tuple[str, np.ndarray]]:
    """What the container holds, in decoding order, as it decodes: ("frame", [H, W, 3]
    uint8) at `fps` (by timestamps, so variable frame rates work; short side resized to
    `short_side`, 0 keeps the size; as a player shows it, display rotation applied) and
    ("audio", [s] int16) pieces of 16 kHz mono sound. Only a few source frames are held
    at a time, so a file of any length (or a live stream) decodes in bounded memory.

    A jump in the picture's timestamps longer than `max_gap_s` (a stream stamped a day
    later, a recording paused) is closed up, not filled with copies of the last frame:
    memory never grows with a duration the file only claims. Each is said in `notes`.
    `position["media_end"]`, if given, follows the byte after the last media packet read
    (what follows it in a stream was not media).

    Raises DecodeError when nothing usable decodes; a file damaged part way gives what
    decoded before the damage."""
    video = container.streams.video[0] if container.streams.video else None
    audio = container.streams.audio[0] if container.streams.audio else None
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    sound_left = int(max_seconds * SAMPLE_RATE) if max_seconds else -1  # -1: no limit

    def sound(frame) -> Iterator[tuple[str, np.ndarray]]:
        nonlocal sound_left
        if frame is not None and len(frame.layout.channels) > _SWR_MAX_CHANNELS:
            frame = _downmixed(frame)
        for piece in resampler.resample(frame):
            samples = piece.to_ndarray().reshape(-1).astype(np.int16)
            if sound_left >= 0:
                samples, sound_left = samples[:sound_left], max(sound_left - len(samples), 0)
            if samples.size:
                yield "audio", samples

    if video is None:  # a sound without a picture (a podcast, a field recording)
        any_sound = False
        try:
            for frame in container.decode(audio):
                for event in sound(frame):
                    any_sound = True
                    yield event
            for event in sound(None):
                any_sound = True
                yield event
        except av.error.FFmpegError as e:
            if not any_sound:
                raise DecodeError(f"corrupt or truncated: {e.strerror}") from e
        if not any_sound:
            raise DecodeError("no video stream, and no decodable audio")
        return

    video.thread_type = "AUTO"
    previous, previous_rgb, start = None, None, None
    step = 1.0 / fps
    emitted = 0  # output frames so far; output frame k is shown at time k / fps
    # Timestamps are compared with a small tolerance: k / fps in floating point can land
    # a hair before a frame's exact time and pick the previous frame.
    eps = 1e-6

    # One scaler for the whole stream: frame.to_ndarray(width=...) would set up FFmpeg's
    # scaler anew for every frame (a third of a 720p timeline's time; the same pixels).
    reformatter = av.video.reformatter.VideoReformatter()

    def rgb(frame) -> np.ndarray:
        w, h = _resized_size(frame.width, frame.height, short_side)
        image = reformatter.reformat(frame, width=w, height=h, format="rgb24").to_ndarray()
        # Phones store portrait video as landscape plus a display matrix; PyAV reports its
        # rotation per frame, counterclockwise degrees (a multiple of 90 in practice).
        turns = round(frame.rotation / 90) % 4
        return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image

    streams = (video, audio) if audio is not None else (video,)
    position = {} if position is None else position
    position["media_end"] = 0

    def decoded() -> Iterator:  # container.decode(*streams), with each packet's end kept
        for packet in container.demux(*streams):
            if packet.size and packet.pos is not None and packet.pos >= 0:
                position["media_end"] = max(position["media_end"], packet.pos + packet.size)
            yield from packet.decode()

    try:
        for frame in decoded():
            if isinstance(frame, av.AudioFrame):
                yield from sound(frame)
                continue
            if frame.time is None:
                continue
            start = frame.time if start is None else start
            t = frame.time - start
            gap = t - emitted * step
            if previous is not None and gap > max_gap_s:  # close it up: the frame comes next
                start += gap - step
                t = frame.time - start
                if notes is not None:
                    notes.append(
                        f"a {gap:.1f} s gap in the timestamps at {emitted * step:.1f} s closed up"
                    )
            if max_seconds and t >= max_seconds:
                continue
            # Emit the latest frame shown at each output time before this one arrives.
            while previous is not None and emitted * step < t - eps:
                if previous_rgb is None:
                    previous_rgb = rgb(previous)
                yield "frame", previous_rgb
                emitted += 1
            previous, previous_rgb = frame, None
        yield from sound(None)
    except av.error.FFmpegError as e:
        if previous is None:
            raise DecodeError(f"corrupt or truncated: {e.strerror}") from e
        # A truncated file still gives the clip up to the damage; keep that part.
    if previous is None:
        raise DecodeError("no decodable video frames")
    end = previous.time - start + 1.0 / float(video.average_rate or fps)
    if max_seconds:
        end = min(end, max_seconds)
    # The last decoded frame covers the remaining output times up to the stream's end.
    remaining = max(1 if not emitted else 0, math.ceil((end - emitted * step) / step - eps))
    last = rgb(previous) if remaining else None
    for _ in range(remaining):
        yield "frame", last


def decode_video(
    path: str | os.PathLike, fps: float, short_side: int, max_seconds: float = 0.0
) -> DecodedVideo:
    """A whole file in memory: frames at `fps` with the short side resized to
    `short_side` (0 keeps the size), audio as 16 kHz mono int16 (see
    `decode_incrementally`). A file with a sound and no picture gives no frames
    (`has_video` False).

    Raises DecodeError with a short reason for anything that is not a usable clip.
    """
    with open_file(path) as container:
        video = container.streams.video[0] if container.streams.video else None
        source_fps = float(video.average_rate or fps) if video is not None else 0.0
        has_audio_stream = bool(container.streams.audio)
        claimed = container.duration / av.time_base if container.duration else 0.0
        notes = []
        claimed_whole, claimed = claimed, min(claimed, max_seconds) if max_seconds else claimed
        frames, chunks = [], []
        for kind, data in decode_incrementally(
            container, fps, short_side, max_seconds, notes=notes
        ):
            (frames if kind == "frame" else chunks).append(data)
    wave = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    decoded = max(len(frames) / fps, len(wave) / SAMPLE_RATE)
    if max_seconds and claimed_whole > max_seconds + 1 and decoded >= max_seconds - 1 / fps:
        notes.append(f"cut to its first {max_seconds:g} s of {claimed_whole:.0f} s")
    return DecodedVideo(
        frames=np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8),
        audio=wave,
        has_audio=has_audio_stream and bool(wave.size),
        fps=fps,
        source_fps=source_fps,
        claimed_seconds=max(claimed, 0.0),
        notes=tuple(notes[:3]) + ((f"and {len(notes) - 3} more gaps",) if len(notes) > 3 else ()),
    )


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def stored_example(video: DecodedVideo, jpeg_quality: int = 90) -> dict:
    """A decoded video in the stored (dataset) form: JPEG frames, int16 audio. Prediction
    goes through it too, so served inputs carry exactly the JPEG round trip of training."""
    return {
        "frames": [encode_jpeg(f, jpeg_quality) for f in video.frames],
        "audio": video.audio,
        "has_audio": video.has_audio,
        "num_frames": np.int32(len(video.frames)),
    }
