"""Test set-up: eight forced CPU devices, so sharding is tested without accelerators, and
one persistent XLA compilation cache per test process, shared with the runs it starts.

Most tests train the same tiny program, many in fresh subprocesses (the CLI, resume after a
kill, several processes); compiling it once instead of in each saves most of `make test`.
The cache changes no result: an entry is the executable XLA would have compiled, keyed by
the program, its shardings, the devices and the compile options. Each pytest-xdist worker
has its own directory (made fresh and removed at exit), so no two workers write one file.
"""

import atexit
import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np
import pytest

# Must be set before jax is imported anywhere in the test process (each pytest-xdist
# worker too: it inherits the environment left below for the runs tests start).
DEVICE_COUNT = "--xla_force_host_platform_device_count"
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith(DEVICE_COUNT) for f in _flags):
    os.environ["XLA_FLAGS"] = " ".join([*_flags, f"{DEVICE_COUNT}=8"])
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")  # gw0, gw1, ... under `pytest -n`
if os.environ.get("SORA_JAX_TEST_CACHE_OF") != _worker:  # not inherited from the controller
    _cache = tempfile.mkdtemp(prefix=f"sora_jax_test_xla_cache_{_worker}_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(
        SORA_JAX_TEST_CACHE_OF=_worker,
        JAX_COMPILATION_CACHE_DIR=_cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )

# Tests compute as the entry points do: with the CPU's process settings.
import jax  # noqa: E402  (after the environment above)

from sora_jax import process  # noqa: E402

# Tests that compile for a TPU topology need libtpu (the test extra installs it).
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU needs the tpu extra: pip install -e '.[tpu]'",
)

process.configure()

from sora_jax.kernels import onednn  # noqa: E402  (after process.configure)

# The oneDNN convolutions run only where they are verified, and bfloat16 only where the
# CPU has it (kernels/onednn.py): each reason is the library's own.
needs_onednn_conv = pytest.mark.skipif(
    onednn.conv_unverified_reason() is not None, reason=str(onednn.conv_unverified_reason())
)
needs_onednn_bfloat16 = pytest.mark.skipif(
    onednn.bfloat16_unsupported_reason() is not None,
    reason=str(onednn.bfloat16_unsupported_reason()),
)

jax.devices()  # this process's backend starts now, with its eight devices ...
# ... and the runs tests start (the commands, resume after a kill) compute on one CPU device,
# as users' runs here do: eight virtual devices on two cores take ~1.8x as long (a 40-step
# runlocal sora-train: 43 s against 24 s). Tests of several devices or processes set their
# own (launch/local.py, the SLURM and bench tests).
os.environ["XLA_FLAGS"] = " ".join(
    f for f in os.environ["XLA_FLAGS"].split() if not f.startswith(DEVICE_COUNT)
)
ONE_DEVICE = jax.devices()[:1]  # for in-process runs that are not about sharding
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def no_compilation_cache(monkeypatch):
    """For tests whose runs span several processes joined by jax.distributed: each process
    compiles its own program. One loading an executable another run compiled while its
    peer compiles afresh could order their collectives differently (a two-process run
    once hung at step 0 with the cache on)."""
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")


# The longest test (~10 of test-all's ~30 minutes) starts the run: begun last, it would
# keep one pytest-xdist worker busy long after the other had run out of tests.
LONGEST = "tests/test_pretrain.py::"


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST))


def pytest_report_header() -> str:
    return f"XLA compilation cache: {os.environ['JAX_COMPILATION_CACHE_DIR']}"


def compiled(fn: Callable, *args) -> Callable:
    """`fn` compiled for `args`' shapes as one program, for speed of compiling
    (fit.CPU_FAST_COMPILE, as the trainer's init and runlocal's steps are): the programs
    tests check run a few times each, so compiling them is most of a test. A model's
    initialiser is the extreme: its random draws over conv kernels' 4-D shapes (threefry
    with partitionable counters) took XLA:CPU 10 s to compile for a tiny model, 2.6 s
    without LLVM's optimisations. Run eagerly, each op of `fn` would compile on its own,
    optimised."""
    from sora_jax.train import fit

    return jax.jit(fn).lower(*args).compile(compiler_options=fit.CPU_FAST_COMPILE)


def run_compiled(fn: Callable, *args):
    """`fn(*args)`, compiled as one program (see `compiled`)."""
    return compiled(fn, *args)(*args)


def initialised(module, *args, seed: int = 1):
    """`module.init(PRNGKey(seed), *args)`, compiled as one program (see `compiled`)."""
    return run_compiled(module.init, jax.random.PRNGKey(seed), *args)


