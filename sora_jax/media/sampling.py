"""Clip sampling and augmentation on one stored example (NumPy, in grain workers).

Training: a random window of T frames every `stride` stored frames, one random resized
crop and flip for the whole window, and the audio of the same time span.
Evaluation: N evenly spaced windows x 1 or 3 crops along the long side ("views").
"""

import dataclasses

import numpy as np
from PIL import Image

from .decode import SAMPLE_RATE, decode_jpeg


@dataclasses.dataclass(frozen=True)
class ClipSpec:
    num_frames: int
    frame_stride: int
    crop_size: int
    fps: float
    audio_samples: int
    num_classes: int
    multi_label: bool = False


def frame_indices(start: int, spec: ClipSpec, available: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a window and its mask; windows running past a short video repeat its
    last frame and are masked, so the model never mistakes padding for content."""
    idx = start + spec.frame_stride * np.arange(spec.num_frames)
    return np.minimum(idx, available - 1), idx < available


# Fewer samples than one 25 ms log-mel window: no sound to hear.
MIN_AUDIO_SAMPLES = 400


def audio_window(audio: np.ndarray, start_frame: int, spec: ClipSpec) -> tuple[np.ndarray, int]:
    """The audio under a window starting at `start_frame`, zero-padded: ([S], valid). A
    window past the end of a clip's sound (a still image with a shorter voice-over, a
    trailing black screen) has no valid samples, whatever the file has elsewhere."""
    offset = round(start_frame / spec.fps * SAMPLE_RATE)
    piece = audio[offset : offset + spec.audio_samples]
    out = np.zeros(spec.audio_samples, np.int16)
    out[: len(piece)] = piece
    return out, len(piece)


def _heard(example: dict, audio_len: int) -> bool:
    """Whether a window has sound: the file has a sound track and the window has at least
    one log-mel window of it. Judged per window, so a sense that is absent is masked (never
    paired with zeros) and its length is 0."""
    return bool(example["has_audio"]) and audio_len >= MIN_AUDIO_SAMPLES


def _target(example: dict, spec: ClipSpec) -> np.ndarray:
    """The clip's class (or multi-hot classes); -1 (every entry -1) for an unlabelled clip
    (prediction, or an unlabeled dataset mixed into training: the supervised loss skips it)."""
    if "label" not in example:
        return np.full(spec.num_classes, -1.0, np.float32) if spec.multi_label else np.int32(-1)
    if spec.multi_label:
        hot = np.zeros(spec.num_classes, np.float32)
        hot[np.asarray(example["labels"], np.int64)] = 1.0
        return hot
    return np.int32(example["label"])


def _decode(example: dict, indices: np.ndarray) -> list[np.ndarray]:
    """The window's frames as arrays; stored frames are JPEG bytes, decoded once each."""
    cache: dict[int, np.ndarray] = {}
    for i in indices:
        frame = example["frames"][int(i)]
        if int(i) not in cache:
            cache[int(i)] = decode_jpeg(frame) if isinstance(frame, bytes) else frame
    return [cache[int(i)] for i in indices]


