"""What a clip's stored frames and sound say about it with no model: is it silent, does its
picture move, is its picture blank, which clips are the same content (an exact hash, and a
fingerprint for near-duplicates). One stored example in, one row of figures out, in
constant memory: a clip of an hour costs what one of seconds does, since only
`FRAME_PAIRS` pairs of consecutive frames are decoded, at an eighth of their size.
"""

import dataclasses
import hashlib
import io
from itertools import pairwise

import numpy as np
from PIL import Image

SAMPLE_RATE = 16_000  # of the stored audio (data_prep/builder.py)
FRAME_PAIRS = 16  # consecutive-frame pairs, spread over the clip
FLOOR_DB = -120.0  # the loudness of digital silence, as a number a table can hold
FINGERPRINT_DIMS = 150


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where each score becomes a flag (`sora-curate --threshold NAME=VALUE`)."""

    # silent: the loudness (dBFS) of the clip's louder moments (90th percentile of 100 ms
    # windows) below this. Speech is around -30 to -15, room tone -60 to -50.
    silent_db: float = -50.0
    # static: the mean absolute change between consecutive frames, in grey levels (0-255),
    # below this: a still, a slide, a frozen stream.
    static_motion: float = 1.0
    # blank: at least this fraction of frames black, flat (one colour) or frozen (the same
    # as the one before).
    blank_fraction: float = 0.5
    # duplicate: cosine similarity of two clips' fingerprints at or above this.
    duplicate_similarity: float = 0.95
    # av_mismatch: the clip's own sound ranks below this fraction of other clips' sounds
    # for its picture (and its picture below it for its sound): 1 is the best match, 0.5
    # no better than a stranger's. 0.9 was chosen on one run of bench/curate.py's seed 0
    # with four cross-fitted bootstrap runs (BENCHMARKS.md section 14), where it gave the
    # best F1 (precision and recall cross at 0.8875): clean clips score about 0.99
    # (median), swapped ones about 0.5.
    av_score: float = 0.9

    @classmethod
    def parse(cls, items: list[str]) -> "Thresholds":
        """From NAME=VALUE strings; an unknown name or a bad value is named."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {}
        for item in items:
            name, _, value = item.partition("=")
            if name not in names:
                raise ValueError(f"--threshold {item}: unknown; one of {sorted(names)}")
            try:
                values[name] = float(value)
            except ValueError:
                raise ValueError(f"--threshold {item}: {value!r} is not a number") from None
        return cls(**values)


def loudness_db(audio: np.ndarray) -> float:
    """[S] int16 at SAMPLE_RATE -> dBFS of the 90th percentile of 100 ms windows' RMS: a
    clip is loud if it is loud for a tenth of its length, so one click is not a
    soundtrack, and a quiet pause in speech does not make it silent."""
    window = SAMPLE_RATE // 10
    n = len(audio) // window
    if n == 0:
        return FLOOR_DB
    x = audio[: n * window].astype(np.float32).reshape(n, window) / 32768.0
    rms = np.sqrt(np.mean(x * x, axis=1))  # [n]
    level = float(np.percentile(rms, 90))
    return max(FLOOR_DB, 20 * np.log10(level)) if level > 0 else FLOOR_DB


def _pairs(num_frames: int) -> list[int]:
    """The first index of FRAME_PAIRS pairs (i, i + 1), spread evenly over the clip."""
    if num_frames < 2:
        return []
    starts = np.linspace(0, num_frames - 2, min(FRAME_PAIRS, num_frames - 1))
    return sorted({round(s) for s in starts})


