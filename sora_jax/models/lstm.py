"""The LSTM recurrence over a whole sequence, with a backward pass written out by hand.

Autodiff of a scanned LSTM step adds each step's contribution to the recurrent weight
gradient inside the backward loop: one more small matmul and a [H, 4H] accumulation per
time step, which dominate on the CPU (the steps are tiny). Here the backward loop only
carries the gate gradients back through time and stacks them; the weight gradient is
then one large matmul over every step at once, as cuDNN and oneDNN do. Same mathematics
as `flax.linen.LSTMCell` (gate order i, f, g, o), same dtypes: the recurrent product in the
compute dtype, gates and state in float32.

Two backends run the loops over time (BENCHMARKS.md has the measurements):
* `xla`: `lax.scan`. Each step is a dozen small XLA operations dispatched one by one; on
  the CPU that overhead, not the arithmetic, set the cost (~130 us a step at the reference
  shapes).
* `onednn` (the default on the CPU, `auto`): each loop is one custom call
  (sora_jax/kernels/onednn_lstm.cc) running every step in place: a oneDNN matmul with the
  weights packed once, then the gate arithmetic in one vectorised pass. In bfloat16 oneDNN
  accumulates the recurrent product in float32 without rounding it to bfloat16 first,
  as XLA does: a rounding difference, not a different model.
* `pallas` (the default on a TPU, `auto`, when the hidden size is a multiple of 128): each
  loop is one Pallas kernel (sora_jax/kernels/pallas_lstm.py) keeping the state and the
  recurrent weights in the core's VMEM across steps. XLA:TPU's scan runs each step as a
  chain of small kernels whose launches, not their work, set its time (BENCHMARKS.md
  section 7). Off the TPU it runs in Pallas's interpreter: for tests, not for speed.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from sora_jax.kernels import onednn, pallas_lstm, platform

F32 = jnp.float32
BACKENDS = (*onednn.BACKENDS, "pallas")


def resolve(backend: str, input_gates: jax.Array) -> str:
    """The `lstm_backend` setting -> the loops' backend for this program: `auto` is
    `onednn` on the CPU where it can run, `pallas` on a TPU when the hidden size fills the
    vector lanes (a multiple of 128), else `xla`."""
    if backend == "auto" and platform.target_platform() == "tpu":
        lanes_full = input_gates.shape[-1] % (4 * pallas_lstm.LANES) == 0
        return "pallas" if lanes_full else "xla"
    if backend == "pallas":
        return "pallas"
    return onednn.resolve(backend, input_gates, "lstm")


def _split(gates: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.split(gates, 4, axis=-1))


def lstm_sequence(
    input_gates: jax.Array,
    w_h: jax.Array,
    dtype: jnp.dtype,
    unroll: int = 1,
    backend: str = "xla",
) -> jax.Array:
    """input_gates [T, B, 4H] (x_t @ W_x + b, time-major), w_h [H, 4H] -> h [T, B, H]
    (float32), from a zero initial state. `backend`: one of BACKENDS."""
    backend = resolve(backend, input_gates)
    return _lstm(input_gates, w_h, jnp.dtype(dtype), unroll, backend)


def _per_device(fn, batched_in: tuple, batched_out: tuple, rows: int):
    return onednn.shard_over_batch(fn, batched_in, batched_out, rows, axis=1)


def _forward(input_gates, w_h, dtype, unroll, backend="xla"):
    batch, hidden = input_gates.shape[1], w_h.shape[0]
    w = w_h.astype(dtype)
    if backend in ("onednn", "pallas"):
        loop = onednn.lstm_forward if backend == "onednn" else pallas_lstm.lstm_forward
        hs, activations, cs = _per_device(loop, (True, False), (True, True, True), batch)(
            input_gates, w
        )
        h_prevs = jnp.concatenate([jnp.zeros_like(hs[:1]), hs[:-1]])
        return hs, (activations, cs, h_prevs)

    def step(carry, gx):  # carry: c, h [B, H] float32; gx [B, 4H]
        c_prev, h_prev = carry
        gates = gx.astype(F32) + jnp.dot(h_prev.astype(dtype), w).astype(F32)
        i, f, g, o = _split(gates)
        i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
        c = f * c_prev + i * g
        h = o * jnp.tanh(c)
        activations = jnp.concatenate([i, f, g, o], axis=-1)
        return (c, h), (h, activations, c, h_prev)

    zeros = jnp.zeros((batch, hidden), F32)
    _, (hs, activations, cs, h_prevs) = lax.scan(step, (zeros, zeros), input_gates, unroll=unroll)
    return hs, (activations, cs, h_prevs)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _lstm(input_gates, w_h, dtype, unroll, backend):
    return _forward(input_gates, w_h, dtype, unroll, backend)[0]


def _lstm_fwd(input_gates, w_h, dtype, unroll, backend):
    hs, saved = _forward(input_gates, w_h, dtype, unroll, backend)
    dtype_of_gates = jnp.zeros((0,), input_gates.dtype)  # residuals must be arrays
    return hs, (*saved, w_h, dtype_of_gates)


def _lstm_bwd(dtype, unroll, backend, residuals, dhs):
    activations, cs, h_prevs, w_h, dtype_of_gates = residuals
    if backend in ("onednn", "pallas"):
        loop = onednn.lstm_backward if backend == "onednn" else pallas_lstm.lstm_backward
        backward = lambda *args: (loop(*args),)
        (d_gates,) = _per_device(backward, (True, True, True, False), (True,), dhs.shape[1])(
            dhs.astype(F32), activations, cs, w_h.astype(dtype)
        )
    else:
        d_gates = _scan_backward(dtype, unroll, activations, cs, w_h, dhs)
    # The recurrent weight gradient of every step in one product over (T, B).
    dw_h = jnp.einsum(
        "tbh,tbg->hg", h_prevs.astype(dtype), d_gates.astype(dtype), preferred_element_type=F32
    )
    return d_gates.astype(dtype_of_gates.dtype), dw_h.astype(w_h.dtype)


def _scan_backward(dtype, unroll, activations, cs, w_h, dhs):
    """The gate gradients [T, B, 4H] (float32), carried back through time by lax.scan."""
    c_prevs = jnp.concatenate([jnp.zeros_like(cs[:1]), cs[:-1]])  # [T, B, H]
    w_t = w_h.astype(dtype).T  # [4H, H]

    def step(carry, xs):  # carry: dh, dc flowing back from step t+1
        dh_next, dc_next = carry
        dh_out, acts, c, c_prev = xs
        i, f, g, o = _split(acts)
        dh = dh_out + dh_next
        tanh_c = jnp.tanh(c)
        dc = dc_next + dh * o * (1 - tanh_c**2)
        d_gates = jnp.concatenate(  # through the sigmoids and the tanh: pre-activation
            [
                dc * g * i * (1 - i),
                dc * c_prev * f * (1 - f),
                dc * i * (1 - g**2),
                dh * tanh_c * o * (1 - o),
            ],
            axis=-1,
        )
        dh_prev = jnp.dot(d_gates.astype(dtype), w_t).astype(F32)
        return (dh_prev, dc * f), d_gates

    zeros = jnp.zeros_like(dhs[0])
    xs = (dhs, activations, cs, c_prevs)
    return lax.scan(step, (zeros, zeros), xs, reverse=True, unroll=unroll)[1]


_lstm.defvjp(_lstm_fwd, _lstm_bwd)