def resize(frame: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """The `box` (left, top, right, bottom) of a frame, resized to [size, size, 3]."""
    image = Image.fromarray(frame).resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(image)


def crop_boxes(h: int, w: int, spatial_views: int) -> list[tuple[int, int, int, int]]:
    """The square crops of evaluation's views: the centre one, or 3 along the long side."""
    side = min(h, w)
    if spatial_views == 1:
        offsets = [(w - side) // 2] if w >= h else [(h - side) // 2]
    else:
        offsets = [0, (max(h, w) - side) // 2, max(h, w) - side]
    return [(o, 0, o + side, side) if w >= h else (0, o, side, o + side) for o in offsets]


def centre_box(h: int, w: int) -> tuple[int, int, int, int]:
    return crop_boxes(h, w, 1)[0]


def _sound_only(example: dict, spec: ClipSpec, starts: list[int]) -> dict[str, np.ndarray]:
    """Views of a clip without a picture: blank, fully masked frames (the model never
    sees them: has_video is False) and the sound of each window."""
    views = len(starts)
    windows = [audio_window(example["audio"], s, spec) for s in starts]
    size = spec.crop_size
    return {
        "frames": np.zeros((views, spec.num_frames, size, size, 3), np.uint8),
        "frame_mask": np.zeros((views, spec.num_frames), bool),
        "audio": np.stack([w[0] for w in windows]),
        "audio_len": np.asarray([w[1] if _heard(example, w[1]) else 0 for w in windows], np.int32),
        "has_video": np.zeros(views, bool),
        "has_audio": np.asarray([_heard(example, w[1]) for w in windows], bool),
        "label": _target(example, spec),
    }


def _sound_frames(example: dict, spec: ClipSpec) -> int:
    """A sound-only clip's length in frames at `spec.fps`: where its windows may start."""
    return int(len(example["audio"]) / SAMPLE_RATE * spec.fps)


def train_clip(
    example: dict, spec: ClipSpec, rng: np.random.Generator, min_scale: float, flip: bool
) -> dict[str, np.ndarray]:
    n = int(example["num_frames"])
    span = (spec.num_frames - 1) * spec.frame_stride + 1
    if n == 0:  # a sound without a picture
        start = int(rng.integers(0, max(_sound_frames(example, spec) - span, 0) + 1))
        clip = _sound_only(example, spec, [start])
        return {k: v if k == "label" else v[0] for k, v in clip.items()}
    start = int(rng.integers(0, max(n - span, 0) + 1))
    indices, mask = frame_indices(start, spec, n)
    frames = _decode(example, indices)
    h, w = frames[0].shape[:2]
    # Random resized crop (Inception style): area fraction and aspect ratio, same box for
    # every frame of the window so motion stays coherent.
    for _ in range(10):
        area = rng.uniform(min_scale, 1.0) * h * w
        ratio = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            break
    else:
        cw = ch = min(h, w)
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    clip = np.stack([resize(f, (x0, y0, x0 + cw, y0 + ch), spec.crop_size) for f in frames])
    if flip and rng.random() < 0.5:
        clip = clip[:, :, ::-1]
    audio, audio_len = audio_window(example["audio"], start, spec)
    heard = _heard(example, audio_len)
    return {
        "frames": np.ascontiguousarray(clip),  # [T, S, S, 3] uint8
        "frame_mask": mask,  # [T]
        "audio": audio,  # [A] int16
        "audio_len": np.int32(audio_len if heard else 0),
        "has_video": np.bool_(True),
        "has_audio": np.bool_(heard),
        "label": _target(example, spec),
    }


def eval_views(
    example: dict, spec: ClipSpec, temporal_views: int, spatial_views: int
) -> dict[str, np.ndarray]:
    """Deterministic views: arrays gain a leading view axis V = temporal x spatial."""
    n = int(example["num_frames"])
    span = (spec.num_frames - 1) * spec.frame_stride + 1
    if n == 0:  # a sound without a picture: the same number of views, each window's sound
        sound = _sound_frames(example, spec)
        starts = np.round(np.linspace(0, max(sound - span, 0), temporal_views)).astype(int)
        return _sound_only(example, spec, [int(s) for s in starts for _ in range(spatial_views)])
    starts = np.round(np.linspace(0, max(n - span, 0), temporal_views)).astype(int)
    frames, masks, audios, lengths, heard = [], [], [], [], []
    for start in starts:
        indices, mask = frame_indices(int(start), spec, n)
        decoded = _decode(example, indices)
        h, w = decoded[0].shape[:2]
        audio, audio_len = audio_window(example["audio"], int(start), spec)
        for box in crop_boxes(h, w, spatial_views):
            frames.append(np.stack([resize(f, box, spec.crop_size) for f in decoded]))
            masks.append(mask)
            audios.append(audio)
            heard.append(_heard(example, audio_len))
            lengths.append(audio_len if heard[-1] else 0)
    views = len(frames)
    return {
        "frames": np.stack(frames),  # [V, T, S, S, 3]
        "frame_mask": np.stack(masks),
        "audio": np.stack(audios),
        "audio_len": np.asarray(lengths, np.int32),
        "has_video": np.ones(views, bool),
        "has_audio": np.asarray(heard, bool),
        "label": _target(example, spec),
    }
