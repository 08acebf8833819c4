"""Nothing lost in a work dir: the trained state is saved before the final evaluation,
corrupt checkpoints are detected and passed over, one trainer owns the dir, and a resume
keeps its run's config."""

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from sora_jax import config as config_lib
from sora_jax.data import pipeline
from sora_jax.train import checkpoint, evaluate, ownership, setup, trainer
from sora_jax.workdir import checkpoint_choice as workdir_choice
from tests.conftest import ONE_DEVICE, small_config, small_disk


def _config(demo_data):
    c = small_config(*demo_data)
    c.total_steps, c.log_every, c.eval_every = 4, 2, 0
    c.checkpoint.update(every_steps=2, keep=3)
    return c


def _flip_bytes(path) -> None:
    """Same size, same name: only the content differs, as a failing disk leaves it."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_crash_in_the_final_evaluation_loses_nothing_and_corrupt_checkpoints_are_passed_over(
    demo_data, tmp_path, monkeypatch, caplog
):
    config, workdir = _config(demo_data), tmp_path / "run"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while evaluating")

    with monkeypatch.context() as patch:
        patch.setattr(evaluate.Evaluator, "__call__", out_of_memory)
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
            trainer.train(config, workdir, devices=ONE_DEVICE)
    manager = checkpoint.make_manager(workdir, config, read_only=True)
    assert manager.all_steps() == [2, 4]  # the final state was saved before evaluating
    assert all(checkpoint.problem_with(manager, s) is None for s in (2, 4))
    assert (workdir / "checkpoints/4" / checkpoint.DIGESTS).exists()

    # Flip bytes of the final checkpoint's largest array file (the parameters are in it).
    step_dir = workdir / "checkpoints/4"
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip_bytes(largest)
    assert "changed after it was written" in checkpoint.problem_with(manager, 4)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="checkpoint 4 is corrupt"):
        checkpoint.intact_step(manager, 4)  # asked for by step: refused, named
    with caplog.at_level(logging.WARNING, logger="sora_jax"):
        restored = setup.load_for_inference(config, workdir, devices=ONE_DEVICE)  # eval, export
    assert restored.step == 2
    assert "checkpoint 4 is corrupt" in caplog.text and largest.name in caplog.text

    # Resuming sets the corrupt checkpoint aside (nothing deleted) and trains 3..4 again.
    result = trainer.train(config, workdir, devices=ONE_DEVICE)
    assert "top1" in result
    assert (workdir / "corrupt_checkpoints/4").is_dir()
    manager.reload()
    assert manager.all_steps() == [2, 4]
    assert checkpoint.problem_with(manager, 4) is None
    assert checkpoint.intact_step(manager) == 4


def test_a_checkpoint_without_digests_is_never_used_unverified_nor_sealed_later(
    demo_data, tmp_path, caplog
):
    """Digests deleted and bytes flipped: it once evaluated at top-1 0.25 with exit 0, was
    exported with NaN scores, and a resume re-sealed the corrupted files for good."""
    config, workdir = _config(demo_data), tmp_path / "run"
    trainer.train(config, workdir, devices=ONE_DEVICE)
    step_dir = workdir / "checkpoints/4"
    (step_dir / checkpoint.DIGESTS).unlink()
    largest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip_bytes(largest)
    flipped = largest.read_bytes()
    manager = checkpoint.make_manager(workdir, config, read_only=True)
    assert "has no digests" in checkpoint.problem_with(manager, 4)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="checkpoint 4 is unverified"):
        setup.load_for_inference(config, workdir, 4, devices=ONE_DEVICE)  # asked for: refused
    with caplog.at_level(logging.WARNING, logger="sora_jax"):
        restored = setup.load_for_inference(config, workdir, devices=ONE_DEVICE)
    assert restored.step == 2 and "checkpoint 4 is unverified" in caplog.text
    # A resume sets it aside (nothing deleted), trains 3..4 again and seals its own step 4.
    trainer.train(config, workdir, devices=ONE_DEVICE)
    aside = workdir / "unverified_checkpoints/4"
    assert (aside / largest.relative_to(step_dir)).read_bytes() == flipped
    assert not (aside / checkpoint.DIGESTS).exists()  # never sealed after the fact
    manager.reload()
    assert checkpoint.problem_with(manager, 4) is None
    # A work dir whose every checkpoint is unverified (a version before digests) is refused,
    # saying how to adopt one; sealed by hand, it is used.
    for step in (2, 4):
        (workdir / f"checkpoints/{step}" / checkpoint.DIGESTS).unlink()
    with pytest.raises(checkpoint.CorruptCheckpointError, match="--seal WORKDIR STEP"):
        checkpoint.intact_step(manager)
    done = subprocess.run(
        [sys.executable, "-m", "sora_jax.train.checkpoint", "--seal", str(workdir), "4"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert checkpoint.intact_step(manager) == 4


def test_a_work_dir_has_one_trainer_at_a_time_and_a_killed_one_does_not_keep_it(
    demo_data, tmp_path
):
    config, workdir = _config(demo_data), tmp_path / "run"
    held = ownership.Lock(workdir)
    with pytest.raises(ownership.WorkdirBusyError, match=f"in use by another.*pid {os.getpid()}"):
        trainer.train(config, workdir, devices=ONE_DEVICE)
    held.release()
    ownership.Lock(workdir).release()  # free again

    # An owner killed with SIGKILL (no clean-up runs) leaves nothing stuck.
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom sora_jax.train.ownership import Lock\n"
            f"lock = Lock({str(workdir)!r}); print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout.readline().strip() == "locked"
        with pytest.raises(ownership.WorkdirBusyError, match=f"pid {owner.pid}"):
            ownership.Lock(workdir)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    time.sleep(0.1)
    ownership.Lock(workdir).release()


def test_a_resume_with_another_config_is_refused_naming_every_change(demo_data, tmp_path):
    config, workdir = _config(demo_data), tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    config_lib.save(config, workdir)  # as a run leaves its work dir
    changed = _config(demo_data)
    changed.model.fusion.kind = "attention"
    changed.optimizer.learning_rate = 0.1
    changed.total_steps = 8  # may change: trains on
    changed.data.workers = 2  # may not: grain's saved reader position is per worker
    with pytest.raises(config_lib.ConfigError) as e:
        trainer.train(changed, workdir, devices=ONE_DEVICE)
    message = str(e.value)
    assert "config.model.fusion.kind: 'gated' in the run, 'attention' now" in message
    assert "config.optimizer.learning_rate: 0.003 in the run, 0.1 now" in message
    assert "config.data.workers: 0 in the run, 2 now" in message
    assert "total_steps" not in message
    assert "--allow_config_change" in message
    longer = _config(demo_data)
    longer.total_steps = 8
    ownership.check_config_unchanged(longer, workdir)  # no error
    # A new measure changes nothing learned: an evaluator may be added on resume.
    measured = _config(demo_data)
    measured.evals = {"cls": {"type": "classification", "split": "test"}}
    ownership.check_config_unchanged(measured, workdir)  # no error


def test_warmup_beyond_the_last_step_is_said(demo_data, tmp_path, caplog):
    config = _config(demo_data)
    config.optimizer.warmup_steps, config.data.fps = 30, 25.0  # the fps stops it early
    with (
        caplog.at_level(logging.WARNING, logger="sora_jax"),
        pytest.raises(config_lib.ConfigError, match=r"config\.data\.fps"),
    ):
        trainer.train(config, tmp_path / "run", devices=ONE_DEVICE)
    assert "warmup_steps=30 is beyond total_steps=4" in caplog.text


def test_best_is_the_intact_checkpoint_with_the_highest_score_evaluated(demo_data, tmp_path):
    config = _config(demo_data)
    config.checkpoint.keep = 5
    manager = checkpoint.make_manager(tmp_path, config)
    state = {"w": np.arange(4.0)}
    writer = checkpoint.Writer(manager)
    for step, scores in ((1, {"top1": 0.5}), (2, {"top1": 0.9}), (3, None)):
        writer.save(step, state, metrics=scores)
    writer.seal()
    best = lambda evaluated=None: checkpoint.chosen_step(manager, "best", "top1", evaluated)
    assert best() == 2
    assert best({3: {"top1": 0.95}}) == 3  # the final evaluation, made after its save
    assert checkpoint.chosen_step(manager, "latest", "top1") is None  # the newest intact
    assert checkpoint.chosen_step(manager, 1, "top1") == 1
    _flip_bytes(next(p for p in (tmp_path / "checkpoints" / "2").rglob("*") if p.is_file()))
    assert best() == 1  # the best one is corrupt: the next best intact one
    with pytest.raises(FileNotFoundError, match="was evaluated"):
        checkpoint.chosen_step(manager, "best", "retrieval_r1")
    # A digests file a killed seal left half-written is not taken for one of the files.
    writer.save(4, state)
    writer.manager.wait_until_finished()
    stale = tmp_path / "checkpoints" / "4" / f".{checkpoint.DIGESTS}.killed"
    stale.write_text("{")
    writer.seal()
    stale.unlink()
    assert checkpoint.problem_with(manager, 4) is None
    assert workdir_choice("best") == "best" and workdir_choice("300") == 300
    with pytest.raises(ValueError, match="not a step, best or latest"):
        workdir_choice("newest")


def test_a_run_checks_the_data_it_reads_is_the_data_it_trained_on(demo_data, tmp_path):
    """Renamed classes in a copy of the prepared data once gave 'car 0.994' for a red_high
    clip with exit 0; edited shard lengths, an evaluation of half the split."""
    config, workdir = _config(demo_data), tmp_path / "run"
    trainer.train(config, workdir, devices=ONE_DEVICE)
    assert json.loads((workdir / "dataset.json").read_text())["splits"] == {"train": 48, "test": 20}
    copy = tmp_path / "copy"
    shutil.copytree(demo_data[0], copy)
    version = copy / demo_data[1] / "1.0.0"
    names = (version / "label.labels.txt").read_text().split("\n")
    (version / "label.labels.txt").write_text("\n".join(["car", *names[1:]]))
    config.data.dir = str(copy)
    with pytest.raises(config_lib.ConfigError, match=r"class_names: .* when the run trained"):
        setup.load_for_inference(config, workdir, devices=ONE_DEVICE)  # eval, export, embed
    config.total_steps = 6
    with pytest.raises(config_lib.ConfigError, match="not the one the run"):
        trainer.train(config, workdir, devices=ONE_DEVICE)  # resume
    # Edited shard lengths in the metadata: refused before anything reads it.
    (version / "label.labels.txt").write_text("\n".join(names))
    info = json.loads((version / "dataset_info.json").read_text())
    for split in info["splits"]:
        split["shardLengths"] = [str(int(n) // 2) for n in split["shardLengths"]]
    (version / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(
        config_lib.ConfigError, match="its metadata lists 10 clips, its 1 shards hold 20"
    ):
        pipeline.check_dataset(config)


def test_removing_the_lock_file_does_not_let_a_second_trainer_in(tmp_path):
    workdir = tmp_path / "run"
    held = ownership.Lock(workdir)
    (workdir / ".lock").unlink()  # as `rm WORKDIR/.lock` under a running trainer
    with pytest.raises(ownership.WorkdirBusyError, match=r"whose \.lock file was removed"):
        ownership.Lock(workdir)
    held.release()
    ownership.Lock(workdir).release()  # free again


def test_a_lock_that_cannot_be_taken_is_one_line(demo_data, tmp_path):
    workdir = tmp_path / "run"
    (workdir / ".lock").mkdir(parents=True)  # a folder where the lock file goes
    with pytest.raises(
        ownership.WorkdirBusyError, match=r"cannot take the work dir's lock .*\.lock"
    ):
        ownership.Lock(workdir)


def test_a_full_disk_stops_the_run_in_one_line_and_loses_nothing(demo_data, tmp_path):
    """Once about 350 lines of tracebacks from orbax's background threads."""
    with small_disk(tmp_path, "3m") as disk:
        config = _config(demo_data)
        flags = [
            f"--config.data.dir={config.data.dir}",
            f"--config.data.name={config.data.name}",
            *("--config.total_steps=40", "--config.checkpoint.every_steps=2"),
            "--config.checkpoint.keep=20",
        ]
        done = subprocess.run(
            [
                *(sys.executable, "-m", "sora_jax.train.cli"),
                *("--config", "configs/demo.py:runlocal", "--workdir", str(disk / "run")),
                *flags,
            ],
            cwd=pathlib.Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("sora-train: ") and "MB free, checkpoint" in last, last
        assert "Traceback" not in done.stderr
        manager = checkpoint.make_manager(disk / "run", config, read_only=True)
        assert manager.all_steps()  # what was written before stays, intact
        assert all(checkpoint.problem_with(manager, s) is None for s in manager.all_steps())
