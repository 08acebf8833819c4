"""gru.py's recurrence equals one written out in NumPy, and its hand-written backward pass
equals autodiff of the same recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import gru
from tests.conftest import normal, run_compiled


def _autodiff_gru(input_gates, w_h, b_h, dtype, unroll):
    return gru._forward(input_gates, w_h, b_h, jnp.dtype(dtype), unroll)[0]


def _grads(fn, dtype, unroll, *args):
    # Nonlinear in every output, so each step receives its own cotangent.
    loss = lambda g, w, b: jnp.sum(jnp.sin(3 * fn(g, w, b, dtype, unroll)))
    return run_compiled(jax.grad(loss, argnums=(0, 1, 2)), *args)


def _numpy_gru(input_gates: np.ndarray, w_h: np.ndarray, b_h: np.ndarray) -> np.ndarray:
    """The GRU written out in NumPy, float64 (gates r, z, n; the reset gate applied to the
    recurrent candidate with its bias, as flax's GRUCell)."""
    sigmoid = lambda x: 1 / (1 + np.exp(-x))
    h = np.zeros((input_gates.shape[1], w_h.shape[0]))
    hs = []
    for gx in input_gates.astype(np.float64):
        xr, xz, xn = np.split(gx, 3, axis=-1)
        hr, hz, hn = np.split(h @ w_h + b_h, 3, axis=-1)
        r, z = sigmoid(xr + hr), sigmoid(xz + hz)
        h = (1 - z) * np.tanh(xn + r * hn) + z * h
        hs.append(h)
    return np.stack(hs)


@pytest.mark.parametrize("unroll", [1, 4])  # 4 with 7 steps: a remainder iteration too
def test_gradients_equal_autodiff(unroll):
    t, b, h = 7, 3, 5
    args = normal(0, t, b, 3 * h), 0.5 * normal(1, h, 3 * h), 0.5 * normal(2, 3 * h)
    ours = run_compiled(lambda *a: gru.gru_sequence(*a, jnp.float32, unroll), *args)
    np.testing.assert_allclose(ours, _numpy_gru(*args), rtol=1e-5, atol=1e-6)
    assert ours.shape == (t, b, h) and ours.dtype == jnp.float32
    got = _grads(gru.gru_sequence, jnp.float32, unroll, *args)
    want = _grads(_autodiff_gru, jnp.float32, unroll, *args)
    for a, e in zip(got, want, strict=True):
        assert float(jnp.abs(e).max()) > 0.1  # the gradients carry signal
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_keeps_dtypes_and_stays_close():
    t, b, h = 6, 2, 8
    args = normal(3, t, b, 3 * h), 0.5 * normal(4, h, 3 * h), 0.5 * normal(5, 3 * h)
    exact = _grads(gru.gru_sequence, jnp.float32, 1, *args)
    low = _grads(gru.gru_sequence, jnp.bfloat16, 1, args[0].astype(jnp.bfloat16), *args[1:])
    assert [g.dtype for g in low] == [jnp.bfloat16, jnp.float32, jnp.float32]
    for a, e in zip(low, exact, strict=True):
        a = np.asarray(a, np.float32)
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < 3e-2
