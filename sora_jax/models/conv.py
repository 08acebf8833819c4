"""The visual tower's convolution: `nn.Conv`'s mathematics, lowered to run fast on the CPU.

Two backends compute the same convolution (BENCHMARKS.md has the measurements):

* `onednn` (the default on the CPU, `auto`): forward pass, input gradient and weight+bias
  gradient are oneDNN's kernels called as XLA custom calls (sora_jax/kernels), the kernels
  PyTorch runs on the CPU; XLA:CPU's own weight gradient ran 2-4x slower, and only oneDNN
  uses AMX for bfloat16. A custom call is opaque to XLA's partitioner, so under a mesh each
  device runs it on its own rows of the batch (`shard_map`) and weight gradients are summed
  across devices, as XLA would have done.
* `xla` (accelerators, exported models, or `model.visual.conv_backend='xla'`): XLA's
  forward pass and weight gradient. For a program traced for the CPU
  (kernels/platform.py), two gradients are lowered differently from XLA's, where they were
  measured to help; on accelerators the plain autodiff of `lax.conv_general_dilated` and
  a bias add:

* Input gradient of a stride-2 3x3 convolution. XLA computes it as a convolution over the
  output gradient dilated with zeros, so three quarters of its multiplies are by zero (on
  the CPU it cost 1.5-7x the forward pass). Split by the parity of the input pixel instead:
  each of the four phases (even/odd row x even/odd column) is a small stride-1 convolution
  of the output gradient with the kernel taps that reach it (2x2, 2x1, 1x2 and 1x1 of the
  3x3 taps: 9 taps, no zeros); the phases are then interleaved.
* Bias gradient: `bias.bias_grad`, not XLA:CPU's slow `reduce-window` for large sums.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from sora_jax.kernels import onednn, platform
from sora_jax.models.bias import bias_grad

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


def conv2d(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    stride: int,
    backend: str = "auto",
    relu: bool = False,
) -> jax.Array:
    """SAME-padded 2-D convolution plus bias: x [N, H, W, I], w [k, k, I, O], b [O] or None
    (no bias) -> [N, ceil(H/s), ceil(W/s), O], then max(., 0) if `relu`. Equals `nn.Conv`'s
    (and `nn.relu`'s) whatever the backend; oneDNN applies the ReLU inside the kernel."""
    if b is None and not platform.for_cpu():  # accelerators: no add, no bias gradient
        y = _conv(x, w, stride)
        return nn.relu(y) if relu else y
    if b is None:  # the CPU's kernels take a bias: zeros add nothing
        b = jnp.zeros(w.shape[-1:], x.dtype)
    if onednn.resolve(backend, x, "conv") == "onednn":
        if w.shape[:2] == (1, 1) and stride > 1:
            # A strided 1x1 convolution (a residual shortcut) reads every s-th pixel:
            # take them here and convolve with stride 1, the same numbers. oneDNN's own
            # strided 1x1 weight gradient copies those pixels into a workspace and, with
            # fewer input channels than its block (8 on AVX2, 16 on AVX-512; RGB frames
            # have 3), writes past it (oneDNN issue 6035, open): on AVX2 hosts that
            # overwrote its barrier (a hang) or the heap (`free(): invalid next size`).
            x, stride = x[:, ::stride, ::stride, :], 1
        return _conv2d_onednn(x, w, b, stride, relu)
    y = _conv2d_xla(x, w, b, stride) if platform.for_cpu() else _conv(x, w, stride) + b
    return nn.relu(y) if relu else y  # XLA fuses it into the next operation itself


# ---- XLA ----


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d_xla(x: jax.Array, w: jax.Array, b: jax.Array, stride: int) -> jax.Array:
    return _conv(x, w, stride) + b


def _conv2d_xla_fwd(x, w, b, stride):
    return _conv2d_xla(x, w, b, stride), (x, w)


def _conv2d_xla_bwd(stride, residuals, dy):
    x, w = residuals
    _, vjp = jax.vjp(lambda x_, w_: _conv(x_, w_, stride), x, w)
    if _takes_phase_path(x, w, stride):
        dx, dw = _input_grad_by_phase(dy, w).astype(x.dtype), vjp(dy)[1]
    else:
        dx, dw = vjp(dy)
    return dx, dw, bias_grad(dy)


_conv2d_xla.defvjp(_conv2d_xla_fwd, _conv2d_xla_bwd)


# ---- oneDNN ----


def _same_pads(x: jax.Array, w: jax.Array, stride: int) -> list[tuple[int, int]]:
    return lax.padtype_to_pads(x.shape[1:3], w.shape[:2], (stride, stride), "SAME")


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _conv2d_onednn(x: jax.Array, w: jax.Array, b: jax.Array, stride: int, relu: bool):
    pads = _same_pads(x, w, stride)
    out_hw = tuple(-(-size // stride) for size in x.shape[1:3])
    forward = lambda x, w, b: (onednn.conv_forward(x, w, b, stride, pads, out_hw, relu),)
    (y,) = onednn.shard_over_batch(forward, (True, False, False), (True,), x.shape[0])(x, w, b)
    return y


def _conv2d_onednn_fwd(x, w, b, stride, relu):
    y = _conv2d_onednn(x, w, b, stride, relu)
    # After a ReLU the output says where the gradient passes; it is the next layer's
    # input, kept anyway, so this residual costs no memory.
    return y, (x, w, y if relu else None)


def _conv2d_onednn_bwd(stride, relu, residuals, dy):
    x, w, y = residuals
    if relu:
        dy = jnp.where(y > 0, dy, jnp.zeros_like(dy))
    pads = _same_pads(x, w, stride)

    def backward(x, w, dy):  # x [n, H, W, I], w [k, k, I, O], dy [n, Ho, Wo, O]
        dx = onednn.conv_backward_data(dy, w, stride, pads, x.shape[1:3])
        dw, db = onednn.conv_backward_weights(x, dy, stride, pads, w.shape[:2])
        return dx, dw, db

    sharded = onednn.shard_over_batch(backward, (True, False, True), (True, False, False), len(x))
    return sharded(x, w, dy)


_conv2d_onednn.defvjp(_conv2d_onednn_fwd, _conv2d_onednn_bwd)


class Conv(nn.Module):
    """Square SAME-padded convolution with bias: `nn.Conv`'s parameters (names, shapes,
    initialisers, so checkpoints and initial values are the same) and mathematics."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    backend: str = "auto"  # one of onednn.BACKENDS
    relu: bool = False  # max(., 0) after the bias, inside the oneDNN kernel
    use_bias: bool = True  # False where a norm follows, whose own shift replaces it

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # x: [N, H, W, C]
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        if not self.use_bias:
            x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
            return conv2d(x, kernel, None, self.stride, self.backend, self.relu)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv2d(x, kernel, bias, self.stride, self.backend, self.relu)
