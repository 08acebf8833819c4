"""The av_sync objective and evaluator: the shift, the pooling onto frame times and the loss
against answers worked out by hand; a run on real timing-set clips that trains, evaluates
and is ranked by its evaluator; the config mistakes they refuse; and (slow) the proof that
the objective learns what the contrastive objective cannot: when a sound happens."""

import functools
import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import av_sync
from sora_jax import config as config_lib
from sora_jax.config import ConfigError
from sora_jax.data import pipeline
from sora_jax.objectives import av_sync as objective
from sora_jax.train import cli, setup, trainer
from tests.conftest import ONE_DEVICE, built_once
from tests.test_tensorboard import _scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_a_shift_rolls_each_clips_own_samples_and_leaves_padding():
    audio = jnp.asarray([np.arange(10), [*range(6), 0, 0, 0, 0]], jnp.float32)
    shifted = objective.shift_audio(audio, jnp.asarray([10, 6]), jnp.asarray([3, 2]))
    # What is heard at t + offset is heard at t, circularly within the clip's own length.
    np.testing.assert_array_equal(shifted[0], [3, 4, 5, 6, 7, 8, 9, 0, 1, 2])
    np.testing.assert_array_equal(shifted[1], [2, 3, 4, 5, 0, 1, 0, 0, 0, 0])


