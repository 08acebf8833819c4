"""glibc malloc keeps large freed blocks for reuse in a CPU process the entry points set up
(`sora_jax.process.configure()`), and `import sora_jax` alone changes nothing."""

import os
import subprocess
import sys
import textwrap

from sora_jax import host_memory, process

# A worker thread (as XLA's are) mallocs, writes and frees 400 MB four times, as XLA:CPU
# does its temporary buffers each step; the page faults of each round are counted. (Not
# with NumPy, which asks the kernel for huge pages for large arrays; XLA does not.)
_ROUNDS = textwrap.dedent(
    """
    import ctypes, resource, threading
    from sora_jax import process

    tuned = process.configure()["host_malloc"]
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 400 * 2**20

    def rounds(faults):
        for _ in range(4):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = libc.malloc(size)
            ctypes.memset(block, 1, size)
            libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    faults = []
    thread = threading.Thread(target=rounds, args=(faults,))
    thread.start()
    thread.join()
    print(tuned, *faults)
    """
)


def _faults_per_round(**env) -> tuple[bool, list[int]]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }
    out = _python(_ROUNDS, {**clean, **env}).split()
    return out[0] == "True", [int(n) for n in out[1:]]


def _python(script: str, env: dict[str, str]) -> str:
    """stdout of `script` run in a new Python process with exactly `env`."""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_large_blocks_are_reused_instead_of_faulted_in_again():
    pages = 400 * 2**20 // 4096
    tuned, faults = _faults_per_round()
    assert tuned
    assert faults[0] > pages // 2  # the first round maps the memory
    assert max(faults[1:]) < pages // 20  # later rounds reuse it
    untuned, faults = _faults_per_round(SORA_JAX_SYSTEM_MALLOC="1")
    assert not untuned
    assert min(faults) > pages // 2  # glibc's default: fresh pages every round


def test_a_users_allocator_choice_is_left_alone():
    assert not host_memory.user_chose_allocator({})
    assert not host_memory.user_chose_allocator({"SORA_JAX_SYSTEM_MALLOC": "0"})
    for env in (
        {"SORA_JAX_SYSTEM_MALLOC": "1"},
        {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
        {"MALLOC_ARENA_MAX": "4"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    ):
        assert host_memory.user_chose_allocator(env), env


def test_import_changes_nothing_and_the_cpu_settings_stay_on_the_cpu_path():
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    script = textwrap.dedent(
        """
        import os, sys
        import sora_jax, sora_jax.train.trainer, sora_jax.export.export
        print(repr(os.environ.get("XLA_FLAGS")))
        from sora_jax import process
        print(process.configure()["xla_flag"], os.environ.get("XLA_FLAGS"))
        """
    )

    def run(**env):
        return _python(script, {**clean, **env}).split("\n")[:2]

    imported, configured = run(JAX_PLATFORMS="cpu")
    assert imported == "None"  # importing the library set no flag
    assert configured == "True --xla_cpu_experimental_ynn_fusion_type=individual_dot"
    imported, configured = run(JAX_PLATFORMS="tpu")  # an accelerator process: left alone
    assert (imported, configured) == ("None", "False None")
    assert not process.computes_on_cpu({"JAX_PLATFORMS": "cuda,cpu"})
    assert process.computes_on_cpu({"JAX_PLATFORMS": "cpu"})


def test_a_machine_without_accelerators_keeps_jax_off_installed_tpu_plugins():
    """libtpu (installed for sora-compile) would start, and print errors, in every
    process; configure() keeps JAX on the CPU where no accelerator device exists."""
    assert process.computes_on_cpu({}), "this test needs a machine without accelerators"
    clean = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    script = textwrap.dedent(
        """
        import os
        from sora_jax import process
        process.configure()
        import jax
        print(os.environ["JAX_PLATFORMS"], jax.devices()[0].platform)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=clean, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["cpu", "cpu"]
    assert "TPU" not in done.stderr, done.stderr[-2000:]
