"""The LSTM recurrence over a whole sequence, with a backward pass written out by hand.

Autodiff of a scanned LSTM step adds each step's contribution to the recurrent weight
gradient inside the backward loop: one more small matmul and a [H, 4H] accumulation per
time step, which dominate on the CPU (the steps are tiny). Here the backward loop only
carries the gate gradients back through time and stacks them; the weight gradient is
then one large matmul over every step at once, as cuDNN and oneDNN do. Same mathematics
as `flax.linen.LSTMCell` (gate order i, f, g, o), same dtypes: the recurrent product in the
compute dtype, gates and state in float32.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _split(gates: jax.Array) -> tuple[jax.Array, ...]:
    return tuple(jnp.split(gates, 4, axis=-1))


def lstm_sequence(
    input_gates: jax.Array, w_h: jax.Array, dtype: jnp.dtype, unroll: int = 1
) -> jax.Array:
    """input_gates [T, B, 4H] (x_t @ W_x + b, time-major), w_h [H, 4H] -> h [T, B, H]
    (float32), from a zero initial state."""
    return _lstm(input_gates, w_h, jnp.dtype(dtype), unroll)


def _forward(input_gates, w_h, dtype, unroll):
    batch, hidden = input_gates.shape[1], w_h.shape[0]
    w = w_h.astype(dtype)

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


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _lstm(input_gates, w_h, dtype, unroll):
    return _forward(input_gates, w_h, dtype, unroll)[0]


def _lstm_fwd(input_gates, w_h, dtype, unroll):
    hs, saved = _forward(input_gates, w_h, dtype, unroll)
    dtype_of_gates = jnp.zeros((0,), input_gates.dtype)  # residuals must be arrays
    return hs, (*saved, w_h, dtype_of_gates)


def _lstm_bwd(dtype, unroll, residuals, dhs):
    activations, cs, h_prevs, w_h, dtype_of_gates = residuals
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
    _, d_gates = lax.scan(step, (zeros, zeros), xs, reverse=True, unroll=unroll)  # [T, B, 4H]
    # The recurrent weight gradient of every step in one product over (T, B).
    dw_h = jnp.einsum(
        "tbh,tbg->hg", h_prevs.astype(dtype), d_gates.astype(dtype), preferred_element_type=F32
    )
    return d_gates.astype(dtype_of_gates.dtype), dw_h.astype(w_h.dtype)


_lstm.defvjp(_lstm_fwd, _lstm_bwd)