def test_offsets_keep_clear_of_no_shift_and_mark_clips_too_short():
    rate = config_lib.SAMPLE_RATE
    lengths = jnp.asarray([2 * rate, 2 * rate, rate * 4 // 5])  # 2 s, 2 s, 0.8 s
    offset, usable = objective.offsets(jnp.asarray([0.0, 0.999, 0.5]), lengths, 0.5, 3.0)
    # From 0.5 s up to the clip's length less 0.5 s (a roll by 1.9 s of 2 s is 0.1 s back).
    assert offset[0] == rate // 2 and rate // 2 <= offset[1] <= 3 * rate // 2
    assert offset[1] > 1.49 * rate
    assert usable.tolist() == [True, True, False]  # 0.8 s has no shift of 0.5 s both ways


def test_audio_steps_pool_onto_the_frames_they_fall_in():
    seq = jnp.arange(8, dtype=jnp.float32).reshape(1, 8, 1)
    pooled, heard = objective._onto_frames(seq, jnp.ones((1, 8), bool), frames=4)
    np.testing.assert_allclose(pooled[0, :, 0], [0.5, 2.5, 4.5, 6.5])
    mask = jnp.asarray([[True, True, False, False, True, True, True, True]])
    pooled, heard = objective._onto_frames(seq, mask, frames=4)
    assert heard[0].tolist() == [True, False, True, True]  # frame 1's span heard nothing


def _pattern(events: np.ndarray) -> np.ndarray:
    """[B, T] bool -> [B, T, 2] unit vectors: e1 at an event, e0 elsewhere."""
    return np.stack([~events, events], axis=-1).astype(np.float32)


def test_the_loss_prefers_the_true_moment_to_the_shifted_one():
    settings = av_sync.get_config().objectives.av_sync
    events = np.zeros((4, 8), bool)
    for clip, t in enumerate((1, 3, 5, 6)):
        events[clip, t] = True
    true, shifted = _pattern(events), _pattern(np.roll(events, 3, axis=1))
    batch = {
        "frame_mask": np.ones((4, 8), bool),
        "has_video": np.ones(4, bool),
        "has_audio": np.ones(4, bool),
        "shift_usable": np.ones(4, bool),
    }
    out = {"sync_video": true, "sync_audio": true, "sync_shifted_audio": shifted}
    loss, metrics = objective.OBJECTIVE.loss(out, batch, settings, None, None, 1)
    # Own score 1 (every moment agrees); shifted 6/8 (the event lands elsewhere: 2 of 8
    # moments disagree); another clip's 6/8. Worked out: -log(e^10 / (e^10 + 4 e^7.5)).
    want = -np.log(np.exp(10) / (np.exp(10) + 4 * np.exp(7.5)))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    assert float(metrics["sync_accuracy"]) == 1.0 and float(metrics["sync_top1"]) == 1.0
    # A model that hears the shifted soundtrack as the true one: every comparison lost.
    swapped = {"sync_video": true, "sync_audio": shifted, "sync_shifted_audio": true}
    worse, metrics = objective.OBJECTIVE.loss(swapped, batch, settings, None, None, 1)
    assert float(metrics["sync_accuracy"]) == 0.0 and float(worse) > float(loss) + 2


@pytest.fixture(scope="module")
def timing_data(tmp_path_factory):
    from av_sync import prepare_timing_set

    build = lambda root: prepare_timing_set(root, train=24, test=8)
    return built_once(tmp_path_factory, "timing", build) / "data"


def _config(data_dir, steps: int = 6):
    c = av_sync.get_config("runlocal")
    c.data.dir = str(data_dir)
    c.total_steps, c.eval_every, c.checkpoint.every_steps = steps, steps // 2, steps // 2
    return c


@pytest.mark.slow  # a training run (~30 s): make test-slow and CI
def test_a_sync_run_trains_is_evaluated_by_name_and_ranks_its_checkpoints(
    timing_data, tmp_path, capsys
):
    workdir = tmp_path / "sync"
    result = trainer.train(_config(timing_data), workdir, ONE_DEVICE)
    sync = result["evals"]["sync"]
    assert 0.0 <= sync["accuracy"] <= 1.0 and sync["num_windows"] >= sync["num_clips"] > 0
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all(np.isfinite(r["sync_loss"]) and np.isfinite(r["contrastive_loss"]) for r in steps)
    evaluated = [r for r in rows if "loss" not in r]  # the evaluator's rows, by name
    assert [r["step"] for r in evaluated] == [3, 6]
    assert evaluated[-1]["sync/accuracy"] == sync["accuracy"]
    # Its metrics under its name: TensorBoard, and sora-eval's one JSON line.
    assert len(_scalars(workdir / "tensorboard")["eval/sync/accuracy"]) == 2
    capsys.readouterr()
    assert cli.eval_main(["--workdir", str(workdir), "--checkpoint", "best"]) == 0
    brief = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(brief["sync"]) == {"accuracy", "margin", "num_windows", "num_clips"}
    assert "v2a_r1" in brief["retrieval"]


def _no_sound_objective(c):
    c.objectives.supervised.weight = 1.0
    c.objectives.contrastive.weight = c.objectives.av_sync.weight = 0.0


# (what is changed, as key=value or a function; which check must refuse it; the error)
MISTAKES = [
    ("data.num_frames", 4, "config", r"objectives\.av_sync\.min_offset_s: .* 0\.50 s"),
    ("evals.sync.type", "lip_reading", "config", r"evals\.sync\.type: 'lip_reading' is not"),
    ("evals.sync.max_offset", 2.0, "config", r"\['max_offset'\] are not av_sync settings"),
    ("checkpoint.best_metric", "synch/accuracy", "config", r"no evaluator 'synch'"),
    ("evals.sync.split", "validation", "data", r"evals\.sync\.split: no split 'validation'"),
    (_no_sound_objective, None, "config", r"evals\.sync: scores a sound against a picture"),
]


@pytest.mark.parametrize(("key", "value", "check", "error"), MISTAKES)
def test_sync_config_mistakes_fail_before_compiling_and_name_the_key(
    timing_data, key, value, check, error
):
    c = _config(timing_data)
    if callable(key):
        key(c)
    else:
        *parents, leaf = key.split(".")
        functools.reduce(getattr, parents, c)[leaf] = value  # a typo'd key is added too
    with pytest.raises(ConfigError, match=error):
        setup.check_config(c) if check == "config" else pipeline.check_dataset(c)


@pytest.mark.slow
def test_the_sync_objective_learns_timing_the_contrastive_one_cannot(tmp_path):
    """configs/av_sync.py:small, as bench/av_sync.py runs it for BENCHMARKS §12, on fewer
    clips: the timing set, where every clip has the same flashes and clicks at other
    moments. Measured on held-out windows against their own sound shifted 0.5-1.5 s."""
    from av_sync import prepare_timing_set, sync_run

    data = prepare_timing_set(tmp_path, train=96, test=24)
    control = sync_run(data, tmp_path / "control", 0.0, 0, total_steps=120, eval_every=60)
    synced = sync_run(data, tmp_path / "synced", 1.0, 0, total_steps=120, eval_every=60)
    control, synced = control["evals"]["sync"], synced["evals"]["sync"]
    assert synced["accuracy"] >= 0.9, synced
    assert 0.3 <= control["accuracy"] <= 0.7, control  # chance, 0.5: it pools time away
