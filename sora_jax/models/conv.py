"""The visual tower's convolution: `nn.Conv`'s mathematics, with gradients XLA:CPU runs faster.

The forward pass and the weight gradient are XLA's own. Two gradients are lowered
differently (same mathematics, BENCHMARKS.md has the measurements):

* Input gradient of a stride-2 3x3 convolution. XLA computes it as a convolution over the
  output gradient dilated with zeros, so three quarters of its multiplies are by zero (on
  the CPU it cost 1.5-7x the forward pass). Split by the parity of the input pixel instead:
  each of the four phases (even/odd row x even/odd column) is a small stride-1 convolution
  of the output gradient with the kernel taps that reach it (2x2, 2x1, 1x2 and 1x1 of the
  3x3 taps: 9 taps, no zeros); the phases are then interleaved.
* Bias gradient. XLA:CPU rewrites a large sum into a `reduce-window`, which ran at about
  1 GB/s (50 ms for one [128, 56, 56, 32] activation); a matrix-vector product over the
  batch, then a small sum, reads the gradient once at full speed.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

# For a 3x3 kernel, stride 2, SAME padding and even input size, padding is (0, 1) and
# y[i] = x[2i] w[0] + x[2i+1] w[1] + x[2i+2] w[2]. So the gradient of input pixel 2m is
# dy[m] w[0] + dy[m-1] w[2] and of pixel 2m+1 is dy[m] w[1]. Per parity: the kernel taps
# in the order they meet dy padded by one in front (dyp[m] = dy[m-1]).
_TAPS_BY_PARITY = {0: (2, 0), 1: (1,)}


def _conv(x: jax.Array, w: jax.Array, stride: int, padding: str = "SAME") -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_NHWC)


def _takes_phase_path(x: jax.Array, w: jax.Array, stride: int) -> bool:
    # With few input channels (RGB frames) the four thin phase convolutions cost more than
    # XLA's one (87 vs 43 ms at 112x112x3, bench/conv_layers.py); training never asks for
    # that gradient anyway, frames being data.
    even = x.shape[1] % 2 == 0 and x.shape[2] % 2 == 0
    return stride == 2 and w.shape[:2] == (3, 3) and w.shape[2] >= 16 and even


def _input_grad_by_phase(dy: jax.Array, w: jax.Array) -> jax.Array:
    """dy [N, Ho, Wo, O], w [3, 3, I, O] -> input gradient [N, 2Ho, 2Wo, I] of a 3x3/s2 conv."""
    n, ho, wo, _ = dy.shape
    w_t = jnp.swapaxes(w, 2, 3)  # [3, 3, O, I]: the input gradient maps O -> I
    dyp = jnp.pad(dy, ((0, 0), (1, 0), (1, 0), (0, 0)))  # [N, Ho+1, Wo+1, O]
    phases = []
    for row_parity in (0, 1):
        for col_parity in (0, 1):
            rows, cols = _TAPS_BY_PARITY[row_parity], _TAPS_BY_PARITY[col_parity]
            kernel = jnp.stack([jnp.stack([w_t[r, c] for c in cols]) for r in rows])
            # Two taps read dyp[m] and dyp[m+1]; one tap reads dyp[m+1] only.
            r0, c0 = 2 - len(rows), 2 - len(cols)
            window = dyp[:, r0 : r0 + ho + len(rows) - 1, c0 : c0 + wo + len(cols) - 1]
            phases.append(_conv(window, kernel, 1, "VALID"))  # [N, Ho, Wo, I]
    dx = jnp.stack(phases, axis=3).reshape(n, ho, wo, 2, 2, -1)  # [N, Ho, Wo, row, col, I]
    return dx.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * ho, 2 * wo, -1)


def _bias_grad(dy: jax.Array) -> jax.Array:
    """dy [N, H, W, O] -> [O]: a product with ones over N, then a sum over H*W."""
    ones = jnp.ones((dy.shape[0],), dy.dtype)
    per_pixel = jnp.dot(ones, dy.reshape(dy.shape[0], -1), preferred_element_type=jnp.float32)
    return per_pixel.reshape(-1, dy.shape[-1]).sum(axis=0).astype(dy.dtype)  # [H*W*O] -> [O]


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def conv2d(x: jax.Array, w: jax.Array, b: jax.Array, stride: int) -> jax.Array:
    """SAME-padded 2-D convolution plus bias: x [N, H, W, I], w [k, k, I, O], b [O] ->
    [N, ceil(H/s), ceil(W/s), O]. Equals `nn.Conv`'s; only the gradients are lowered apart."""
    return _conv(x, w, stride) + b


def _conv2d_fwd(x, w, b, stride):
    return conv2d(x, w, b, stride), (x, w)


def _conv2d_bwd(stride, residuals, dy):
    x, w = residuals
    _, vjp = jax.vjp(lambda x_, w_: _conv(x_, w_, stride), x, w)
    if _takes_phase_path(x, w, stride):
        dx, dw = _input_grad_by_phase(dy, w).astype(x.dtype), vjp(dy)[1]
    else:
        dx, dw = vjp(dy)
    return dx, dw, _bias_grad(dy)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
    """Square SAME-padded convolution with bias: `nn.Conv`'s parameters (names, shapes,
    initialisers, so checkpoints and initial values are the same) and mathematics."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [N, H, W, C]
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, bias, self.stride)
