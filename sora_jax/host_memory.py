"""Keep the host's large freed buffers for reuse instead of returning them to the kernel.

XLA:CPU allocates each step's temporary buffers as one block (477 MB for the reference
model) from whichever glibc arena the calling thread has. A block that large cannot live
in a thread's arena, so glibc maps fresh pages for it every step and unmaps them after:
116,000 page faults and ~0.2 s of kernel time per step; without them the reference step
ran 4-9% faster (BENCHMARKS.md). With one arena, no mmap for large blocks and no
trimming, freed blocks stay in the heap and the next step reuses them: no faults. The
cost is that the process keeps its peak heap (as jemalloc or tcmalloc, the usual cures,
also do).

Applied by the entry points (sora_jax/process.py) in a process that computes on the CPU,
before XLA starts its threads. Left alone when the user chose an allocator (LD_PRELOAD)
or glibc malloc settings (MALLOC_* or GLIBC_TUNABLES), or set SORA_JAX_SYSTEM_MALLOC=1.
"""

import ctypes
import ctypes.util
import os
import platform

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_TRIM_ABOVE = 2**31 - 1  # bytes free at the heap's top before glibc trims (int max)


def user_chose_allocator(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return (
        env.get("SORA_JAX_SYSTEM_MALLOC", "") not in ("", "0")
        or bool(env.get("LD_PRELOAD"))
        or "GLIBC_TUNABLES" in env
        or any(key.startswith("MALLOC_") for key in env)
    )


def keep_freed_memory() -> bool:
    """Apply the settings above to this process's glibc malloc; True if applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if user_chose_allocator():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _TRIM_ABOVE))
    return all(libc.mallopt(ctypes.c_int(p), ctypes.c_int(v)) == 1 for p, v in settings)
