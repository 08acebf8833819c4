"""sora_jax: Spatio-temporal Relational Audio-visual models in JAX/Flax."""

__version__ = "0.1.0"

import os as _os

# TensorFlow is imported only because tfds reads ArrayRecord datasets through it; its C++
# start-up chatter (oneDNN notes, absent-GPU warnings) says nothing about this project.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# XLA:CPU hands convolutions to YNNPACK by default (jaxlib 0.10), where ours ran 2-4x slower
# than on its Eigen path, their weight gradients most (BENCHMARKS.md, "YNNPACK"); dots stay
# on YNNPACK. Read when the CPU backend starts, so it must be set before the first JAX
# computation; a value the user already chose is kept.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_SETTING = f"{YNN_FLAG}=individual_dot"
if YNN_FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {YNN_SETTING}".strip()

# Reuse XLA's per-step host buffers instead of faulting in fresh pages every step
# (host_memory.py; 4-9% of a CPU step).
from sora_jax import host_memory as _host_memory  # noqa: E402

HOST_MALLOC_TUNED = _host_memory.keep_freed_memory()
