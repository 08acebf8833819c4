"""The trainer: sharding equivalence, resumption after SIGTERM/SIGKILL, non-finite
losses, config errors, checkpoint retention and the evaluation command."""

import functools
import json
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sora_jax import config as config_lib
from sora_jax.config import ConfigError
from sora_jax.train import checkpoint, cli, setup, trainer
from tests.conftest import ONE_DEVICE, small_config


def losses(workdir) -> dict[int, float]:
    """Step -> loss from metrics.jsonl; a resumed run's later lines win."""
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]
    return out


def _flags(config) -> list[str]:
    d = config.data
    return [
        f"--config.data.dir={d.dir}",
        f"--config.data.name={d.name}",
        f"--config.total_steps={config.total_steps}",
        f"--config.batch_size={config.batch_size}",
        f"--config.log_every={config.log_every}",
        f"--config.checkpoint.every_steps={config.checkpoint.every_steps}",
        "--config.data.eval_batch_size=8",
        f"--config.data.workers={d.workers}",
        f"--config.data.fps={d.fps}",
    ]


def _train_command(config, workdir, config_file="configs/demo.py:runlocal") -> list[str]:
    return [
        sys.executable,
        "-m",
        "sora_jax.train.cli",
        "--config",
        config_file,
        "--workdir",
        str(workdir),
        *_flags(config),
    ]


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_eight_devices_give_the_same_losses_as_one(demo_data, tmp_path):
    config = small_config(*demo_data)
    config.total_steps, config.log_every = 6, 3
    trainer.train(config, tmp_path / "one", devices=jax.devices()[:1])
    config.mesh.fsdp = 2  # 4 (data) x 2 (fsdp): parameters sharded too
    trainer.train(config, tmp_path / "eight", devices=jax.devices())
    one, eight = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([eight[s] for s in one], [one[s] for s in one], rtol=2e-5)
    assert one[6] < one[1]


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(demo_data, tmp_path):
    config = small_config(*demo_data)
    config.total_steps, config.log_every, config.batch_size = 3, 3, 16
    config.model.modality_dropout = 0.0
    config.model.audio.spec_augment = (0, 0, 0, 0)
    trainer.train(config, tmp_path / "whole")
    config.accum_steps = 2
    trainer.train(config, tmp_path / "accumulated")
    whole, accumulated = losses(tmp_path / "whole"), losses(tmp_path / "accumulated")
    np.testing.assert_allclose([accumulated[s] for s in whole], list(whole.values()), rtol=1e-4)


def _wait_for(predicate, process, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"the run ended (code {process.returncode}) before the signal")
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize(
    "sig,config_file",
    [
        (signal.SIGTERM, "configs/demo.py:runlocal"),
        # SIGKILL mid-pretraining (contrastive, labels never read); the kill path is the
        # same for every config, so one run of it serves both.
        (signal.SIGKILL, "configs/pretrain_av.py:runlocal"),
    ],
)
def test_an_interrupted_run_resumes_with_the_same_losses(demo_data, tmp_path, sig, config_file):
    config = small_config(*demo_data)
    config.total_steps, config.log_every, config.checkpoint.every_steps = 24, 2, 6
    command = lambda workdir: _train_command(config, workdir, config_file)
    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, cwd=ROOT, capture_output=True)
    windows = [json.loads(x) for x in (reference / "throughput.jsonl").read_text().splitlines()]
    # Data wait counts only the fetches the device had to wait for: a part of the fetch time,
    # and at least the first fetch, made before any step was dispatched.
    assert all(0 <= w["data_wait"] <= w["input_fetch"] <= 1 for w in windows), windows
    assert windows[0]["data_wait"] > 0
    workdir = tmp_path / "interrupted"
    process = subprocess.Popen(
        command(workdir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = workdir / "metrics.jsonl"
    ckpts = workdir / "checkpoints"
    if sig == signal.SIGTERM:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 8, process)
    else:  # SIGKILL as soon as there is a checkpoint, possibly mid-write of the next one
        _wait_for(
            lambda: ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir()), process
        )
    process.send_signal(sig)
    process.wait(timeout=60)
    interrupted_at = max(losses(workdir))
    assert interrupted_at < config.total_steps, "the signal came too late to test anything"
    if sig == signal.SIGTERM:
        assert process.returncode == 0
        manager = ocp.CheckpointManager(ckpts.absolute())
        assert manager.latest_step() == interrupted_at  # saved on the way out
    subprocess.run(command(workdir), check=True, cwd=ROOT, capture_output=True)
    resumed, expected = losses(workdir), losses(reference)
    assert sorted(resumed) == sorted(expected) == list(range(1, 25))
    # Steps run again after the checkpoint replace their earlier lines: each logged once.
    logged = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert logged == list(range(1, 25)), logged
    np.testing.assert_allclose([resumed[s] for s in expected], list(expected.values()), rtol=1e-6)


