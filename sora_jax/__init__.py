"""sora_jax: Spatio-temporal Relational Audio-visual models in JAX/Flax."""

__version__ = "0.1.0"
