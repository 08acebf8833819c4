"""lstm.py's hand-written backward pass equals autodiff of the same recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import lstm


def _autodiff_lstm(input_gates, w_h, dtype, unroll):
    return lstm._forward(input_gates, w_h, jnp.dtype(dtype), unroll)[0]


def _loss(fn, dtype, unroll):
    # Nonlinear in every output, so each step receives its own cotangent.
    return lambda gates, w: jnp.sum(jnp.sin(3 * fn(gates, w, dtype, unroll)))


@pytest.mark.parametrize("unroll", [1, 4])  # 4 with 7 steps: a remainder iteration too
def test_gradients_equal_autodiff(unroll):
    t, b, h = 7, 3, 5
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    gates = jax.random.normal(keys[0], (t, b, 4 * h))
    w_h = 0.5 * jax.random.normal(keys[1], (h, 4 * h))
    ours = lstm.lstm_sequence(gates, w_h, jnp.float32, unroll)
    np.testing.assert_allclose(ours, _autodiff_lstm(gates, w_h, jnp.float32, unroll), rtol=1e-6)
    assert ours.shape == (t, b, h) and ours.dtype == jnp.float32
    got = jax.grad(_loss(lstm.lstm_sequence, jnp.float32, unroll), argnums=(0, 1))(gates, w_h)
    want = jax.grad(_loss(_autodiff_lstm, jnp.float32, unroll), argnums=(0, 1))(gates, w_h)
    for a, e in zip(got, want, strict=True):
        assert float(jnp.abs(e).max()) > 0.1  # the gradients carry signal
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_dtypes_and_stays_close():
    t, b, h = 6, 2, 8
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    gates = jax.random.normal(keys[0], (t, b, 4 * h))
    w_h = 0.5 * jax.random.normal(keys[1], (h, 4 * h))
    exact = jax.grad(_loss(lstm.lstm_sequence, jnp.float32, 1), argnums=(0, 1))(gates, w_h)
    low = jax.grad(_loss(lstm.lstm_sequence, jnp.bfloat16, 1), argnums=(0, 1))(
        gates.astype(jnp.bfloat16), w_h
    )
    assert low[0].dtype == jnp.bfloat16 and low[1].dtype == jnp.float32
    for a, e in zip(low, exact, strict=True):
        a = np.asarray(a, np.float32)
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < 3e-2
