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
import pathlib
from collections.abc import Callable

import jax
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from sora_jax.kernels import build, platform

BACKENDS = ("auto", "xla", "onednn")
DTYPES = (np.dtype("float32"), np.dtype(jax.numpy.bfloat16))
_TARGETS = ("SoraConvForward", "SoraConvBackwardData", "SoraConvBackwardWeights")
_LSTM_TARGETS = ("SoraLstmForward", "SoraLstmBackward")
# Every custom call these kernels add to a program: XLA's cost analysis cannot see inside.
CUSTOM_CALL_TARGETS = (*_TARGETS, *_LSTM_TARGETS)


@functools.cache
def _load() -> str | None:
    """Build, load and register the kernels once per process; None, or why it failed."""
    try:
        library = ctypes.CDLL(str(build.build()))
    except (build.BuildError, OSError) as error:
        return str(error)
    for name in CUSTOM_CALL_TARGETS:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), "cpu")
    return None


def unavailable_reason() -> str | None:
    """None when the oneDNN kernels are ready to use, else a sentence saying why not."""
    return _load()


@functools.cache
def _cpu_flags() -> tuple[str, ...]:
    """The CPU's instruction-set flags (Linux; empty where unknown)."""
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    return tuple(next((ln.split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []))


@functools.cache
def conv_unverified_reason() -> str | None:
    """None where the convolution kernels are verified (x86 CPUs with AVX2 or AVX-512),
    else why not. They were once held to AVX-512: on an AVX2-only AMD EPYC training hung
    or crashed (`free(): invalid next size`) in about half of short runs. The cause was
    oneDNN's AVX2 weight gradient of a strided 1x1 convolution on few input channels,
    which writes past its workspace (oneDNN issue 6035); models/conv.py no longer gives
    oneDNN strided 1x1 convolutions. Checked with oneDNN held to AVX2
    (ONEDNN_MAX_CPU_ISA=AVX2) under AddressSanitizer (`make asan`)."""
    if "avx2" not in _cpu_flags():
        return (
            "the oneDNN convolutions are verified on x86 CPUs with AVX2 or AVX-512; this one "
            "has neither: XLA's convolutions run instead"
        )
    return None


def bfloat16_unsupported_reason() -> str | None:
    """oneDNN 2023 builds no bfloat16 matmul or convolution without AVX-512 ("could not
    create a primitive descriptor"): there bfloat16 runs on XLA's operations."""
    if build.held_below_avx512():
        return (
            "oneDNN has no bfloat16 matmul or convolution below AVX-512 "
            f"(held to {build.isa_cap()})"
        )
    if "avx512f" in _cpu_flags():
        return None
    return "oneDNN has no bfloat16 matmul or convolution for this CPU (no AVX-512)"


def available() -> bool:
    return _load() is None


@functools.cache
def warn_unavailable_once() -> None:
    logging.warning(
        "oneDNN kernels unavailable, using XLA's (slower on the CPU): %s", unavailable_reason()
    )


def resolve(backend: str, x: jax.Array, what: str) -> str:
    """A `what` backend setting for input x -> "onednn" or "xla".

    `auto` -> `onednn` where it can run (the CPU, float32/bfloat16, static shapes, the
    kernels built), else `xla`; `onednn` where it cannot is an error, not a silent fallback.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{what} backend {backend!r} is not one of {BACKENDS}")
    if backend == "xla":
        return "xla"
    target = platform.target_platform()  # the traced program's, not the host's
    why_not = None
    if target != "cpu":
        why_not = f"the oneDNN kernels run on the CPU, not on {target}"
    elif x.dtype not in DTYPES:
        why_not = f"the oneDNN kernels take float32 or bfloat16, not {x.dtype}"
    elif not all(isinstance(d, int) for d in x.shape):
        why_not = f"the oneDNN kernels need static shapes, not {x.shape}"
    if why_not is None and not available():
        if backend == "auto":
            warn_unavailable_once()
            return "xla"
        why_not = unavailable_reason()
    if why_not is None and what == "conv":
        why_not = conv_unverified_reason()
    if why_not is None and x.dtype == jax.numpy.bfloat16:
        why_not = bfloat16_unsupported_reason()
    if why_not is None:
        return "onednn"
    if backend == "onednn":
        raise ValueError(f"{what} backend 'onednn': {why_not}")
    return "xla"


def shard_over_batch(
    fn: Callable, batched_in: tuple, batched_out: tuple, rows: int, axis: int = 0
) -> Callable:
    """fn on each device's rows of the batch (axis `axis` of the batched arguments and
    results) under the tracing mesh (the train and eval steps set it); results that are
    not per-row (weight gradients) are summed over devices.

    A custom call is opaque to XLA's partitioner. This project's mesh is all data
    parallelism (train/sharding.py), so the batch is the only sharded dimension. Without a
    mesh, on one device or with rows that do not divide evenly, fn runs as is and XLA
    gathers its operands: slower, never wrong.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or rows % mesh.size:
        return fn
    axes = mesh.axis_names
    spec = lambda batched: P(*[None] * axis, axes) if batched else P()

    def on_shard(*args):
        outs = fn(*args)
        return tuple(o if b else lax.psum(o, axes) for o, b in zip(outs, batched_out, strict=True))

    return jax.shard_map(
        on_shard,
        mesh=mesh,
        in_specs=tuple(map(spec, batched_in)),
        out_specs=tuple(map(spec, batched_out)),
        check_vma=False,
    )


