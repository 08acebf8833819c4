"""Compile the oneDNN kernels (*.cc here) against jaxlib's FFI headers and the oneDNN wheel,
once per version, into one shared library.

The shared library goes to a cache directory named by a hash of everything it depends on
(source, compiler flags, jaxlib and oneDNN versions), so a new jaxlib or an edited kernel
builds anew and nothing stale is loaded. Concurrent processes (pytest workers, the ranks
of a multi-process run) wait on a file lock and find the first one's build.

    python -m sora_jax.kernels.build     # build now (`make` does); prints the library path
"""

import fcntl
import hashlib
import importlib.metadata
import os
import pathlib
import shlex
import subprocess
import sys
import tempfile

import jax

HERE = pathlib.Path(__file__).parent
SOURCES = (HERE / "onednn_conv.cc", HERE / "onednn_lstm.cc")
HEADERS = (HERE / "onednn_common.h",)
ONEDNN_RUNTIME = "onednn-cpu-gomp"  # libdnnl.so.3, CPU only, OpenMP threads
ONEDNN_HEADERS = "onednn-devel-cpu-gomp"  # its headers (same version)
FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC", "-Wno-return-type")
# SORA_JAX_SANITIZE=address builds the kernels with AddressSanitizer (`make asan`; the
# process must preload libasan, as the Makefile does). A build of its own: other flags,
# another cache entry.
SANITIZE = {"address": ("-fsanitize=address", "-fno-omit-frame-pointer", "-g")}


# oneDNN's ISA caps that allow AVX-512; any other cap (AVX2, SSE41...) leaves it out.
AVX512_CAPS = ("AVX512", "AVX10", "ALL", "DEFAULT")


def isa_cap() -> str:
    """oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or DNNL_MAX_CPU_ISA), upper case; "" if none."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA", "")).upper()


def held_below_avx512() -> bool:
    """Whether oneDNN is capped below AVX-512 (e.g. ONEDNN_MAX_CPU_ISA=AVX2): then it has
    no bfloat16 kernels, and our own vector code leaves AVX-512 out too."""
    return bool(isa_cap()) and not isa_cap().startswith(AVX512_CAPS)


def flags() -> tuple[str, ...]:
    sanitizer = os.environ.get("SORA_JAX_SANITIZE", "")
    if sanitizer and sanitizer not in SANITIZE:
        raise BuildError(f"SORA_JAX_SANITIZE={sanitizer!r}: only {sorted(SANITIZE)}")
    # Our own vector code follows oneDNN's cap too (`make asan`, `peers.py --max-isa`).
    return (
        FLAGS
        + SANITIZE.get(sanitizer, ())
        + (("-DSORA_JAX_MAX_ISA_AVX2",) if held_below_avx512() else ())
    )


class BuildError(RuntimeError):
    """The kernel cannot be built here; the message says what is missing."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("SORA_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "sora_jax"
    )
    return pathlib.Path(root) / "kernels"


def _installed_file(distribution: str, suffix: str) -> pathlib.Path:
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(
            f"the {distribution} package is not installed (a dependency of sora_jax on "
            "Linux x86_64; elsewhere use model.visual.conv_backend='xla')"
        ) from None
    for file in dist.files or ():  # RECORD paths are relative to site-packages ("../../")
        path = pathlib.Path(dist.locate_file(file)).resolve()
        if path.as_posix().endswith(suffix):
            return path
    raise BuildError(f"{distribution} {dist.version} has no file ending in {suffix}")


def _inputs() -> tuple[pathlib.Path, pathlib.Path, str]:
    """(oneDNN include dir, libdnnl path, version string of the whole build)."""
    header = _installed_file(ONEDNN_HEADERS, "include/oneapi/dnnl/dnnl.hpp")
    library = _installed_file(ONEDNN_RUNTIME, "lib/libdnnl.so.3")
    versions = "|".join(
        [
            importlib.metadata.version("jaxlib"),
            importlib.metadata.version(ONEDNN_RUNTIME),
            importlib.metadata.version(ONEDNN_HEADERS),
            " ".join(flags()),
        ]
    )
    return header.parents[2], library, versions


def library_path() -> pathlib.Path:
    """Where this source and these versions build to (whether or not built yet)."""
    _, _, versions = _inputs()
    code = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + versions.encode()).hexdigest()[:16]
    return cache_dir() / f"onednn_kernels-{digest}.so"


def build(verbose: bool = False) -> pathlib.Path:
    """Build the kernel library unless this version is already built; return its path."""
    include, library, _ = _inputs()
    target = library_path()
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it right now
        if target.exists():
            return target
        compiler = os.environ.get("CXX", "g++")
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = pathlib.Path(tmp) / target.name
            command = [
                *shlex.split(compiler),
                *flags(),
                f"-I{jax.ffi.include_dir()}",
                f"-I{include}",
                *map(str, SOURCES),
                str(library),
                f"-Wl,-rpath,{library.parent}",
                "-o",
                str(out),
            ]
            if verbose:
                print(shlex.join(command), file=sys.stderr)
            try:
                result = subprocess.run(command, capture_output=True, text=True)
            except FileNotFoundError:
                raise BuildError(
                    f"no C++ compiler {compiler!r} (set CXX, or install g++)"
                ) from None
            if result.returncode != 0:
                raise BuildError(f"compiling the oneDNN kernels failed:\n{result.stderr[-4000:]}")
            os.replace(out, target)  # atomic: readers never see half a library
    return target


def main() -> int:
    try:
        print(build(verbose=True))
    except BuildError as error:
        print(f"oneDNN kernels not built: {error}", file=sys.stderr)
        # Only Linux x86_64 installs the oneDNN wheels; elsewhere XLA's convolutions run.
        return 1 if (sys.platform, os.uname().machine) == ("linux", "x86_64") else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
