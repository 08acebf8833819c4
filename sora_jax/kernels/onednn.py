"""oneDNN's convolution kernels as XLA custom calls (`jax.ffi`), for the CPU.

XLA:CPU's convolution gradients ran 2-4x slower than oneDNN's (the kernels PyTorch uses on
the CPU), and XLA:CPU has no AMX path for bfloat16 convolutions at all (BENCHMARKS.md).
These calls compute the same convolutions in oneDNN on XLA's own buffers: x [N, H, W, I],
w [KH, KW, I, O], b [O], y [N, Ho, Wo, O], float32 or bfloat16, explicit padding.

The library is built on first use (build.py); `available()` says whether it could be, and
`unavailable_reason()` why not, so callers can fall back to XLA's convolutions.
"""

import ctypes
import functools
import logging

import jax
import numpy as np

from sora_jax.kernels import build

DTYPES = (np.dtype("float32"), np.dtype(jax.numpy.bfloat16))
_TARGETS = ("SoraConvForward", "SoraConvBackwardData", "SoraConvBackwardWeights")


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernels once per process; None, or why it failed."""
    try:
        library = ctypes.CDLL(str(build.build()))
    except (build.BuildError, OSError) as error:
        return str(error)
    for name in _TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), "cpu")
    return None


def unavailable_reason() -> str | None:
    """None when the oneDNN kernels are ready to use, else a sentence saying why not."""
    return _load()


def available() -> bool:
    return _load() is None


@functools.cache
def warn_unavailable_once() -> None:
    logging.warning(
        "oneDNN convolutions unavailable, using XLA's (slower on the CPU): %s",
        unavailable_reason(),
    )


def _padding_attrs(stride: int, pads: tuple[tuple[int, int], tuple[int, int]]) -> dict:
    (top, bottom), (left, right) = pads
    values = dict(stride_h=stride, stride_w=stride, pad_t=top, pad_b=bottom, pad_l=left)
    return {k: np.int64(v) for k, v in {**values, "pad_r": right}.items()}


def conv_forward(
    x: jax.Array, w: jax.Array, b: jax.Array, stride: int, pads, out_hw, relu: bool = False
):
    """x [N, H, W, I], w [KH, KW, I, O], b [O] -> y [N, *out_hw, O]: conv + bias, then
    max(., 0) if `relu` (fused into the kernel)."""
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, w.shape[3]), x.dtype)
    attrs = {**_padding_attrs(stride, pads), "relu": bool(relu)}
    return jax.ffi.ffi_call(_TARGETS[0], out)(x, w, b, **attrs)


def conv_backward_data(dy: jax.Array, w: jax.Array, stride: int, pads, in_hw):
    """dy [N, Ho, Wo, O], w [KH, KW, I, O] -> dx [N, *in_hw, I]."""
    out = jax.ShapeDtypeStruct((dy.shape[0], *in_hw, w.shape[2]), dy.dtype)
    return jax.ffi.ffi_call(_TARGETS[1], out)(dy, w, **_padding_attrs(stride, pads))


def conv_backward_weights(x: jax.Array, dy: jax.Array, stride: int, pads, kernel_hw):
    """x [N, H, W, I], dy [N, Ho, Wo, O] -> (dw [*kernel_hw, I, O], db [O])."""
    dw = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)
    db = jax.ShapeDtypeStruct((dy.shape[3],), x.dtype)
    return jax.ffi.ffi_call(_TARGETS[2], (dw, db))(x, dy, **_padding_attrs(stride, pads))
