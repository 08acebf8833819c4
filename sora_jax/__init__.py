"""sora_jax: Spatio-temporal Relational Audio-visual models in JAX/Flax.

Importing it changes nothing process-wide: the entry points apply their settings
(sora_jax/process.py), for the platform that needs them.
"""

__version__ = "0.1.0"
