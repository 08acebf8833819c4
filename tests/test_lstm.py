"""lstm.py's recurrence equals one written out in NumPy, and its hand-written backward
pass equals autodiff of the same recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import lstm
from tests.conftest import normal, run_compiled


def _autodiff_lstm(input_gates, w_h, dtype, unroll):
    return lstm._forward(input_gates, w_h, jnp.dtype(dtype), unroll)[0]


def _loss(fn, dtype, unroll):
    # Nonlinear in every output, so each step receives its own cotangent.
    return lambda gates, w: jnp.sum(jnp.sin(3 * fn(gates, w, dtype, unroll)))


def _grads(fn, dtype, unroll, gates, w_h):
    return run_compiled(jax.grad(_loss(fn, dtype, unroll), argnums=(0, 1)), gates, w_h)


def _numpy_lstm(input_gates: np.ndarray, w_h: np.ndarray) -> np.ndarray:
    """The LSTM written out in NumPy, float64 (gate order i, f, g, o, as flax's)."""
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    c = h = np.zeros((input_gates.shape[1], w_h.shape[0]))
    hs = []
    for gx in input_gates.astype(np.float64):
        i, f, g, o = np.split(gx + h @ w_h, 4, axis=-1)
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        hs.append(h)
    return np.stack(hs)


@pytest.mark.parametrize("unroll", [1, 4])  # 4 with 7 steps: a remainder iteration too
def test_gradients_equal_autodiff(unroll):
    t, b, h = 7, 3, 5
    gates, w_h = normal(0, t, b, 4 * h), 0.5 * normal(1, h, 4 * h)
    ours = run_compiled(lambda g, w: lstm.lstm_sequence(g, w, jnp.float32, unroll), gates, w_h)
    np.testing.assert_allclose(ours, _numpy_lstm(gates, w_h), rtol=1e-5, atol=1e-6)
    assert ours.shape == (t, b, h) and ours.dtype == jnp.float32
    got = _grads(lstm.lstm_sequence, jnp.float32, unroll, gates, w_h)
    want = _grads(_autodiff_lstm, jnp.float32, unroll, gates, w_h)
    for a, e in zip(got, want, strict=True):
        assert float(jnp.abs(e).max()) > 0.1  # the gradients carry signal
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_dtypes_and_stays_close():
    t, b, h = 6, 2, 8
    gates, w_h = normal(2, t, b, 4 * h), 0.5 * normal(3, h, 4 * h)
    exact = _grads(lstm.lstm_sequence, jnp.float32, 1, gates, w_h)
    low = _grads(lstm.lstm_sequence, jnp.bfloat16, 1, gates.astype(jnp.bfloat16), w_h)
    assert low[0].dtype == jnp.bfloat16 and low[1].dtype == jnp.float32
    for a, e in zip(low, exact, strict=True):
        a = np.asarray(a, np.float32)
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < 3e-2
