"""Runs where pods run: a work dir, data and exports in a bucket (gs://), against a real GCS
server on 127.0.0.1 (tests/gcs_server.py): the bytes go over HTTP, nothing is mocked.
A URL that cannot be honoured fails at once; it never becomes a local folder `gs:`."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from data_prep import cli as prep_cli
from data_prep.synthetic import make_demo_dataset
from sora_jax import storage
from sora_jax.config import ConfigError
from sora_jax.data import pipeline
from sora_jax.export import embed, predict
from sora_jax.export import export as export_lib
from sora_jax.train import checkpoint, ownership, setup, trainer
from tests.conftest import ONE_DEVICE, ROOT, small_config


@pytest.mark.parametrize(
    "url",
    ["gs:/sora-test/run", "gs://", "gs:///run", "s3://bucket/run", "http://host/run", "GS://x/r"],
)
def test_a_url_that_cannot_be_honoured_fails_naming_it(url):
    with pytest.raises(storage.StorageError, match="gs://"):
        storage.path(url)


def test_local_paths_and_bucket_urls_are_kept_as_given():
    assert os.fspath(storage.path("gs://sora-test/runs/x/")) == "gs://sora-test/runs/x"
    assert storage.is_remote(storage.path("gs://sora-test/runs/x"))
    assert os.fspath(storage.path("runs/demo")) == "runs/demo"
    assert os.fspath(storage.path("a:b")) == "a:b"  # a colon in a local name is no scheme


def test_sora_train_refuses_a_malformed_bucket_url_and_makes_no_local_folder(tmp_path):
    """Before storage.py, `--workdir gs:/sora-test/run` trained into ./gs:/sora-test/run."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "sora_jax.train.cli", "--config", f"{ROOT}/configs/demo.py"),
            *("--workdir", "gs:/sora-test/run", "--config.data.dir=/nonexistent"),
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "sora-train: gs:/sora-test/run is not a URL of the form gs://BUCKET/PATH"
    ]
    assert list(tmp_path.iterdir()) == []


def _bucket_files(gcs, prefix: str) -> list[str]:
    return storage.files_under(epath.Path(f"{gcs[1]}/{prefix}"))


def _config(data_dir: str, name: str):
    c = small_config(data_dir, name)
    c.total_steps, c.log_every, c.eval_every = 4, 2, 0
    c.checkpoint.update(every_steps=2, keep=3)
    return c


