"""Process-wide settings, applied by the entry points (sora-train, sora-eval, sora-export,
sora-predict, the bench scripts), never on `import sora_jax`: a library import changes
nothing process-wide. The CPU's tuning (an XLA flag, malloc) only where the process
computes on the CPU: on a GPU or TPU host it has no business in the accelerator's process.

The CPU's settings must happen before JAX starts its CPU backend (it reads XLA_FLAGS then,
and starts the threads whose malloc arenas host_memory.py settles), so entry points call
`configure()` first thing.
"""

import glob
import os
import threading
import time

from sora_jax import host_memory, storage

# XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10), where ours ran 2-4x slower
# than on its Eigen path, their weight gradients most (BENCHMARKS.md, "YNNPACK"); dots stay
# on YNNPACK. A value the user already chose is kept.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_SETTING = f"{YNN_FLAG}=individual_dot"

# Device files of the accelerators JAX would pick over the CPU: TPU (accel, vfio), NVIDIA
# and AMD GPUs. libtpu or a CUDA plugin may be installed on a CPU machine (to compile for a
# TPU topology, say); only a device says the process will compute on it.
_ACCELERATOR_DEVICES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def computes_on_cpu(environ: dict[str, str] | None = None) -> bool:
    """True when JAX will compute on the CPU: JAX_PLATFORMS names it first, or (none
    named) the machine has no accelerator device."""
    env = os.environ if environ is None else environ
    chosen = env.get("JAX_PLATFORMS", "").split(",")[0].strip()
    if chosen:
        return chosen == "cpu"
    return not any(glob.glob(pattern) for pattern in _ACCELERATOR_DEVICES)


def quiet_tensorflow() -> None:
    """TensorFlow is imported only because tfds reads and writes ArrayRecord datasets
    through it; its C++ start-up chatter (oneDNN notes, absent-GPU warnings) says nothing
    about this run. Before TensorFlow is imported; a level the user chose is kept."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# What libtpu, loaded on a machine without a TPU (sora-compile's topologies; loading a
# multi-platform export), must be told so that it does not look for a TPU VM's metadata
# server and print errors. There is no chip for its lock file (/tmp/libtpu_lockfile) to
# guard, so several such processes may load it at once.
LIBTPU_WITHOUT_TPU = {
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_WORKER_ID": "0",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def quiet_libtpu() -> None:
    """For processes with no TPU attached; values the user set are kept."""
    for name, value in LIBTPU_WITHOUT_TPU.items():
        os.environ.setdefault(name, value)


def configure() -> dict[str, bool]:
    """Quiet TensorFlow, set how buckets are reached (storage.py), and apply the CPU
    settings if this process computes on the CPU; returns which CPU settings were applied
    (the XLA flag, the malloc settings)."""
    quiet_tensorflow()
    storage.client_environment()
    if not computes_on_cpu():
        return {"xla_flag": False, "host_malloc": False}
    # No accelerator here: JAX need not start the TPU or GPU plugins a machine may have
    # installed (libtpu, for sora-compile, prints initialisation errors in every process
    # that tries). Compiling for a TPU topology does not need them started.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    quiet_libtpu()
    flags = os.environ.get("XLA_FLAGS", "")
    xla_flag = YNN_FLAG not in flags
    if xla_flag:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_SETTING}".strip()
    return {"xla_flag": xla_flag, "host_malloc": host_memory.keep_freed_memory()}


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_with_parent(parent: int, *_: object) -> None:
    """Run first thing in a worker process (grain's `worker_init_fn`, a Pool's
    `initializer`): the worker exits once `parent`, the process that started it, is gone.
    A parent killed with SIGKILL runs none of its cleanup, and its workers (a few hundred
    MB each) would otherwise live on, re-parented, for good. A thread, not
    PR_SET_PDEATHSIG, which fires when the parent's starting *thread* ends."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
