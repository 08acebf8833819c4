"""glibc malloc keeps large freed blocks for reuse after `import sora_jax`."""

import os
import subprocess
import sys
import textwrap

from sora_jax import host_memory

# A worker thread (as XLA's are) mallocs, writes and frees 400 MB four times, as XLA:CPU
# does its temporary buffers each step; the page faults of each round are counted. (Not
# with NumPy, which asks the kernel for huge pages for large arrays; XLA does not.)
_ROUNDS = textwrap.dedent(
    """
    import ctypes, resource, threading
    import sora_jax

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
    print(sora_jax.HOST_MALLOC_TUNED, *faults)
    """
)


def _faults_per_round(**env) -> tuple[bool, list[int]]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("LD_PRELOAD", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, "-c", _ROUNDS],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", [int(n) for n in out[1:]]


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
