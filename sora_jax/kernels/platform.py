"""The platform a program is traced for, which can differ from the host's.

`sora-compile` traces the train step on this machine for a TPU topology's devices; the
CPU-only choices (the oneDNN custom calls, the XLA:CPU gradient rewrites of models/conv.py
and models/bias.py) must then not be taken. The train and eval steps trace under their
mesh (`jax.sharding.use_abstract_mesh`), whose abstract device names the platform; outside
a step (or on an older mesh without one) the host's default backend is the target.
Lowering for a GPU, which cannot be attached here, traces on CPU devices standing in for
the GPUs: `targeting("gpu")` names the platform for the steps traced inside it.
"""

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("target", default=None)


@contextlib.contextmanager
def targeting(platform: str) -> Iterator[None]:
    """Programs traced inside are traced for `platform`, whatever the mesh's devices."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """ "cpu", "tpu", "gpu"...: where the program being traced will run."""
    chosen = _TARGET.get()
    if chosen is not None:
        return chosen
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def for_cpu() -> bool:
    return target_platform() == "cpu"
