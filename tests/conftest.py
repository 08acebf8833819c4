"""Test set-up: eight forced CPU devices, so sharding is tested without accelerators."""

import os

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small prepared demo dataset: (data_dir, name). Real mp4s -> real ArrayRecords."""
    from data_prep import builder, layouts
    from data_prep.synthetic import make_demo_dataset
    from data_prep.worker import PrepSettings

    root = tmp_path_factory.mktemp("demo")
    raw = make_demo_dataset(root / "raw", train_per_class=12, test_per_class=5, seed=1)
    entries = layouts.discover(raw)
    builder.prepare(entries, root / "data", "demo_small", PrepSettings(fps=8.0, short_side=40))
    return str(root / "data"), "demo_small"


def small_config(data_dir: str, name: str):
    """The demo config's `runlocal` preset, on the given prepared dataset."""
    from configs import demo

    c = demo.get_config("runlocal")
    c.data.update(dir=data_dir, name=name)
    return c