def _small(jpeg: bytes) -> np.ndarray:
    """[32, 32, 3] float32: a frame decoded at an eighth of its size where JPEG allows
    (the DCT scales down as it decodes), its centre square, resized."""
    image = Image.open(io.BytesIO(jpeg))
    image.draft("RGB", (image.width // 8, image.height // 8))
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((32, 32), Image.BILINEAR)
    return np.asarray(image, np.float32)


def _pool(x: np.ndarray, size: int) -> np.ndarray:
    """[..., 32, 32, C] -> [..., size, size, C] by averaging blocks."""
    k = x.shape[-2] // size
    return x.reshape(*x.shape[:-3], size, k, size, k, x.shape[-1]).mean(axis=(-4, -2))


def _audio_profile(audio: np.ndarray) -> np.ndarray:
    """[32]: the clip's mean log power in 32 log-spaced bands from 60 Hz to 8 kHz, centred."""
    if len(audio) < 1024:
        return np.zeros(32, np.float32)
    frames = len(audio) // 1024
    x = audio[: frames * 1024].astype(np.float32).reshape(frames, 1024) / 32768.0
    power = np.abs(np.fft.rfft(x * np.hanning(1024), axis=1)) ** 2  # [frames, 513]
    edges = np.geomspace(60, SAMPLE_RATE / 2, 33) / (SAMPLE_RATE / 2) * 512
    bands = np.stack(
        [power[:, int(lo) : max(int(lo) + 1, int(hi))].sum(axis=1) for lo, hi in pairwise(edges)],
        axis=1,
    )  # [frames, 32]
    profile = np.log10(bands.mean(axis=0) + 1e-10)
    return (profile - profile.mean()).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x)
    return x / norm if norm > 1e-6 else np.zeros_like(x)


def clip_signals(example: dict) -> dict:
    """One stored example (the tfds record: JPEG `frames`, int16 `audio`, `has_audio`) ->
    its model-free scores, its content hash and its fingerprint [FINGERPRINT_DIMS]."""
    frames = list(example["frames"])
    audio = np.asarray(example["audio"], np.int16)
    has_audio = bool(example["has_audio"]) and len(audio) > 0
    content = hashlib.sha256()
    for frame in frames:
        content.update(hashlib.sha256(frame).digest())
    content.update(audio.tobytes() if has_audio else b"")

    starts = _pairs(len(frames))
    if frames:
        index = sorted({i for s in starts for i in (s, s + 1)} or {0})
        small = {i: _small(frames[i]) for i in index}
        pictures = np.stack([small[i] for i in index])  # [F, 32, 32, 3]
    else:  # an audio-only clip: nothing to see
        pictures = np.zeros((1, 32, 32, 3), np.float32)
    if starts:
        change = np.array([np.abs(small[s + 1] - small[s]).mean() for s in starts])  # [P]
        later = np.stack([small[s + 1] for s in starts])  # [P, 32, 32, 3]
    else:
        change, later = np.zeros(1), pictures[:1]
    black = later.mean(axis=(1, 2, 3)) < 16
    flat = later.std(axis=(1, 2)).max(axis=-1) < 3  # one colour in every channel
    frozen = change < 0.5
    loudness = loudness_db(audio) if has_audio else FLOOR_DB

    return {
        "audio_db": float(loudness),
        "motion": float(change.mean()) if frames else float("nan"),
        "blank_fraction": float(np.mean(black | flat | frozen)) if frames else 1.0,
        "content_hash": content.hexdigest()[:32],
        "num_frames": len(frames),
        "height": int(Image.open(io.BytesIO(frames[0])).height) if frames else 0,
        "has_audio": has_audio,
        "fingerprint": fingerprint(pictures, audio if has_audio else None),
    }


def fingerprint(pictures: np.ndarray, audio: np.ndarray | None) -> np.ndarray:
    """[FINGERPRINT_DIMS] float32 unit vector from frames spread over a clip [F, 32, 32, 3]
    and its sound: what stays when a clip is re-encoded, resized, re-muxed or trimmed a
    little. The picture's layout (its mean over time on an 8x8 grid, about its own mean, so
    that what is where decides, not brightness); its colours' layout on a 4x4 grid; its
    overall colour as Fourier features (cos, sin of 3 pi c: two clips 0.1 apart in
    brightness are at 0.59, not at the 0.99 raw colours would give); its sound's spectral
    shape. Equal weights for the picture's three parts, a tenth for the sound (a re-upload
    may carry other sound). A clip with nothing to see (no frames, or one flat colour) has
    no fingerprint (zeros): it would match every other such clip; `blank` names it."""
    grey = _pool(pictures.mean(axis=-1)[..., None], 8)[..., 0].mean(axis=0).ravel()  # [64]
    grey = grey - grey.mean()
    if np.linalg.norm(grey) < 1.0 or len(pictures) == 0:
        return np.zeros(FINGERPRINT_DIMS, np.float32)
    colours = _pool(pictures, 4).mean(axis=0).reshape(16, 3)
    colour = pictures.mean(axis=(0, 1, 2)) / 255.0  # [3]
    parts = [
        (0.3, grey),  # 64
        (0.3, (colours - colours.mean(axis=0)).ravel()),  # 48
        (0.3, np.concatenate([np.cos(3 * np.pi * colour), np.sin(3 * np.pi * colour)])),  # 6
        (0.1, _audio_profile(audio) if audio is not None else np.zeros(32, np.float32)),  # 32
    ]
    return _unit(np.concatenate([np.sqrt(w) * _unit(x) for w, x in parts])).astype(np.float32)
