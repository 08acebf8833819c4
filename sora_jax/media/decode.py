"""Decode any video FFmpeg reads into frames at a fixed rate and 16 kHz mono audio.

One function serves data preparation and prediction on raw files, so a deployed model
sees exactly the preprocessing it was trained with.
"""

import dataclasses
import io
import math
import os
import stat

import av
import numpy as np
from PIL import Image

SAMPLE_RATE = 16_000
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

    @property
    def has_video(self) -> bool:
        return len(self.frames) > 0


def _decode_sound_only(container, audio, max_seconds: float, fps: float) -> DecodedVideo:
    """A file with a sound and no picture (a podcast, a field recording): a clip the
    model can hear but not see, kept with no frames."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    chunks = []
    try:
        for frame in container.decode(audio):
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
        chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except av.error.FFmpegError as e:
        if not chunks:
            raise DecodeError(f"corrupt or truncated: {e.strerror}") from e
    wave = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if max_seconds:
        wave = wave[: int(max_seconds * SAMPLE_RATE)]
    if not wave.size:
        raise DecodeError("no video stream, and no decodable audio")
    frames = np.zeros((0, 0, 0, 3), np.uint8)
    return DecodedVideo(frames=frames, audio=wave, has_audio=True, fps=fps, source_fps=0.0)


def _resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    if short_side <= 0:
        return width, height
    scale = short_side / min(width, height)
    # Even sizes keep chroma-subsampled codecs and JPEG happy.
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def decode_video(
    path: str | os.PathLike, fps: float, short_side: int, max_seconds: float = 0.0
) -> DecodedVideo:
    """Frames resampled to `fps` (by timestamps, so variable frame rates work) with the
    short side resized to `short_side` (0 keeps the size); audio as 16 kHz mono int16.
    A file with a sound and no picture gives no frames (`has_video` False).

    Raises DecodeError with a short reason for anything that is not a usable clip.
    """
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
    try:
        container = av.open(
            "file:" + os.path.abspath(path),  # a name like "concat:a|b" stays a file name
            container_options={
                "protocol_whitelist": _PROTOCOLS,
                "format_whitelist": _DEMUXERS,
            },
        )
    except av.error.ArgumentError as e:  # what the whitelists above refuse
        raise DecodeError(
            "not a plain media file (playlists, concat lists and devices are not opened)"
        ) from e
    except av.error.FFmpegError as e:
        raise DecodeError(f"not a readable media file ({type(e).__name__}: {e.strerror})") from e
    with container:
        if container.format.name in _PICTURE_FORMATS:
            raise DecodeError(f"a still picture ({container.format.name}), not a video")
        if not container.streams.video:
            if not container.streams.audio:
                raise DecodeError("no video or audio stream")
            return _decode_sound_only(container, container.streams.audio[0], max_seconds, fps)
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        video.thread_type = "AUTO"
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        frames, chunks = [], []
        previous, previous_rgb, start = None, None, None
        step = 1.0 / fps
        emitted = 0  # output frames so far; output frame k is shown at time k / fps
        # Timestamps are compared with a small tolerance: k / fps in floating point can
        # land a hair before a frame's exact time and pick the previous frame.
        eps = 1e-6

        def rgb(frame) -> np.ndarray:
            w, h = _resized_size(frame.width, frame.height, short_side)
            return frame.to_ndarray(width=w, height=h, format="rgb24")

        streams = (video, audio) if audio is not None else (video,)
        try:
            for frame in container.decode(*streams):
                if isinstance(frame, av.AudioFrame):
                    chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
                    continue
                if frame.time is None:
                    continue
                start = frame.time if start is None else start
                t = frame.time - start
                if max_seconds and t >= max_seconds:
                    continue
                # Emit the latest frame shown at each output time before this one arrives.
                while previous is not None and emitted * step < t - eps:
                    if previous_rgb is None:
                        previous_rgb = rgb(previous)
                    frames.append(previous_rgb)
                    emitted += 1
                previous, previous_rgb = frame, None
            chunks.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
        except av.error.FFmpegError as e:
            if previous is None:
                raise DecodeError(f"corrupt or truncated: {e.strerror}") from e
            # A truncated file still gives the clip up to the damage; keep that part.
        if previous is None:
            raise DecodeError("no decodable video frames")
        last_time = previous.time - start
        frame_rate = float(video.average_rate or fps)
        end = last_time + 1.0 / frame_rate
        if max_seconds:
            end = min(end, max_seconds)
        # The last decoded frame covers the remaining output times up to the stream's end.
        remaining = max(1 if not frames else 0, math.ceil((end - emitted * step) / step - eps))
        if remaining:
            last = rgb(previous)
            frames.extend([last] * remaining)
    frames = np.stack(frames)  # [T, H, W, 3] as stored
    # Phones store portrait video as landscape plus a display matrix; PyAV reports its
    # rotation per frame, counterclockwise degrees (a multiple of 90 in practice).
    rotation = round(previous.rotation / 90) % 4
    if rotation:
        frames = np.rot90(frames, k=rotation, axes=(1, 2))  # as a player shows it
    wave = np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)
    if max_seconds:
        wave = wave[: int(max_seconds * SAMPLE_RATE)]
    return DecodedVideo(
        frames=np.ascontiguousarray(frames),
        audio=wave,
        has_audio=bool(audio is not None and wave.size),
        fps=fps,
        source_fps=frame_rate,
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
