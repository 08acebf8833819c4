"""Real media files for tests, encoded with PyAV (no mocks of the decoder)."""

import fractions
import pathlib

import av
import numpy as np

from data_prep.synthetic import write_split_tree, write_video


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


# A dataset whose classes each live in one sense, for tests of timelines and explanations:
# "red" and "blue" are a coloured disc in one part of the frame over a hiss; "low" and
# "high" are a tone over a background with no object. So a red clip's evidence is the disc
# (a saliency map should lie on it) and a low clip's is the sound (audio should dominate).
SIGHT_OR_SOUND = ("red", "blue", "low", "high")


def sight_or_sound_clip(
    rng: np.random.Generator, name: str, seconds: float = 2.0, fps: float = 8.0, size: int = 48
) -> tuple[np.ndarray, np.ndarray]:
    """[N, size, size, 3] uint8 frames and [S] float audio at 22.05 kHz of class `name`."""
    from data_prep.synthetic import _animate

    n, rate = round(fps * seconds), 22_050
    background = rng.integers(60, 190)
    radius = rng.integers(size // 8, size // 4)
    xy = rng.uniform(radius, size - radius, 2)
    velocity = rng.uniform(-1.5, 1.5, 2)
    t = np.arange(int(seconds * rate)) / rate
    hiss = rng.normal(0, 0.05, t.shape)
    if name in ("red", "blue"):
        color = np.array({"red": (220, 40, 40), "blue": (40, 70, 220)}[name])
        color = color + rng.integers(-25, 26, 3)
        frames = _animate(rng, n, size, background, radius, xy, velocity, color, "disc")
        audio = hiss * 2
    else:
        frames = _animate(rng, n, size, background, 0, xy, velocity, np.full(3, background), "disc")
        pitch = rng.uniform(*{"low": (220.0, 330.0), "high": (1400.0, 2000.0)}[name])
        audio = rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * pitch * t) + hiss
    return frames, np.clip(audio, -1, 1).astype(np.float32)


def write_sight_or_sound(out: pathlib.Path, per_class: int, seed: int) -> pathlib.Path:
    """OUT/train/<class>/<n>.mp4 and OUT/test/... (a quarter as many)."""
    test = max(2, per_class // 4)
    return write_split_tree(out, SIGHT_OR_SOUND, sight_or_sound_clip, per_class, test, seed)


def write_sequence(
    path: pathlib.Path, names: list[str], seconds: float, seed: int, audio: bool = True
) -> list[tuple[str, float, float]]:
    """One long file of sight-or-sound clips of `names`, `seconds` each, one after another
    (without a sound track when `audio` is False); returns (class, start_s, end_s) each."""
    rng = np.random.default_rng(seed)
    clips = [sight_or_sound_clip(rng, name, seconds) for name in names]
    frames = np.concatenate([f for f, _ in clips])
    wave = np.concatenate([a for _, a in clips]) if audio else None
    write_video(path, frames, 8.0, wave, 22_050)
    return [(name, i * seconds, (i + 1) * seconds) for i, name in enumerate(names)]
