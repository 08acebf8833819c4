"""The benchmark scripts run on a tiny config and print their JSON contract (their
speed is for BENCHMARKS.md, not for tests). Each script's contract runs in `make test`;
second variants of a script (bfloat16) are marked `bench` and run by `make bench`."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from sora_jax.kernels import onednn
from tests.conftest import needs_libtpu

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.batch_size=2",
    "--config.data.num_frames=2",
    "--config.data.crop_size=32",
    "--config.data.audio_samples=4000",
    "--config.model.audio.hidden=16",
    "--config.model.visual.widths=(8,8)",  # two stages: compiles in half the time of four
    "--config.model.visual.blocks=(1,1)",
    "--config.model.visual.strides=(2,2)",
    "--config.model.embed_dim=16",
]


def _run(script: str, *args: str, timeout: int = 600) -> dict:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, XLA_FLAGS=""),
    )  # one CPU device
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_step_prints_the_contract(tmp_path):
    out = tmp_path / "r.json"
    result = _run("train_step.py", *TINY, "--steps", "3", "--out", str(out))
    for key in ("clips_per_s", "step_ms", "flops_per_step", "device", "mfu"):
        assert key in result, key
    assert result["flops_per_step"] > 0
    assert json.loads(out.read_text()) == result


def _skip_missing_torch() -> list[str]:
    if importlib.util.find_spec("torch"):
        return []
    return ["--skip=pytorch_eager", "--skip=pytorch_compile"]


@pytest.mark.slow
def test_peers_runs_every_installed_framework(tmp_path):
    skip = _skip_missing_torch()
    # The results file keeps one run per host kind: another host's run stays.
    out = tmp_path / "peers.json"
    other = {"cpu": "Another CPU", "isa": ["avx2"], "results": []}
    out.write_text(json.dumps({"benchmark": "peers", "hosts": {"Another CPU, AVX2": other}}))
    result = _run("peers.py", *TINY, "--steps", "2", "--warmup", "1", *skip, "--out", str(out))
    hosts = json.loads(out.read_text())["hosts"]
    assert hosts.pop("Another CPU, AVX2") == other
    ((kind, run),) = hosts.items()  # this host's, keyed by its CPU and widest ISA
    assert run == result and result["isa"] and kind.startswith(f"{result['cpu']}, ")
    frameworks = {r["framework"]: r for r in result["results"]}
    assert not [r for r in frameworks.values() if "error" in r], frameworks
    assert {"flax", "keras", "keras_xla"} <= set(frameworks)
    # Keras is written the fastest way measured, and says which.
    assert frameworks["keras"]["variant"] == "tower+tf_function"
    assert frameworks["keras_xla"]["variant"] == "tower+train_on_batch"
    assert all(r["step_ms"] > 0 for r in frameworks.values())
    # Float32: each framework's model FLOP/s against the matmul peak measured in the run.
    flax, peak = frameworks["flax"], result["peak_matmul_flops_per_s"]
    assert flax["fraction_of_peak"] == pytest.approx(flax["achieved_flops_per_s"] / peak)
    for r in frameworks.values():  # the same FLOPs for all: the fractions rank as the times
        assert flax["fraction_of_peak"] / r["fraction_of_peak"] == pytest.approx(r["flax_speedup"])
    # Each peer says where it ran; here every one runs where Flax does, on the CPU.
    assert {r["device"] for r in frameworks.values()} == {"cpu"}


@pytest.mark.slow
def test_peers_held_to_avx2_is_a_host_kind_of_its_own(tmp_path):
    out = tmp_path / "peers.json"
    skip = [*_skip_missing_torch(), "--skip=pytorch_compile", "--skip=keras", "--skip=keras_xla"]
    args = [*TINY, "--steps", "1", "--warmup", "1", *skip, "--out", str(out)]
    result = _run("peers.py", *args, "--max-isa", "AVX2")
    ((kind, run),) = json.loads(out.read_text())["hosts"].items()
    assert run == result and kind.endswith(", held to AVX2") and result["held_to_isa"] == "AVX2"
    assert result["onednn_max_cpu_isa"] == "AVX2"
    frameworks = {r["framework"]: r for r in result["results"]}
    assert not [r for r in frameworks.values() if "error" in r], frameworks
    if "pytorch_eager" in frameworks:  # PyTorch's own report of the ISA its kernels use
        assert frameworks["pytorch_eager"]["cpu_capability"] == "AVX2"


@pytest.mark.bench  # make bench installs PyTorch (the bench extra), then runs it
def test_peers_pytorch():
    # No skip: this tier runs only in `make bench`, which installs PyTorch first; a
    # missing torch there is a failure, not a reason to pass.
    import torch  # noqa: F401

    result = _run(
        "peers.py", *TINY, "--steps", "2", "--warmup", "1", "--skip=keras", "--skip=keras_xla"
    )
    frameworks = {r["framework"]: r for r in result["results"]}
    assert {"pytorch_eager", "pytorch_compile"} <= set(frameworks)
    assert not [r for r in frameworks.values() if "error" in r], frameworks


@pytest.mark.slow
def test_compile_time_script():
    compile_result = _run("compile_time.py", *TINY, "--audio-frames", "50", "--video-frames")
    assert set(compile_result["audio_frames_s"]) == {"50"} and not compile_result["video_frames_s"]
    assert all(s > 0 for s in compile_result["audio_frames_s"].values())


@pytest.mark.slow
def test_memory_script():
    memory = _run("memory.py", *TINY, "--steps", "1")
    assert memory["no_remat"]["peak_host_rss_mb"] > 0 and memory["remat"]["step_ms"] > 0


@pytest.mark.slow
def test_pretrain_script(tmp_path):
    result = _run(
        "pretrain.py",
        "--config=configs/pretrain_av.py:runlocal",
        *TINY,  # its batch_size is --batches'
        "--batches",
        "8",
        "--devices",
        "2",
        "--repeats",
        "1",
    )
    assert result["device_count"] == 2
    assert result["similarity"]["8"]["step_ms"] > 0 and result["similarity"]["8"]["compile_s"] > 0
    assert result["train_step"]["8"]["clips_per_s"] > 0


@pytest.mark.slow
def test_input_pipeline_script(demo_data):
    data_dir, name = demo_data
    raw = pathlib.Path(data_dir).parent / "raw"
    result = _run(
        "input_pipeline.py",
        "--data-dir",
        data_dir,
        "--name",
        name,
        "--raw-dir",
        str(raw),
        "--examples",
        "8",
        "--config.batch_size=8",
        "--grain-batches",
        "2",
        "--train-steps",
        "4",
        "--config.model.visual.widths=(8,8,8)",
        "--config.log_every=2",
    )
    assert result["prepared_clips_per_s_per_core"] > 0
    assert result["raw_pyav_clips_per_s_per_core"] > 0
    assert 0 <= result["data_wait_fraction"] <= 1


@pytest.mark.bench
def test_peers_bfloat16():
    result = _run(
        "peers.py",
        *TINY,
        "--config.model.dtype=bfloat16",
        *("--steps", "2", "--warmup", "1", "--skip=pytorch_compile", "--skip=keras_xla"),
        *_skip_missing_torch(),
    )
    frameworks = {r["framework"]: r for r in result["results"]}
    assert not [r for r in frameworks.values() if "error" in r], frameworks
    assert frameworks["flax"]["dtype"] == frameworks["keras"]["dtype"] == "bfloat16"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.bench)])
def test_conv_layers_times_every_reference_conv_every_way(dtype):
    result = _run("conv_layers.py", "--frames", "1", "--dtype", dtype)
    assert len(result["layers"]) == 8 and result["dtype"] == dtype
    verified = onednn.conv_unverified_reason() is None
    impls = (
        ["onednn"] * verified
        + ["xla", "nn_conv"]
        + (["pytorch"] if importlib.util.find_spec("torch") else [])
    )
    for row in result["layers"]:
        assert [k for k in row if k != "layer"] == impls
        for impl in impls:
            assert set(row[impl]) == {"forward_ms", "input_grad_ms", "param_grad_ms"}
            assert all(v > 0 for v in row[impl].values())


@pytest.mark.slow
def test_storage_prints_the_contract(tmp_path):
    """A bucket's cost against the local disk, on the GCS server bench/storage.py starts."""
    result = _run("storage.py", "--configs", "configs/demo.py", "--reads", "20", "--repeats", "1")
    for where in ("local", "bucket"):
        costs = result["checkpoint_demo"][where]
        assert costs["state_mb"] > 0 and costs["save_s"] > 0 and costs["restore_s"] > 0
        assert result["data_reads"][where]["clips_per_s"] > 0


