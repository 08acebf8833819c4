"""DMVR-style TFRecords of tf.train.SequenceExample -> the same dataset as video files.

Expected keys (DMVR's defaults): JPEG frames in the feature list `image/encoded`, audio
samples in the feature list `WAVEFORM/feature/floats`, and the label index (or indices)
in the context feature `clip/label/index`, with names in `clip/label/string` if present.
The split is read from each file's name (train, test, validation/val/valid; else train).
"""

import dataclasses
import functools
import io
import pathlib
import struct
from collections.abc import Iterator

import av
import numpy as np
from PIL import Image

from data_prep import builder
from data_prep.worker import PrepSettings
from sora_jax.media.decode import SAMPLE_RATE, encode_jpeg

FRAMES_KEY = "image/encoded"
AUDIO_KEY = "WAVEFORM/feature/floats"
LABEL_KEY = "clip/label/index"
LABEL_NAME_KEY = "clip/label/string"


def read_records(path: pathlib.Path) -> Iterator[bytes]:
    """The records of a TFRecord file (length, crc, data, crc), without TensorFlow."""
    with path.open("rb") as f:
        while header := f.read(12):
            if len(header) < 12:
                raise ValueError(f"{path}: truncated record header")
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise ValueError(f"{path}: truncated record")
            yield data


def _split_of(path: pathlib.Path) -> str:
    name = path.name.lower()
    for split, words in (("validation", ("valid", "val")), ("test", ("test",))):
        if any(w in name for w in words):
            return split
    return "train"


@dataclasses.dataclass(frozen=True)
class Record:
    key: str
    split: str
    frames: list[bytes]
    audio: np.ndarray  # float32, at the records' sample rate
    labels: tuple[str, ...]


def _parse(data: bytes):
    from tensorflow.core.example import example_pb2  # late import: only this converter

    return example_pb2.SequenceExample.FromString(data)


def _labels(example) -> tuple[list[int], list[str]]:
    context = example.context.feature
    indices = list(context[LABEL_KEY].int64_list.value) if LABEL_KEY in context else []
    names = (
        [s.decode() for s in context[LABEL_NAME_KEY].bytes_list.value]
        if (LABEL_NAME_KEY in context)
        else []
    )
    return indices, names


def class_names(files: list[pathlib.Path]) -> list[str]:
    """Names by label index: the records' label strings, else the indices themselves."""
    names: dict[int, str] = {}
    for path in files:
        for data in read_records(path):
            indices, strings = _labels(_parse(data))
            for i, index in enumerate(indices):
                names.setdefault(index, strings[i] if i < len(strings) else str(index))
    if not names:
        raise ValueError(f"no {LABEL_KEY} labels in {[str(f) for f in files]}")
    return [names.get(i, str(i)) for i in range(max(names) + 1)]


def records(files: list[pathlib.Path], names: list[str]) -> Iterator[Record]:
    for path in files:
        for n, data in enumerate(read_records(path)):
            example = _parse(data)
            lists = example.feature_lists.feature_list
            frames = (
                [f.bytes_list.value[0] for f in lists[FRAMES_KEY].feature]
                if (FRAMES_KEY in lists)
                else []
            )
            audio = (
                np.concatenate(
                    [np.asarray(f.float_list.value, np.float32) for f in lists[AUDIO_KEY].feature]
                )
                if (AUDIO_KEY in lists and lists[AUDIO_KEY].feature)
                else np.zeros(0, np.float32)
            )
            indices, _ = _labels(example)
            yield Record(
                f"{path.name}:{n}", _split_of(path), frames, audio, tuple(names[i] for i in indices)
            )


def _resample_audio(wave: np.ndarray, rate: int) -> np.ndarray:
    """float samples at `rate` -> int16 at 16 kHz, with FFmpeg's resampler (as decoding)."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
    frame = av.AudioFrame.from_ndarray(wave.reshape(1, -1), format="flt", layout="mono")
    frame.sample_rate = rate
    chunks = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)


def convert_record(
    record: Record, settings: PrepSettings, source_fps: float, sample_rate: int
) -> tuple[dict, dict | None]:
    """One record -> (report row, example), resampled and resized like decoded files."""
    row = {
        "path": record.key,
        "status": "skipped",
        "reason": "",
        "label": ";".join(record.labels),
        "split": record.split,
        "has_audio": False,
        "has_video": False,
        "num_frames": 0,
    }
    if not record.labels:
        row["reason"] = f"no {LABEL_KEY}"
        return row, None
    if not record.frames:
        row["reason"] = f"no frames under {FRAMES_KEY}"
        return row, None
    duration = len(record.frames) / source_fps
    count = max(1, int(np.ceil(duration * settings.fps - 1e-6)))
    picks = np.minimum(
        (np.arange(count) * source_fps / settings.fps + 1e-6).astype(int), len(record.frames) - 1
    )
    frames = []
    try:
        for i in picks:
            image = Image.open(io.BytesIO(record.frames[i])).convert("RGB")
            if settings.short_side:
                w, h = image.size
                scale = settings.short_side / min(w, h)
                size = (max(2, round(w * scale / 2) * 2), max(2, round(h * scale / 2) * 2))
                image = image.resize(size, Image.BICUBIC)
            frames.append(encode_jpeg(np.asarray(image), settings.jpeg_quality))
    except OSError as e:
        row["reason"] = f"undecodable frame: {e}"
        return row, None
    audio = (
        _resample_audio(record.audio, sample_rate) if record.audio.size else np.zeros(0, np.int16)
    )
    row.update(
        status="ok",
        has_audio=bool(audio.size),
        has_video=True,
        num_frames=len(frames),
        reason="" if audio.size else "no audio (kept, has_audio=False)",
    )
    return row, {
        "frames": frames,
        "audio": audio,
        "has_audio": bool(audio.size),
        "num_frames": np.int32(len(frames)),
        "labels": list(record.labels),
        "label": record.labels[0],
        "path": record.key,
    }


def prepare(
    source: pathlib.Path,
    data_dir: pathlib.Path,
    name: str,
    settings: PrepSettings,
    source_fps: float,
    sample_rate: int,
    workers: int = 0,
) -> tuple[list[dict], bool]:
    source = pathlib.Path(source)
    files = (
        sorted(p for p in source.rglob("*") if p.is_file() and ".tfrecord" in p.name)
        if (source.is_dir())
        else [source]
    )
    if not files:
        raise FileNotFoundError(f"no *.tfrecord* files under {source}")
    names = class_names(files)
    digest = builder.fingerprint(
        [*(builder.file_facts(f) for f in files), source_fps, sample_rate], settings
    )
    by_split: dict[str, list[pathlib.Path]] = {}
    for f in files:
        by_split.setdefault(_split_of(f), []).append(f)
    return builder.build_if_changed(
        data_dir,
        name,
        digest,
        split_items={s: functools.partial(records, fs, names) for s, fs in by_split.items()},
        class_names=names,
        work=functools.partial(
            convert_record, settings=settings, source_fps=source_fps, sample_rate=sample_rate
        ),
        settings=settings,
        workers=workers,
    )