def normal(seed: int, *shape: int) -> np.ndarray:
    """Standard normal float32 test data from NumPy: an eager jax.random.normal of a 4-D
    shape compiles for seconds (the draws of `compiled`'s note), a NumPy one is instant."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def built_once(tmp_path_factory, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """`name`'s directory, made by `build` once per test session. Under pytest-xdist the
    first worker to ask builds it, under a lock, and the others wait, then read it: each
    worker building its own copy of a run that takes a minute or more cost that minute
    twice. Tests read what it holds and write their own outputs elsewhere."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # shared by workers
    path = root / f"shared_{name}"
    with (root / f"shared_{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A real GCS server on 127.0.0.1 (tests/gcs_server.py) for this test process and the
    runs it starts: (server root folder, "gs://BUCKET"). The bucket's objects are files
    under ROOT/BUCKET, for tests that damage one as a failing store would."""
    from tests import gcs_server

    root = tmp_path_factory.mktemp("gcs")
    with gcs_server.running(root):
        yield root, f"gs://{gcs_server.BUCKET}"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small prepared demo dataset: (data_dir, name). Real mp4s -> real ArrayRecords."""
    from data_prep import builder, layouts
    from data_prep.synthetic import make_demo_dataset
    from data_prep.worker import PrepSettings

    def build(root: pathlib.Path) -> None:
        raw = make_demo_dataset(root / "raw", train_per_class=12, test_per_class=5, seed=1)
        entries = layouts.discover(raw)
        settings = PrepSettings(fps=8.0, short_side=40)
        builder.prepare(entries, root / "data", "demo_small", settings)

    return str(built_once(tmp_path_factory, "demo", build) / "data"), "demo_small"


def small_config(data_dir: str, name: str):
    """The demo config's `runlocal` preset, on the given prepared dataset."""
    from configs import demo

    c = demo.get_config("runlocal")
    c.data.update(dir=data_dir, name=name)
    return c


@pytest.fixture(scope="session")
def short_run(demo_data, tmp_path_factory) -> pathlib.Path:
    """One short `sora-train` run, a process of its own as a user's, shared by the tests
    that read a trained work dir (`run/`: the trainer's, TensorBoard's, evaluation's,
    export's): 8 steps of the demo's `runlocal` preset with EMA parameters, logged and
    evaluated at steps 4 and 8, steps 2-3 profiled. Beside it: `compiles.json`, the
    programs it compiled (JAX_LOG_COMPILES), and `tensorflow.txt`, whether the run ever
    imported TensorFlow ("True"/"False")."""

    def build(root: pathlib.Path) -> None:
        report = (
            "import atexit, sys; "
            f"atexit.register(lambda: open({str(root / 'tensorflow.txt')!r}, 'w')"
            ".write(str('tensorflow' in sys.modules)))"
        )
        run = "import runpy; runpy.run_module('sora_jax.train.cli', run_name='__main__')"
        flags = {
            "data.dir": demo_data[0],
            "data.name": demo_data[1],
            "total_steps": 8,
            "log_every": 4,
            "eval_every": 4,
            "profile_steps": "(2, 3)",
            "optimizer.ema_decay": 0.5,
        }
        done = subprocess.run(
            [sys.executable, "-c", f"{report}; {run}", "--config", "configs/demo.py:runlocal"]
            + ["--workdir", str(root / "run")]
            + [f"--config.{key}={value}" for key, value in flags.items()],
            cwd=ROOT,
            env=dict(os.environ, JAX_LOG_COMPILES="1"),
            capture_output=True,
            text=True,
        )
        (root / "stderr.txt").write_text(done.stderr)
        assert done.returncode == 0, done.stderr[-3000:]
        compiled = re.findall(r"\] Compiling (\S+) with", done.stderr)  # absl's format
        (root / "compiles.json").write_text(json.dumps(compiled))

    return built_once(tmp_path_factory, "short_run", build)


@pytest.fixture(scope="session")
def sight_or_sound(tmp_path_factory):
    """A demo-config model trained (120 steps) and exported on the sight-or-sound set
    (tests/media.py: classes each in one sense), for timelines and explanations:
    (export_dir, raw_dir)."""
    from configs import demo
    from data_prep import builder, layouts
    from data_prep.worker import PrepSettings
    from sora_jax.export import export as export_lib
    from sora_jax.train import trainer
    from tests.media import write_sight_or_sound

    def build(root: pathlib.Path) -> None:
        raw = write_sight_or_sound(root / "raw", per_class=16, seed=3)
        settings = PrepSettings(fps=8.0, short_side=40)
        builder.prepare(layouts.discover(raw), root / "data", "sight_or_sound", settings)
        config = demo.get_config()
        config.data.update(dir=str(root / "data"), name="sight_or_sound")
        config.total_steps = config.checkpoint.every_steps = 120
        trainer.train(config, root / "run", ONE_DEVICE)
        export_lib.export(root / "run", root / "export")

    root = built_once(tmp_path_factory, "sight_or_sound", build)
    return root / "export", root / "raw"


@contextlib.contextmanager
def small_disk(tmp_path: pathlib.Path, size: str):
    """A real filesystem of `size` ("3m") that fills up: a tmpfs mounted for the test
    (a full disk cannot be made otherwise). Skipped for a user other than root, who cannot
    mount; as root, a mount that fails is a failure, not a skip."""
    if os.geteuid() != 0:  # the one honest reason not to run: only root mounts
        pytest.skip("needs root, to mount a small tmpfs (CI and the dev machines run as root)")
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    assert mounted.returncode == 0, f"mounting a tmpfs as root failed: {mounted.stderr}"
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)])
