"""DMVR-style TFRecords (SequenceExample) -> the same dataset format as video files."""

import io
import json

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import cli
from tests.media import dominant_hz


def _jpeg(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((60, 80, 3), value, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _sequence_example(
    num_frames: int, label: int, hz: float, rate: int, name: str | None, frames=None
) -> bytes:
    t = np.arange(int(num_frames / 10 * rate)) / rate
    audio = (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    ex = tf.train.SequenceExample()
    ex.context.feature["clip/label/index"].int64_list.value.append(label)
    if name:
        ex.context.feature["clip/label/string"].bytes_list.value.append(name.encode())
    frame_list = ex.feature_lists.feature_list["image/encoded"]
    for data in frames or [_jpeg(10 + 11 * i) for i in range(num_frames)]:
        frame_list.feature.add().bytes_list.value.append(data)
    ex.feature_lists.feature_list["WAVEFORM/feature/floats"].feature.add().float_list.value.extend(
        audio
    )
    return ex.SerializeToString()


def test_dmvr_records_become_a_dataset_with_resampled_frames_and_audio(tmp_path):
    source = tmp_path / "dmvr"
    source.mkdir()
    with tf.io.TFRecordWriter(str(source / "train-00000-of-00001.tfrecord")) as w:
        w.write(_sequence_example(20, 1, 880.0, 48_000, "drums"))
        w.write(_sequence_example(20, 0, 440.0, 48_000, "piano"))
        w.write(_sequence_example(20, 0, 440.0, 48_000, "piano", frames=[b"not a jpeg"] * 3))
    with tf.io.TFRecordWriter(str(source / "test-00000-of-00001.tfrecord")) as w:
        w.write(_sequence_example(10, 1, 880.0, 48_000, "drums"))
    out = tmp_path / "data"
    code = cli.main(
        [
            str(source),
            "--layout",
            "dmvr",
            "--out",
            str(out),
            "--name",
            "dm",
            "--fps",
            "5",
            "--short-side",
            "30",
            "--dmvr-fps",
            "10",
            "--dmvr-sample-rate",
            "48000",
        ]
    )
    assert code == cli.EXIT_SKIPPED
    report = json.loads((out / "dm_report.json").read_text())
    assert [r["status"] for r in report].count("skipped") == 1
    assert "undecodable frame" in next(r["reason"] for r in report if r["status"] == "skipped")
    info = tfds.builder("dm", data_dir=str(out)).info
    assert info.features["label"].names == ["piano", "drums"]
    train = tfds.data_source("dm", split="train", data_dir=str(out))
    examples = {e["label"]: e for e in (train[i] for i in range(len(train)))}
    assert len(train) == 2
    drums = examples[1]
    assert drums["num_frames"] == 10  # 2 s at 10 fps -> 5 fps
    first = np.asarray(Image.open(io.BytesIO(drums["frames"][1])))
    assert first.shape == (30, 40, 3) and abs(first.mean() - (10 + 11 * 2)) < 4
    assert abs(len(drums["audio"]) - 32_000) < 200
    assert abs(dominant_hz(drums["audio"]) - 880) < 5
