"""The per-file work of data preparation, run in worker processes.

Kept apart from the builder so spawned workers import only PyAV, PIL and NumPy,
not TensorFlow.
"""

import dataclasses
import json
from typing import Any

from data_prep.layouts import Entry
from sora_jax.media.decode import MIN_COMPLETE, DecodeError, decode_video, stored_example


@dataclasses.dataclass(frozen=True)
class PrepSettings:
    fps: float
    short_side: int
    # Keep at most this much of each input (0: all): one example holds a whole clip, and a
    # file may claim hours.
    max_seconds: float = 600.0
    jpeg_quality: int = 90
    min_frames: int = 8  # shorter clips are kept, and flagged in the report
    # Skipped, as truncated: a file decoding to less than this fraction of its container's
    # duration (0 keeps every file that decodes at all).
    min_complete: float = MIN_COMPLETE


def prepare_entry(entry: Entry, settings: PrepSettings) -> tuple[dict[str, Any], dict | None]:
    """Decode one input: (report row, tfds example or None when skipped)."""
    row = {
        "path": str(entry.path),
        "status": "skipped",
        "reason": "",
        "label": ";".join(entry.labels),
        "split": entry.split,
        "has_audio": False,
        "has_video": False,
        "num_frames": 0,
    }
    if entry.skip:
        row["reason"] = entry.skip
        return row, None
    try:
        video = decode_video(entry.path, settings.fps, settings.short_side, settings.max_seconds)
    except DecodeError as e:
        row["reason"] = str(e)
        return row, None
    except Exception as e:
        row["reason"] = f"decoder failed: {type(e).__name__}: {e}"
        return row, None
    truncated = video.truncated(settings.min_complete)
    if truncated:
        row.update(reason=truncated, num_frames=len(video.frames))
        return row, None
    notes = list(video.notes)
    if not video.has_audio:
        notes.append("no audio stream (kept, has_audio=False)")
    if not video.has_video:
        notes.append("no video stream (kept, has_video=False)")
    elif len(video.frames) < settings.min_frames:
        notes.append(f"short: {len(video.frames)} frames < {settings.min_frames} (kept, padded)")
    row.update(
        status="ok",
        reason="; ".join(notes),
        has_audio=video.has_audio,
        has_video=video.has_video,
        num_frames=len(video.frames),
    )
    example = stored_example(video, settings.jpeg_quality) | {"path": entry.key}
    if entry.labels:  # an unlabeled entry (for pretraining) stores no label features
        example |= {"labels": list(entry.labels), "label": entry.labels[0]}
    if entry.metadata:
        example["metadata"] = json.dumps(dict(entry.metadata), sort_keys=True)
    return row, example
