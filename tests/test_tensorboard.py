"""TensorBoard scalars, read back with TensorBoard's own event reader."""

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sora_jax.train.tensorboard import ScalarWriter
from tests.test_train import losses


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_scalars_round_trip_and_a_second_writer_never_overwrites_the_first(tmp_path):
    first = ScalarWriter(tmp_path)
    first.scalar("train/loss", 2.5, 1)
    first.scalar("train/loss", 1.25, 2)
    first.close()
    second = ScalarWriter(tmp_path)  # a resumed run, possibly within the same second
    second.scalar("train/loss", 0.5, 3)
    second.scalar("eval/full/top1", 0.75, 3)
    second.flush()
    assert first.path != second.path
    assert _scalars(tmp_path) == {
        "train/loss": [(1, 2.5), (2, 1.25), (3, 0.5)],
        "eval/full/top1": [(3, 0.75)],
    }
    second.close()


def test_training_writes_tensorboard_scalars_without_importing_tensorflow(short_run):
    # The shared `sora-train` run: 8 steps, logged and evaluated every 4.
    assert (short_run / "tensorflow.txt").read_text() == "False"
    workdir = short_run / "run"
    scalars = _scalars(workdir / "tensorboard")
    # Each logged value is its window's mean of the per-step values in metrics.jsonl.
    per_step = losses(workdir)
    assert [step for step, _ in scalars["train/loss"]] == [4, 8]
    for step, loss in scalars["train/loss"]:
        assert loss == pytest.approx(np.mean([per_step[s] for s in range(step - 3, step + 1)]))
    for name in ("loss", "accuracy", "learning_rate", "grad_norm", "clips_per_s", "data_wait"):
        assert [step for step, _ in scalars[f"train/{name}"]] == [4, 8], name
    for mode in ("full", "audio_only", "video_only"):
        evals = scalars[f"eval/{mode}/top1"]
        assert [step for step, _ in evals] == [4, 8] and all(0 <= top1 <= 1 for _, top1 in evals)
