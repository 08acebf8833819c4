"""The platform a program is traced for, which can differ from the host's.

`sora-compile` traces the train step on this machine for a TPU topology's devices; the
CPU-only choices (the oneDNN custom calls, the XLA:CPU gradient rewrites of models/conv.py
and models/bias.py) must then not be taken. The train and eval steps trace under their
mesh (`jax.sharding.use_abstract_mesh`), whose abstract device names the platform; outside
a step (or on an older mesh without one) the host's default backend is the target.
"""

import jax


def target_platform() -> str:
    """ "cpu", "tpu", "gpu"...: where the program being traced will run."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def for_cpu() -> bool:
    return target_platform() == "cpu"
