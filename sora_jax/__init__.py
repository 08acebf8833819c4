"""sora_jax: Spatio-temporal Relational Audio-visual models in JAX/Flax."""

__version__ = "0.1.0"

import os as _os

# TensorFlow is imported only because tfds reads ArrayRecord datasets through it; its C++
# start-up chatter (oneDNN notes, absent-GPU warnings) says nothing about this project.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
