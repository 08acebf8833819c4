"""Real media files for tests, encoded with PyAV (no mocks of the decoder)."""

import fractions
import pathlib

import av
import numpy as np

from data_prep.synthetic import write_video


def tone(seconds: float, hz: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.4 * np.sin(2 * np.pi * hz * t).astype(np.float32)
    return np.repeat(wave[None], channels, axis=0)


def gradient_frames(n: int, height: int, width: int) -> np.ndarray:
    """Frames whose brightness encodes their index (frame i has mean ~ 10 + 11 i)."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = min(255, 10 + 11 * i)
    return frames


def write_clip(
    path: pathlib.Path,
    seconds=2.0,
    fps=10.0,
    size=(48, 64),
    hz=440.0,
    rate=44_100,
    channels=1,
    video_codec="libx264",
    audio_codec="aac",
    audio=True,
    frame_times=None,
) -> pathlib.Path:
    n = len(frame_times) if frame_times is not None else round(seconds * fps)
    frames = gradient_frames(n, *size)
    wave = tone(seconds, hz, rate, channels) if audio else None
    write_video(path, frames, fps, wave, rate, video_codec, audio_codec, frame_times=frame_times)
    return path


def write_audio_only(path: pathlib.Path, seconds=1.0, rate=16_000) -> pathlib.Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        wave = tone(seconds, 440, rate)
        frame = av.AudioFrame.from_ndarray(wave, format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts, frame.time_base = 0, fractions.Fraction(1, rate)
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def dominant_hz(wave: np.ndarray, rate: int = 16_000) -> float:
    spectrum = np.abs(np.fft.rfft(wave.astype(np.float32)))
    return float(np.argmax(spectrum) * rate / len(wave))