Pads = tuple[tuple[int, int], tuple[int, int]]  # ((top, bottom), (left, right))


def _padding_attrs(stride: int, pads: Pads) -> dict:
    (top, bottom), (left, right) = pads
    values = dict(stride_h=stride, stride_w=stride, pad_t=top, pad_b=bottom, pad_l=left)
    return {k: np.int64(v) for k, v in {**values, "pad_r": right}.items()}


def conv_forward(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array,
    stride: int,
    pads: Pads,
    out_hw: tuple[int, int],
    relu: bool = False,
) -> jax.Array:
    """x [N, H, W, I], w [KH, KW, I, O], b [O] -> y [N, *out_hw, O]: conv + bias, then
    max(., 0) if `relu` (fused into the kernel)."""
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, w.shape[3]), x.dtype)
    attrs = {**_padding_attrs(stride, pads), "relu": bool(relu)}
    return jax.ffi.ffi_call(_TARGETS[0], out)(x, w, b, **attrs)


def conv_backward_data(
    dy: jax.Array, w: jax.Array, stride: int, pads: Pads, in_hw: tuple[int, int]
) -> jax.Array:
    """dy [N, Ho, Wo, O], w [KH, KW, I, O] -> dx [N, *in_hw, I]."""
    out = jax.ShapeDtypeStruct((dy.shape[0], *in_hw, w.shape[2]), dy.dtype)
    return jax.ffi.ffi_call(_TARGETS[1], out)(dy, w, **_padding_attrs(stride, pads))


def conv_backward_weights(
    x: jax.Array, dy: jax.Array, stride: int, pads: Pads, kernel_hw: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """x [N, H, W, I], dy [N, Ho, Wo, O] -> (dw [*kernel_hw, I, O], db [O])."""
    dw = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], dy.shape[3]), x.dtype)
    db = jax.ShapeDtypeStruct((dy.shape[3],), x.dtype)
    return jax.ffi.ffi_call(_TARGETS[2], (dw, db))(x, dy, **_padding_attrs(stride, pads))


def lstm_forward(input_gates: jax.Array, w_h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """input_gates [T, B, 4H] (x_t @ W_x + b), w_h [H, 4H] in the compute dtype -> float32
    h [T, B, H], gate activations [T, B, 4H] and cell states [T, B, H]."""
    steps, batch, width = input_gates.shape
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
    outs = (f32(steps, batch, width // 4), f32(steps, batch, width), f32(steps, batch, width // 4))
    return jax.ffi.ffi_call(_LSTM_TARGETS[0], outs)(input_gates, w_h)


def lstm_backward(dh: jax.Array, activations: jax.Array, c: jax.Array, w_h: jax.Array) -> jax.Array:
    """dh [T, B, H] (float32) and the forward pass's residuals -> the gradient of the gate
    pre-activations [T, B, 4H], float32."""
    out = jax.ShapeDtypeStruct(activations.shape, np.float32)
    return jax.ffi.ffi_call(_LSTM_TARGETS[1], out)(dh, activations, c, w_h)
