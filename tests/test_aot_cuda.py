"""sora-compile --topology cuda:N: the run's steps lowered for CUDA without a GPU, with
what lowering can check and a plain statement of what it cannot."""

import json
import pathlib
import subprocess
import sys

import jax
import pytest

from configs import demo
from sora_jax.aot import cuda
from sora_jax.kernels import onednn

ROOT = pathlib.Path(__file__).resolve().parents[1]
OWN_KERNELS = ("SoraConv", "SoraLstm")  # this project's CPU custom calls (kernels/onednn.py)


@pytest.mark.slow  # a cold sora-compile process; the lowering itself is tested below
def test_sora_compile_lowers_for_cuda_and_says_what_it_did_not_check():
    command = pathlib.Path(sys.executable).parent / "sora-compile"
    done = subprocess.run(
        [
            command,
            "--config=configs/demo.py:runlocal",
            "--topology=cuda:4",
            "--config.mesh.fsdp=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["topology"], result["platform"], result["devices"]) == ("cuda:4", "cuda", 4)
    assert result["compiled"] is False and result["fits"] is None
    b = result["bytes_per_device"]
    assert min(b["params"], b["opt_state"], b["batch"]) > 0 and b["temp"] is b["total"] is None
    assert result["flops_per_step"] is None and result["collectives"] is None
    assert "XLA compiles for a GPU only with one attached" in result["not_checked"]
    # Lowered for a GPU: XLA's convolutions and scan, none of the CPU's kernels.
    assert not [t for t in result["custom_calls"] if t.startswith(OWN_KERNELS)]
    bad = subprocess.run(
        [command, "--config=configs/demo.py", "--topology=cuda:eight"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "expected cuda:N" in bad.stderr


@pytest.mark.skipif(
    not onednn.available(), reason=f"no oneDNN kernels: {onednn.unavailable_reason()}"
)
def test_the_same_step_lowered_for_this_cpu_calls_the_cpu_kernels():
    """What the command's check above rules out for CUDA does happen for the CPU, on the
    same stand-in devices, so that check can fail."""
    config = demo.get_config("runlocal")
    on_cpu = cuda.lower_run(config, jax.devices()[:4], "cpu")
    assert "SoraLstmForward" in on_cpu.custom_calls, on_cpu.custom_calls
    on_gpu = cuda.lower_run(config, jax.devices()[:4], "cuda")
    assert not [t for t in on_gpu.custom_calls if t.startswith(OWN_KERNELS)]


def test_parameter_bytes_per_gpu_shrink_with_fsdp():
    per_gpu = {}
    for fsdp in (1, 4):
        config = demo.get_config("runlocal")
        config.mesh.fsdp = fsdp
        config.model.visual.widths, config.model.audio.hidden = (64, 128), 128
        run = cuda.lower_run(config, jax.devices()[:4], "cuda")
        per_gpu[fsdp] = run.params_bytes + run.opt_state_bytes
    assert per_gpu[4] < 0.4 * per_gpu[1], per_gpu