def _flip_object(url: str) -> None:
    """The object rewritten with the same size and other bytes, as a faulty writer or
    disk behind the store would leave it."""
    path = epath.Path(url)
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow  # a drill: train, resume, fall back, export (make test-slow and CI)
def test_a_bucket_work_dir_trains_resumes_falls_back_and_exports_in_the_bucket(
    gcs, demo_data, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)  # where a `gs:` folder would appear
    data_dir, name = f"{gcs[1]}/data", demo_data[1]
    storage.copy_tree(epath.Path(demo_data[0], name), epath.Path(data_dir, name))
    run = f"{gcs[1]}/runs/cloud"
    config = _config(data_dir, name)  # the data read from the bucket too
    trainer.train(config, run, devices=ONE_DEVICE)
    held = _bucket_files(gcs, "runs/cloud")
    for kept in ("config.json", "metrics.jsonl", "throughput.jsonl", "eval_test.json"):
        assert kept in held
    assert {"checkpoints/2/sora_sha256.json", "checkpoints/4/sora_sha256.json"} <= set(held)
    assert any(n.startswith("tensorboard/events.out.tfevents.") for n in held)
    assert ".lock" not in held  # the lease is given back

    # A resume with another config is refused, as on a local disk.
    changed = _config(data_dir, name)
    changed.optimizer.learning_rate = 0.1
    with pytest.raises(ConfigError, match=r"config\.optimizer\.learning_rate: 0\.003 in the run"):
        trainer.train(changed, run, devices=ONE_DEVICE)
    # Resume: the same command with a longer run trains on from step 4 in the bucket.
    config.total_steps = 6
    trainer.train(config, run, devices=ONE_DEVICE)
    lines = [json.loads(x) for x in epath.Path(f"{run}/metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]

    # A corrupt object in the newest checkpoint: readers fall back to the newest intact one.
    manager = checkpoint.make_manager(run, config, read_only=True)
    assert manager.all_steps() == [2, 4, 6]
    array_file = next(n for n in _bucket_files(gcs, "runs/cloud/checkpoints/6") if "/d/" in n)
    _flip_object(f"{run}/checkpoints/6/{array_file}")
    with caplog.at_level(logging.WARNING, logger="sora_jax"):
        restored = setup.load_for_inference(config, run, devices=ONE_DEVICE)
    assert restored.step == 4
    assert (
        "checkpoint 6 is corrupt" in caplog.text and "changed after it was written" in caplog.text
    )
    # ... and a resume sets it aside in the bucket (nothing deleted) and writes step 6 anew.
    trainer.train(config, run, devices=ONE_DEVICE)
    held = _bucket_files(gcs, "runs/cloud")
    assert f"corrupt_checkpoints/6/{array_file}" in held
    assert checkpoint.problem_with(checkpoint.make_manager(run, config, read_only=True), 6) is None

    # Export into the bucket, refusing the work dir; then predict from the bucket.
    with pytest.raises(export_lib.OutputError, match="would replace the work dir"):
        export_lib.export(run, gcs[1] + "/runs")
    export_lib.export(run, f"{gcs[1]}/exports/cloud")
    export_lib.export(run, f"{gcs[1]}/exports/cloud")  # a previous export is replaced
    exported = _bucket_files(gcs, "exports/cloud")
    assert "model_card.json" in exported and "model.jax" in exported
    raw = make_demo_dataset(tmp_path / "raw", train_per_class=0, test_per_class=1, seed=5)
    clip = next(raw.rglob("*.mp4"))
    assert predict.main(["--export", f"{gcs[1]}/exports/cloud", str(clip)]) == 0
    from sora_jax.media.predictor import Predictor  # the client itself: a local folder only

    with pytest.raises(ValueError, match="the client reads a local folder"):
        Predictor(f"{gcs[1]}/exports/cloud")

    # Embeddings of the bucket's data from the bucket's run, and of a file from its export.
    assert embed.main(["--workdir", run, "--split", "test", "--out", "split.npz"]) == 0
    assert np.load(tmp_path / "split.npz")["embedding"].shape[0] == 20
    assert embed.main(["--export", f"{gcs[1]}/exports/cloud", str(clip), "--out", "f.npz"]) == 0
    # A new run starts from the bucket's run (config.init_from), into the bucket.
    config.init_from, config.total_steps = run, 2
    with caplog.at_level(logging.INFO, logger="sora_jax"):
        trainer.train(config, f"{gcs[1]}/runs/from_cloud", devices=ONE_DEVICE)
    assert f"of {run}" in caplog.text
    assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))


def test_a_prepared_dataset_in_a_bucket_is_read_where_it_lies(gcs, tmp_path, capsys):
    """From raw clips in a bucket to a dataset in the bucket, read in place."""
    raw = make_demo_dataset(tmp_path / "raw", train_per_class=2, test_per_class=1, seed=2)
    storage.copy_tree(epath.Path(raw), epath.Path(f"{gcs[1]}/raw"))
    data_dir = f"{gcs[1]}/prepared"
    prep = [
        f"{gcs[1]}/raw",
        "--out",
        data_dir,
        "--name",
        "tiny",
        "--short-side",
        "40",
        "--workers",
        "1",
    ]
    # Another sora-prep building it (on another host): refused by its lease, in one line.
    lease = epath.Path(f"{data_dir}/.tiny.lock")
    lease.write_text(json.dumps({"pid": 7, "host": "elsewhere", "expires": time.time() + 60}))
    assert prep_cli.main(prep) == 2
    assert "being prepared by another sora-prep (pid 7 on elsewhere" in capsys.readouterr().err
    assert not epath.Path(f"{data_dir}/tiny").exists()
    lease.unlink()
    assert prep_cli.main(prep) == 0
    assert "tiny: 12 kept, 0 skipped; prepared" in capsys.readouterr().out
    assert not lease.exists()  # given back
    assert prep_cli.main(prep) == 0  # the same inputs: the bucket's dataset is re-used
    assert "already up to date" in capsys.readouterr().out
    summary = pipeline.dataset_summary(data_dir, "tiny")
    assert summary.splits == {"train": 8, "test": 4}
    source = pipeline.data_source(small_config(data_dir, "tiny"), "test")
    assert len(source) == 4 and source[0]["num_frames"] > 0  # ArrayRecord read over HTTP
    assert epath.Path(f"{data_dir}/tiny_report.json").exists()
    with pytest.raises(FileNotFoundError, match="no prepared dataset 'other'"):
        pipeline.dataset_summary(data_dir, "other")


