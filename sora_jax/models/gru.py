"""The GRU recurrence over a whole sequence, with a backward pass written out by hand.

As for the LSTM (lstm.py): autodiff of a scanned GRU step computes each step's share of
the recurrent weight gradient inside the backward loop, a [H, 3H] product and
accumulation per time step. Compiled for a TPU (kinetics_sounds, v5e:4x4) that made the
GRU 13% slower per train step than the LSTM it has fewer gates than. Here the backward
loop only carries the gradients back through time and stacks them; the weight and bias
gradients are then one product over every step at once: the audio's estimated cycles
fell by 32% and the step's by 13% (BENCHMARKS.md section 7).

Same mathematics as `flax.linen.GRUCell` (gate order r, z, n) with the input projection
hoisted out of the loop, so the recurrent biases of r and z sit beside the input's and
only n's stays inside, gated by r:

    r = sigmoid(x_r + h W_r + b_r)    z = sigmoid(x_z + h W_z + b_z)
    n = tanh(x_n + r * (h W_n + b_n)) h' = (1 - z) * n + z * h

The recurrent product and its bias in the compute dtype (as `nn.Dense` computes them),
gates and state in float32.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def gru_sequence(
    input_gates: jax.Array, w_h: jax.Array, b_h: jax.Array, dtype: jnp.dtype, unroll: int = 1
) -> jax.Array:
    """input_gates [T, B, 3H] (x_t @ W_x + b_x, time-major), w_h [H, 3H], b_h [3H] ->
    h [T, B, H] (float32), from a zero initial state."""
    return _gru(input_gates, w_h, b_h, jnp.dtype(dtype), unroll)


def _forward(input_gates, w_h, b_h, dtype, unroll):
    batch, hidden = input_gates.shape[1], w_h.shape[0]
    w, b = w_h.astype(dtype), b_h.astype(dtype)

    def step(h_prev, gx):  # h_prev [B, H] float32; gx [B, 3H]
        xr, xz, xn = jnp.split(gx.astype(F32), 3, axis=-1)
        recurrent = (jnp.dot(h_prev.astype(dtype), w) + b).astype(F32)  # [B, 3H]
        hr, hz, hn = jnp.split(recurrent, 3, axis=-1)
        r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h_prev
        return h, (h, jnp.concatenate([r, z, n, hn], axis=-1), h_prev)

    zeros = jnp.zeros((batch, hidden), F32)
    _, (hs, activations, h_prevs) = lax.scan(step, zeros, input_gates, unroll=unroll)
    return hs, (activations, h_prevs)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gru(input_gates, w_h, b_h, dtype, unroll):
    return _forward(input_gates, w_h, b_h, dtype, unroll)[0]


def _gru_fwd(input_gates, w_h, b_h, dtype, unroll):
    hs, (activations, h_prevs) = _forward(input_gates, w_h, b_h, dtype, unroll)
    dtype_of_gates = jnp.zeros((0,), input_gates.dtype)  # residuals must be arrays
    return hs, (activations, h_prevs, w_h, b_h, dtype_of_gates)


def _gru_bwd(dtype, unroll, residuals, dhs):
    activations, h_prevs, w_h, b_h, dtype_of_gates = residuals
    w_t = w_h.astype(dtype).T  # [3H, H]

    def step(dh_next, xs):  # dh_next: flowing back from step t+1
        dh_out, acts, h_prev = xs
        r, z, n, hn = jnp.split(acts, 4, axis=-1)
        dh = dh_out + dh_next
        dn = dh * (1.0 - z) * (1.0 - n**2)  # through the tanh: n's pre-activation
        dz = dh * (h_prev - n) * z * (1.0 - z)
        dr = dn * hn * r * (1.0 - r)
        d_recurrent = jnp.concatenate([dr, dz, dn * r], axis=-1)  # of h W + b, [B, 3H]
        dh_prev = dh * z + jnp.dot(d_recurrent.astype(dtype), w_t).astype(F32)
        return dh_prev, (jnp.concatenate([dr, dz, dn], axis=-1), d_recurrent)

    zeros = jnp.zeros_like(dhs[0])
    xs = (dhs, activations, h_prevs)
    _, (d_gates, d_recurrent) = lax.scan(step, zeros, xs, reverse=True, unroll=unroll)
    # The recurrent weight and bias gradients of every step in one product over (T, B).
    dw_h = jnp.einsum(
        "tbh,tbg->hg", h_prevs.astype(dtype), d_recurrent.astype(dtype), preferred_element_type=F32
    )
    db_h = jnp.sum(d_recurrent, axis=(0, 1))
    return (
        d_gates.astype(dtype_of_gates.dtype),
        dw_h.astype(w_h.dtype),
        db_h.astype(b_h.dtype),
    )


_gru.defvjp(_gru_fwd, _gru_bwd)
