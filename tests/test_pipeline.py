"""The grain input pipeline: determinism, resumption, sampling and global batches."""

import itertools
import logging
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax.data import pipeline
from sora_jax.media import sampling
from sora_jax.media.decode import encode_jpeg
from tests.conftest import small_config


def _take(iterator, n):
    return [jax.tree.map(np.copy, b) for b in itertools.islice(iterator, n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_same_seed_gives_identical_batches_and_another_seed_does_not(demo_data):
    config = small_config(*demo_data)
    first = _take(iter(pipeline.train_dataset(config, 8)), 3)
    _assert_same(first, _take(iter(pipeline.train_dataset(config, 8)), 3))
    config.seed = 1
    other = _take(iter(pipeline.train_dataset(config, 8)), 3)
    assert not np.array_equal(first[0]["label"], other[0]["label"]) or not np.array_equal(
        first[0]["frames"], other[0]["frames"]
    )


def test_worker_processes_do_not_change_the_batches(demo_data):
    config = small_config(*demo_data)
    in_process = _take(iter(pipeline.train_dataset(config, 8)), 3)
    config.data.workers = 2
    _assert_same(in_process, _take(iter(pipeline.train_dataset(config, 8)), 3))


def test_a_restored_iterator_continues_with_exactly_the_next_batch(demo_data):
    config = small_config(*demo_data)
    config.data.workers = 1
    iterator = iter(pipeline.train_dataset(config, 8))
    _take(iterator, 7)  # past the 48-clip epoch boundary: epochs reshuffle
    state = iterator.get_state()
    expected = _take(iterator, 3)
    fresh = iter(pipeline.train_dataset(config, 8))
    fresh.set_state(state)
    _assert_same(expected, _take(fresh, 3))


def test_evaluation_reads_every_example_exactly_once(demo_data):
    config = small_config(*demo_data)
    config.data.update(eval_temporal_views=2, eval_spatial_views=3)
    batches = list(pipeline.eval_dataset(config, "test", 6))  # 20 clips -> 4 batches, 4 padded
    valid = np.concatenate([b["valid"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert sorted(index[valid]) == list(range(20)) and (~valid).sum() == 4
    assert batches[0]["frames"].shape == (6, 6, 4, 32, 32, 3)  # [B, views, T, H, W, C]
    assert batches[0]["audio"].shape == (6, 6, 16_000)


def _ramp_example(num_frames: int, fps: float = 8.0):
    """Frame i has brightness 20 i; audio sample s holds s // 100 (so offsets are visible)."""
    frames = [encode_jpeg(np.full((24, 32, 3), 20 * i, np.uint8)) for i in range(num_frames)]
    seconds = num_frames / fps
    audio = (np.arange(int(seconds * 16_000)) // 100).astype(np.int16)
    return {
        "frames": frames,
        "num_frames": num_frames,
        "audio": audio,
        "has_audio": True,
        "label": 1,
        "labels": [1],
    }


def test_training_window_frames_and_audio_cover_the_same_time():
    spec = sampling.ClipSpec(
        num_frames=3, frame_stride=2, crop_size=16, fps=8.0, audio_samples=6_000, num_classes=4
    )
    rng = np.random.default_rng(0)
    for _ in range(10):
        clip = sampling.train_clip(_ramp_example(12), spec, rng, min_scale=0.5, flip=True)
        brightness = clip["frames"].mean(axis=(1, 2, 3))
        first_frame = round(brightness[0] / 20)
        np.testing.assert_allclose(brightness, 20 * (first_frame + 2 * np.arange(3)), atol=3)
        assert clip["audio"][0] == round(first_frame / 8.0 * 16_000) // 100
        assert clip["frames"].shape == (3, 16, 16, 3) and clip["frame_mask"].all()


def test_short_videos_are_padded_and_masked():
    spec = sampling.ClipSpec(
        num_frames=4, frame_stride=2, crop_size=16, fps=8.0, audio_samples=8_000, num_classes=4
    )
    clip = sampling.train_clip(_ramp_example(3), spec, np.random.default_rng(0), 1.0, False)
    assert clip["frame_mask"].tolist() == [True, True, False, False]
    assert clip["audio_len"] == 6_000  # 3 frames at 8 fps = 0.375 s
    assert not clip["audio"][6_000:].any()
    views = sampling.eval_views(_ramp_example(3), spec, temporal_views=2, spatial_views=1)
    assert views["frame_mask"].tolist() == [[True, True, False, False]] * 2


def test_a_window_past_the_end_of_the_sound_has_no_sound():
    """A still image with a shorter voice-over: the file has sound, but a window that
    starts after the sound has ended has none, and is marked so (never paired with
    zeros); a window that overlaps the sound keeps it."""
    spec = sampling.ClipSpec(
        num_frames=4, frame_stride=1, crop_size=16, fps=8.0, audio_samples=8_000, num_classes=4
    )
    example = _ramp_example(10)
    example.update(frames=example["frames"] * 4, num_frames=40)  # 5 s of picture
    example["audio"] = np.zeros(16_000 * 2, np.int16)  # 2 s of sound
    views = sampling.eval_views(example, spec, temporal_views=4, spatial_views=1)
    starts_s = np.round(np.linspace(0, 40 - 4, 4)) / 8  # 0, 1.5, 3, 4.5 s
    assert views["has_audio"].tolist() == [True, True, False, False], starts_s
    assert views["audio_len"].tolist() == [8_000, 8_000, 0, 0]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        clip = sampling.train_clip(example, spec, rng, min_scale=1.0, flip=False)
        assert bool(clip["has_audio"]) == (clip["audio_len"] >= sampling.MIN_AUDIO_SAMPLES)
        seen.add(bool(clip["has_audio"]))
    assert seen == {True, False}
    no_track = dict(example, has_audio=False)
    assert not sampling.eval_views(no_track, spec, 2, 1)["has_audio"].any()


def test_a_split_smaller_than_the_batch_lasts_to_the_last_step(demo_data):
    """48 clips, batch 64, 3 steps: the batch read ahead of the last step once ran past
    the end of the stream (StopIteration minutes into a run, again on resume)."""
    config = small_config(*demo_data)
    config.total_steps = 3
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), P("data"))
    batches = pipeline.DevicePrefetch(iter(pipeline.train_dataset(config, 64)), sharding)
    assert len(pipeline.data_source(config, "train")) < 64
    for _ in range(config.total_steps):
        assert next(batches)["frames"].shape[0] == 64
    batches.close()


def test_local_batches_become_global_arrays_split_over_the_mesh():
    mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    local = {"frames": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
    global_batch = pipeline.to_global(local, sharding)
    assert global_batch["frames"].shape == (16, 3)
    assert len(global_batch["frames"].addressable_shards) == 8
    assert global_batch["frames"].addressable_shards[0].data.shape == (2, 3)
    np.testing.assert_array_equal(np.asarray(global_batch["frames"]), local["frames"])


def test_multi_label_on_single_label_data_is_said(demo_data, caplog):
    config = small_config(*demo_data)
    assert pipeline.check_dataset(config).max_labels_per_clip == 1
    assert "multi_label" not in caplog.text
    config.model.multi_label = True
    with caplog.at_level(logging.WARNING, logger="sora_jax"):
        pipeline.check_dataset(config)
    assert "multi_label=True, but dataset demo_small has one label per clip" in caplog.text


def test_a_mixture_draws_from_each_dataset_by_weight_and_unlabeled_clips_have_no_label(
    demo_data, tmp_path
):
    from data_prep import builder, layouts
    from data_prep.worker import PrepSettings
    from sora_jax.config import ConfigError
    from sora_jax.objectives import supervised as objective

    raw = pathlib.Path(demo_data[0]).parent / "raw"
    unlabeled = layouts.discover(raw / "test", "unlabeled", seed=0, test_fraction=0.2)
    builder.prepare(unlabeled, tmp_path, "web", PrepSettings(fps=8.0, short_side=40))
    config = small_config(*demo_data)
    config.data.mixture = (
        {"dir": demo_data[0], "name": demo_data[1], "weight": 1.0},
        {"dir": str(tmp_path), "name": "web", "weight": 3.0},
    )
    pipeline.check_dataset(config)
    labels = np.concatenate(
        [b["label"] for b in _take(iter(pipeline.train_dataset(config, 16)), 4)]
    )
    assert 0.6 <= np.mean(labels == -1) <= 0.9  # three clips of the web set to one labelled
    assert set(labels[labels >= 0]) <= {0, 1, 2, 3}
    # The supervised loss sees only the labelled clips: what the model says of the others
    # changes nothing.
    logits = np.random.default_rng(0).standard_normal((len(labels), 4)).astype(np.float32)
    other = logits.copy()
    other[labels == -1] += 5.0
    loss = lambda x: float(objective.classification_loss(x, labels, multi_label=False))
    assert loss(logits) == pytest.approx(loss(other))
    kept = labels >= 0
    assert loss(logits) == pytest.approx(loss_of(logits[kept], labels[kept]))
    # A labelled dataset with other classes, or one that is not there, fails by its key.
    config.data.mixture = ({"dir": str(tmp_path), "name": "nowhere", "weight": 1.0},)
    with pytest.raises(ConfigError, match=r"config\.data\.mixture\[0\]: no prepared dataset"):
        pipeline.check_dataset(config)


def loss_of(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy, written out."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return float(-np.mean(log_p[np.arange(len(labels)), labels]))


def test_a_damaged_record_is_named_with_its_dataset_split_and_index(demo_data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(demo_data[0], copy)
    shard = next((copy / demo_data[1]).glob("*/*-test.array_record-*"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 64] = bytes(
        b ^ 0xFF for b in data[len(data) // 3 : len(data) // 3 + 64]
    )
    shard.write_bytes(bytes(data))
    source = pipeline.data_source(small_config(str(copy), demo_data[1]), "test")
    with pytest.raises(
        pipeline.CorruptDataError,
        match=r"dataset demo_small, split test, record \d+: damaged on disk \(Corrupted Riegeli",
    ):
        for i in range(len(source)):
            source[i]