def _live_children(pid: int) -> set[int]:
    """Processes whose parent is `pid` and that have not exited (from /proc)."""
    children = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(parent) == pid and state != "Z":
            children.add(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_decoding_workers_behind(demo_data, tmp_path):
    config = small_config(*demo_data)
    config.data.workers, config.total_steps, config.log_every = 2, 10_000, 2
    process = subprocess.Popen(
        _train_command(config, tmp_path),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = tmp_path / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 4, process)
    workers = _live_children(process.pid)
    assert len(workers) >= 2, workers  # grain's decoding processes (and its resource tracker)
    process.kill()  # SIGKILL: none of the trainer's own cleanup runs
    process.wait(timeout=60)
    deadline = time.monotonic() + 20
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived the killed trainer"


def test_a_non_finite_loss_stops_the_run_naming_the_step(demo_data, tmp_path):
    config = small_config(*demo_data)
    config.optimizer.update(
        learning_rate=1e12, grad_clip=0.0, warmup_steps=0, schedule="constant", name="sgd"
    )
    config.total_steps, config.log_every, config.checkpoint.every_steps = 40, 4, 2
    with pytest.raises(trainer.NonFiniteError, match=r"at step (\d+)") as error:
        trainer.train(config, tmp_path, ONE_DEVICE)
    bad_step = int(error.value.args[0].split("at step ")[1].split(";")[0])
    saved = ocp.CheckpointManager((tmp_path / "checkpoints").absolute()).all_steps()
    assert all(step < bad_step for step in saved), (saved, bad_step)
    if saved:  # what is known, said: the step it can resume from, or that there is none
        assert f"the last checkpoint, step {max(saved)}, is from before it" in str(error.value)
    else:
        assert "no checkpoint was written before it" in str(error.value)


def test_bad_configs_fail_before_compiling_and_name_the_key(demo_data, tmp_path):
    # In this process, on its eight devices (a batch of 12 does not split over them).
    bad_values = {
        "model.fusion.kind": "bogus",
        "model.num_classes": 7,
        "data.fps": 25.0,
        "batch_size": 12,
        "accum_steps": 3,
        "data.crop_size": 48,  # the dataset's frames are 40 px high: all would be upscaled
    }
    for key, value in bad_values.items():
        config = small_config(*demo_data)
        *parents, leaf = key.split(".")
        setattr(functools.reduce(getattr, parents, config), leaf, value)
        with pytest.raises(ConfigError, match=re.escape(f"config.{key}")):
            trainer.train(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    # Every disagreement with the dataset at once, not one per attempt.
    config = small_config(*demo_data)
    config.model.num_classes, config.data.fps, config.data.eval_split = 7, 25.0, "dev"
    with pytest.raises(ConfigError) as error:
        trainer.train(config, tmp_path / "w")
    assert [line.split(":")[0] for line in str(error.value).splitlines()] == [
        "config.model.num_classes",
        "config.data.fps",
        "config.data.eval_split",
    ]
    # A key no part of the model has (a typo in a config file) is named, not ignored.
    config = small_config(*demo_data)
    config.model.visual.widht = (8, 16)
    with pytest.raises(ConfigError, match=r"model\.visual: \['widht'\] are not settings of Vis"):
        trainer.train(config, tmp_path / "w")
    no_data = small_config(*demo_data)
    no_data.data.dir = "/nowhere"
    with pytest.raises(FileNotFoundError, match="no prepared dataset 'demo_small' under"):
        trainer.train(no_data, tmp_path / "w")
    # Overrides naming no key: the key, where, and the nearest keys there.
    override = lambda flag: cli._unknown_key(["--config", "configs/demo.py:runlocal", flag])
    assert override("--config.model.fuson.kind=gated") == (
        "--config.model.fuson.kind: config.model has no key 'fuson'; did you mean fusion?"
    )
    assert "config.total_steps is a value, not a group" in override("--config.total_steps.every=2")
    # The command: each way a user's error reaches it (a config check, an unknown key, a
    # value absl cannot parse) is a line or two naming the key, exit code 2, no traceback.
    config = small_config(*demo_data)  # a good one: only the flag below is wrong
    cases = [
        ("--config.model.fusion.kind=bogus", "config.model.fusion.kind"),
        ("--config.model.fuson.kind=gated", "config.model has no key 'fuson'; did you mean"),
        ("--config.total_steps=many", "--config.total_steps=many: invalid literal"),
    ]
    for flag, key in cases:
        done = subprocess.run(
            [*_train_command(config, tmp_path / "w"), flag],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, (flag, done.stderr[-2000:])
        assert key in done.stderr, (flag, done.stderr[-2000:])
        assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 3, done.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.mark.slow
def test_a_run_too_large_for_its_devices_fails_before_allocating_with_the_figures(
    demo_data, tmp_path
):
    config = small_config(*demo_data)
    # A million 16-frame clips: terabytes of activations (2.4 TiB), on any host. (A larger
    # batch only slows the compile: XLA constant-folds batch-sized index arrays.)
    config.batch_size = 2**20
    config.data.update(num_frames=16)
    with pytest.raises(ConfigError, match=r"config\.batch_size: the train step needs") as error:
        trainer.train(config, tmp_path / "w", ONE_DEVICE)
    figures = re.search(
        r"needs ([\d.]+) GiB per device .* a device has ([\d.]+) GiB", str(error.value)
    )
    assert float(figures[1]) > 1000 > float(figures[2]), str(error.value)
    assert "batch_size=1048576" in str(error.value) and "mesh.fsdp=1" in str(error.value)
    # The same for the evaluation: its step is compiled and checked before training starts.
    config.batch_size, config.data.eval_batch_size = 8, 2**20
    with pytest.raises(ConfigError, match=r"config\.data\.eval_batch_size: the eval step needs"):
        trainer.train(config, tmp_path / "w", ONE_DEVICE)
    assert not (tmp_path / "w").exists()  # nothing written, nothing allocated


def test_checkpoints_keep_the_last_k_plus_the_best(tmp_path):
    config = small_config("unused", "unused")
    config.checkpoint.keep = 2
    manager = checkpoint.make_manager(tmp_path, config)
    state = {"w": np.arange(4.0)}
    writer = checkpoint.Writer(manager)
    for step, top1 in zip(range(1, 6), (0.3, 0.9, 0.5, 0.4, 0.2), strict=True):
        writer.save(step, state, metrics={"top1": top1, "map": top1})
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 4, 5]
    manager.close()
    # ... and after a restart too: each checkpoint's scores were written with it.
    reopened = checkpoint.make_manager(tmp_path, config)
    writer = checkpoint.Writer(reopened)
    writer.save(6, state, metrics={"top1": 0.1, "map": 0.1})
    reopened.wait_until_finished()
    assert reopened.all_steps() == [2, 5, 6]
    reopened.close()


def test_each_step_compiles_once_per_run_and_steps_can_be_profiled(short_run):
    compiled = json.loads((short_run / "compiles.json").read_text())
    assert compiled.count("jit(train_step)") == 1, compiled
    assert compiled.count("jit(eval_step)") == 1, compiled  # two evaluations
    result = json.loads((short_run / "run" / "eval_test.json").read_text())
    assert result["step"] == 8 and result["num_examples"] == 20
    # A trace TensorBoard's profile tab opens: tensorboard/plugins/profile/<run>/*.xplane.pb
    profiles = short_run / "run" / "tensorboard" / "plugins" / "profile"
    traces = list(profiles.glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_sora_eval_reports_all_three_modes_as_json(short_run, tmp_path):
    workdir = short_run / "run"
    config = config_lib.load(workdir)
    config.total_steps = 2  # below the checkpoint: refused, and config.json left as it was
    with pytest.raises(ConfigError, match=r"config\.total_steps: 2 is below step 8"):
        trainer.train(config, workdir, ONE_DEVICE)
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 8
    done = subprocess.run(
        [pathlib.Path(sys.executable).parent / "sora-eval", "--workdir", str(workdir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["num_examples"] == 20 and result["step"] == 8
    for key in ("top1", "top5"):
        assert 0.0 <= result[key] <= 1.0
    assert {"top1"} <= set(result["audio_only"]) and {"top1"} <= set(result["video_only"])
    details = json.loads((workdir / "eval_test.json").read_text())
    assert sum(map(sum, details["confusion_matrix"])) == 20
    for mode in ("full", "audio_only", "video_only"):
        assert (workdir / f"confusion_test_{mode}.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_demo_config_learns_the_demo_with_both_senses(tmp_path):
    """The README's claim: fused >= 95%, each sense alone near the 50% ceiling."""
    from configs import demo
    from data_prep import builder, layouts
    from data_prep.synthetic import make_demo_dataset
    from data_prep.worker import PrepSettings

    raw = make_demo_dataset(tmp_path / "raw")
    builder.prepare(
        layouts.discover(raw),
        tmp_path / "data",
        "sora_demo",
        PrepSettings(fps=8.0, short_side=40),
        workers=2,
    )
    config = demo.get_config()
    config.data.dir = str(tmp_path / "data")
    result = trainer.train(config, tmp_path / "run", ONE_DEVICE)
    assert result["top1"] >= 0.95, result["top1"]
    for mode in ("audio_only", "video_only"):
        assert 0.35 <= result[mode]["top1"] <= 0.65, (mode, result[mode]["top1"])


def test_inference_restores_only_the_parameters_it_evaluates(short_run):
    workdir = short_run / "run"
    config = config_lib.load(workdir)
    abstract = setup.build(config).abstract_state
    reader = checkpoint.make_manager(workdir, config, read_only=True)
    full = checkpoint.restore(reader, 8, abstract)

    def restored(use_ema, abstract=abstract):
        manager = checkpoint.make_manager(workdir, config, read_only=True)
        return checkpoint.restore_params(manager, None, abstract, use_ema)

    for use_ema, expected in ((True, full.ema_params), (False, full.params)):
        params, step = restored(use_ema)
        assert step == 8
        jax.tree.map(np.testing.assert_array_equal, params, expected)
    assert not jax.tree.all(jax.tree.map(np.array_equal, full.params, full.ema_params))
    # The optimizer state is never read: an abstract state with another optimizer's
    # state (SGD's momentum instead of Adam's moments) restores the same parameters.
    config.optimizer.name = "sgd"
    other = setup.build(config).abstract_state
    assert jax.tree.structure(other.opt_state) != jax.tree.structure(abstract.opt_state)
    jax.tree.map(np.testing.assert_array_equal, restored(True, other)[0], full.ema_params)


def test_a_users_mistakes_are_one_line_each(short_run, tmp_path, capsys):
    """Each of these once ended in a traceback."""
    from sora_jax.export import predict

    workdir = short_run / "run"
    missing = subprocess.run(
        [sys.executable, "-m", "sora_jax.train.cli", "--config", "missing.py", "--workdir", "w"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip() == "sora-train: --config missing.py: no such file"
    assert cli.eval_main(["--workdir", str(workdir), "--split", "nosuch"]) == 2
    assert "no split 'nosuch' in demo_small (has ['test', 'train'])" in capsys.readouterr().err
    # A config.json cut short (a full disk, an editor): named, not a JSON traceback.
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((workdir / "config.json").read_text()[:100])
    assert cli.eval_main(["--workdir", str(damaged)]) == 2
    assert f"{damaged / 'config.json'} is damaged" in capsys.readouterr().err
    # Two files of one name would write one explanation over the other.
    clips = [tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"]
    with pytest.raises(SystemExit) as exited:
        predict.main(
            ["--export", str(tmp_path), "--explain", str(tmp_path / "x"), *map(str, clips)]
        )
    assert exited.value.code == 2
    assert "--explain: several files are named clip" in capsys.readouterr().err
