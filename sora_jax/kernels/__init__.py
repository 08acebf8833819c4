"""Native CPU kernels called from XLA through `jax.ffi` (see onednn.py)."""