@pytest.mark.slow
@needs_libtpu
def test_tpu_branch_compiles_each_branch_for_one_chip(tmp_path):
    out = tmp_path / "tpu_branch.json"
    one_clip_a_chip = ("--config.batch_size=4", "--config.data.eval_batch_size=4")
    args = ("--topology", "v5e:2x2", "--out", str(out), *TINY, *one_clip_a_chip, "--label", "tiny")
    runs = _run("tpu_branch.py", "--config", "configs/small.py", *args)["runs"]
    audio, visual = (runs[f"{b} of configs/small.py@v5e:2x2, tiny"] for b in ("audio", "visual"))
    for r in (audio, visual):
        assert r["clips_per_chip"] == 1 and r["flops"] > 0 and r["expected_s"] > 0
        assert 0 < r["expected_mfu"] <= 1
    # The audio's scan is a loop of small kernels, one trip per (unrolled) step; the tower
    # has none.
    assert audio["loops"] and not visual["loops"]
    assert all(loop["trips"] >= 1 and loop["kernels_per_trip"] >= 1 for loop in audio["loops"])
    # Each layer's share: the tower's time is spread over its stages' convolutions.
    names = {row["layer"] for row in visual["layers"]}
    assert any(n.startswith("stage0_block0/conv") for n in names), names
    assert sum(row["expected_s"] for row in visual["layers"]) <= visual["expected_s"] * 1.0001
    assert json.loads(out.read_text())["runs"] == runs  # the file holds what was printed


@pytest.mark.slow
def test_seeds_measures_a_model_choice_on_the_demo(tmp_path):
    """--demo-only with a preset: the accuracy a model choice costs at the demo's size."""
    out = tmp_path / "seeds.json"
    args = ("--demo-only", "--preset", "wide", "--seeds", "3", "--config.total_steps=4")
    result = _run("seeds.py", *args, "--out", str(out))
    assert json.loads(out.read_text()) == result
    assert result["seeds"] == [3] and result["demo_preset"] == "wide"
    assert result["demo_overrides"] == ["total_steps=4"]
    for key in ("demo_top1", "demo_audio_only_top1", "demo_video_only_top1"):
        assert len(result[key]["values"]) == 1 and 0 <= result[key]["min"] <= 1
    assert "pretrain_v2a_r1" not in result  # the chain was skipped