def test_beam_prepares_into_a_bucket_and_a_remote_runner_is_refused(gcs, tmp_path, capsys):
    """The DirectRunner builds here and uploads; a remote runner's workers could not write
    ArrayRecord shards into the bucket, so it is refused before any work, in one line."""
    raw = make_demo_dataset(tmp_path / "raw", train_per_class=1, test_per_class=1, seed=3)
    out = f"{gcs[1]}/beam"
    assert (
        prep_cli.main([str(raw), "--out", out, "--name", "b", "--beam", "--short-side", "40"]) == 0
    )
    assert pipeline.dataset_summary(out, "b").splits == {"train": 4, "test": 4}
    remote = "--runner=DataflowRunner --project=p --region=r"
    capsys.readouterr()
    assert prep_cli.main([str(raw), "--out", out, "--name", "c", "--beam", remote]) == 2
    assert "remote workers cannot write the shards" in capsys.readouterr().err


def _hold_lease(url: str, lease_s: float = 60) -> subprocess.Popen:
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nfrom sora_jax.train.ownership import Lock\n"
            f"lock = Lock({url!r}, {lease_s}); print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert owner.stdout.readline().strip() == "locked"
    return owner


def test_a_bucket_work_dir_has_one_owner_by_a_lease(gcs):
    run = f"{gcs[1]}/runs/leased"
    lease = epath.Path(f"{run}/.lock")
    held = ownership.Lock(run)
    with pytest.raises(ownership.WorkdirBusyError, match=f"pid {os.getpid()} on .*runs 60 s more"):
        ownership.Lock(run)
    held.release()
    assert not lease.exists()

    # A live owner in another process is refused; killed, its lease is taken at once here
    # (its host is this one, and its pid is gone).
    owner = _hold_lease(run)
    try:
        with pytest.raises(ownership.WorkdirBusyError, match=f"pid {owner.pid}"):
            ownership.Lock(run)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    ownership.Lock(run).release()

    # An owner on another host: refused while its lease runs, taken over once it expired.
    other = {"pid": 1, "host": "another-host", "expires": time.time() + 30}
    lease.write_text(json.dumps(other))
    with pytest.raises(ownership.WorkdirBusyError, match="pid 1 on another-host"):
        ownership.Lock(run)
    lease.write_text(json.dumps(other | {"expires": time.time() - 1}))
    taken = ownership.Lock(run)
    assert json.loads(lease.read_text())["pid"] == os.getpid()
    taken.release()


def test_a_bucket_lease_is_renewed_while_its_owner_lives(gcs):
    run = f"{gcs[1]}/runs/renewed"
    owner = _hold_lease(run, lease_s=1.5)
    try:
        time.sleep(3)  # two lives of the lease: alive only because it was renewed
        with pytest.raises(ownership.WorkdirBusyError, match=f"pid {owner.pid}"):
            ownership.Lock(run)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()


def _command(name: str, *args: str) -> list[str]:
    """A console script of this environment (sora-prep, sora-train, ...), as a user runs it."""
    return [os.path.join(os.path.dirname(sys.executable), name), *args]


