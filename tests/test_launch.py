"""The launch scripts: SLURM auto-detection run for real on this machine with a stand-in
srun (SLURM itself cannot exist here), and the TPU pod command line."""

import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from tests.conftest import small_config
from tests.test_train import _flags, losses

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Starts SLURM_NTASKS copies of the command with the variables SLURM sets, as srun does.
FAKE_SRUN = """#!/usr/bin/env bash
export SLURM_JOB_ID=$((RANDOM % 4000 + 1)) SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2
export SLURM_STEP_NUM_NODES=1
pids=()
for i in 0 1; do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

pytestmark = pytest.mark.usefixtures("no_compilation_cache")


@pytest.mark.slow
def test_slurm_script_trains_with_jax_detecting_the_cluster(demo_data, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    config = small_config(*demo_data)
    config.total_steps, config.log_every = 4, 2
    workdir = tmp_path / "run"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        CONFIG="configs/demo.py",
        WORKDIR=str(workdir),
        VENV=str(pathlib.Path(sys.executable).parent.parent),
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    done = subprocess.run(
        ["bash", "launch/slurm.sbatch", *_flags(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(losses(workdir)) == [1, 2, 3, 4]
    data = workdir / "checkpoints" / "4" / "data"
    assert {p.name for p in data.glob("process_*")} == {
        "process_0-of-2.json",
        "process_1-of-2.json",
    }


def test_tpu_pod_script_runs_one_command_on_every_worker():
    hostile = "--config.data.name=a b'; touch /tmp/pwned #"
    done = subprocess.run(
        ["bash", "launch/tpu_vm_pod.sh", "train", "--config.total_steps=10", hostile],
        cwd=ROOT,
        env=dict(os.environ, DRY_RUN="1", TPU_NAME="pod-a", WORKDIR="gs://b/run one"),
        capture_output=True,
        text=True,
        check=True,
    )
    argv = shlex.split(done.stdout)  # the gcloud command, as the local shell runs it
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-a"]
    assert "--worker=all" in argv
    remote = shlex.split(argv[argv.index("--command") + 1])  # as each worker's shell runs it
    assert remote[:3] == ["cd", "~/sora_jax", "&&"]
    train = remote[3:]
    assert train[0] == ".venv/bin/sora-train"
    assert train[train.index("--workdir") + 1] == "gs://b/run one"
    assert train[-3:] == [
        "--config.distributed.num_processes=-1",
        "--config.total_steps=10",
        hostile,
    ]
