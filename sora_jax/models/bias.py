"""A bias addition whose gradient XLA:CPU computes at full speed (programs traced for
other platforms add the bias plainly).

The gradient of a bias is a sum of the output gradient over every leading axis. XLA:CPU
rewrites such a large sum into a `reduce-window`, which ran at about 1 GB/s: 50 ms for one
[128, 56, 56, 32] conv activation, 12-21 ms for the audio branch's [16, 200, 1024] input
projection (BENCHMARKS.md). A matrix-vector product with ones over the first axis, then a
small sum over the rest, reads the gradient once at full speed.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sora_jax.kernels import platform


def bias_grad(dy: jax.Array) -> jax.Array:
    """dy [N, ..., C] -> [C]: the sum over every axis but the last."""
    ones = jnp.ones((dy.shape[0],), dy.dtype)
    per_position = jnp.dot(ones, dy.reshape(dy.shape[0], -1), preferred_element_type=jnp.float32)
    return per_position.reshape(-1, dy.shape[-1]).sum(axis=0).astype(dy.dtype)  # [..., C] -> [C]


def add_bias(y: jax.Array, b: jax.Array) -> jax.Array:
    """y [N, ..., C] + b [C]; on the CPU with `bias_grad` as b's gradient."""
    return _add_bias_cpu(y, b) if platform.for_cpu() else y + b


@jax.custom_vjp
def _add_bias_cpu(y: jax.Array, b: jax.Array) -> jax.Array:
    return y + b


_add_bias_cpu.defvjp(lambda y, b: (y + b, None), lambda _, dy: (dy, bias_grad(dy)))


class Dense(nn.Module):
    """`nn.Dense` (same parameter names, shapes and initial values) with `add_bias`."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [..., D] -> [..., features]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return add_bias(y, bias)