STEPS = 240  # long enough that a second trainer starts while the first still trains


@pytest.mark.slow
def test_two_processes_prepare_train_resume_evaluate_and_export_in_a_bucket(
    gcs, tmp_path, no_compilation_cache
):
    """The pod path end to end, 2 processes x 2 CPU devices (launch/local.py): sora-prep into
    the bucket, sora-train from it into the bucket, SIGKILL mid-run (a second trainer is
    refused while the first runs), the same command resumes to the uninterrupted run's
    losses, then sora-eval, sora-export into the bucket and sora-predict from it."""
    raw = make_demo_dataset(tmp_path / "raw", train_per_class=6, test_per_class=2, seed=4)
    bucket, data = gcs[1], f"{gcs[1]}/e2e/data"
    run_in = lambda args, **kw: subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, **kw
    )
    prep = run_in(
        _command(
            *("sora-prep", str(raw), "--out", data, "--name", "e2e"),
            *("--fps", "8", "--short-side", "40", "--workers", "1"),
        )
    )
    assert prep.returncode == 0, prep.stderr[-3000:]

    def train(workdir: str) -> list[str]:
        return [
            *_command("sora-train", "--config", f"{ROOT}/configs/demo.py:runlocal"),
            f"--workdir={workdir}",
            f"--config.data.dir={data}",
            "--config.data.name=e2e",
            f"--config.total_steps={STEPS}",
            "--config.log_every=1",
            "--config.eval_every=0",
            "--config.checkpoint.every_steps=20",
            "--config.distributed.heartbeat_timeout_s=5",
        ]

    def launch_two(args: list[str]) -> subprocess.Popen:
        return subprocess.Popen(
            [
                *(sys.executable, f"{ROOT}/launch/local.py", "--processes", "2"),
                *("--devices-per-process", "2", "--", *args),
            ],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # one process group: the launcher and both runs
        )

    reference = launch_two(train(f"{bucket}/e2e/reference"))
    out = reference.communicate(timeout=900)[0]
    assert reference.returncode == 0, out[-3000:]

    run = f"{bucket}/e2e/run"
    first = launch_two(train(run))
    deadline = time.time() + 600
    while "checkpoints/40/sora_sha256.json" not in _bucket_files(gcs, "e2e/run"):
        assert time.time() < deadline and first.poll() is None, "no progress"
        time.sleep(0.2)
    second = run_in(train(run))
    assert second.returncode == 2, second.stderr[-2000:]
    assert "is in use by another sora-train" in second.stderr
    assert first.poll() is None  # refused while the first was training, not after
    os.killpg(first.pid, signal.SIGKILL)  # no clean-up runs anywhere
    first.wait()
    resumed = launch_two(train(run))
    out = resumed.communicate(timeout=900)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from step" in out
    got, want = _bucket_losses(run), _bucket_losses(f"{bucket}/e2e/reference")
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-5)

    evaluated = run_in(_command("sora-eval", "--workdir", run))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout.splitlines()[-1])["step"] == STEPS
    exported = run_in(_command("sora-export", "--workdir", run, "--output", f"{bucket}/e2e/export"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    clip = next(raw.rglob("*.mp4"))
    predicted = run_in(_command("sora-predict", "--export", f"{bucket}/e2e/export", str(clip)))
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "scores" in json.loads(predicted.stdout.splitlines()[-1])
    held = _bucket_files(gcs, "e2e/run")
    steps = {n.split("/")[1] for n in held if n.startswith("checkpoints/")}
    assert str(STEPS) in steps and len(steps) >= 2
    assert all(f"checkpoints/{s}/sora_sha256.json" in held for s in steps)  # each sealed
    assert not any(p.name.startswith("gs:") for p in tmp_path.rglob("*"))


def _bucket_losses(run: str) -> dict[int, float]:
    """Step -> loss from a bucket work dir's metrics.jsonl."""
    rows = [json.loads(x) for x in epath.Path(f"{run}/metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}
