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


@pytest.mark.parametrize(
    ("steps", "b", "dtype", "tolerance", "vmem"),
    # 12 steps: two blocks of six (the state crosses a block boundary both ways); 11: eleven
    # blocks of one (the first step of every block reads c from the block before); 16 clips
    # in 56 KiB of VMEM: two blocks of 8 clips, one step each.
    [
        (12, 8, jnp.float32, 1e-5, None),
        (11, 8, jnp.float32, 1e-5, None),
        (12, 8, jnp.bfloat16, 3e-2, None),
        (5, 16, jnp.float32, 1e-5, 56 << 10),
    ],
)
def test_the_pallas_loops_equal_the_scan(steps, b, dtype, tolerance, vmem, monkeypatch):
    """The TPU kernels (kernels/pallas_lstm.py), run by Pallas's interpreter on the CPU:
    the same outputs and gradients as the XLA scan. They accumulate the recurrent product
    in float32 where the scan rounds it to the compute dtype: bfloat16 agrees to its
    precision, float32 to float32's."""
    from sora_jax.kernels import pallas_lstm

    h = 128
    if vmem:
        monkeypatch.setattr(pallas_lstm, "VMEM_BUDGET", vmem)
        assert pallas_lstm.block_shape(steps, b, 11 * h * 4, 4 * h * h * 4) == (8, 1)
    gates, w_h = normal(4, steps, b, 4 * h), normal(5, h, 4 * h) / np.sqrt(h)
    gates = jnp.asarray(gates).astype(dtype)

    def out_and_grads(backend):
        run = lambda g, w: lstm.lstm_sequence(g, w, dtype, 1, backend)
        loss = lambda g, w: jnp.sum(jnp.sin(3 * run(g, w)))
        return run_compiled(lambda g, w: (run(g, w), jax.grad(loss, (0, 1))(g, w)), gates, w_h)

    got, want = out_and_grads("pallas"), out_and_grads("xla")
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert float(np.abs(e).max()) > 0.1  # each carries signal
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < tolerance


def test_auto_takes_the_pallas_loops_on_a_tpu_when_the_hidden_size_fills_the_lanes():
    from sora_jax.kernels import platform

    with platform.targeting("tpu"):
        assert lstm.resolve("auto", jnp.zeros((4, 8, 4 * 512))) == "pallas"
        assert lstm.resolve("auto", jnp.zeros((4, 8, 4 * 64))) == "xla"
        assert lstm.resolve("xla", jnp.zeros((4, 8, 4 * 512))) == "xla"
    assert lstm.resolve("auto", jnp.zeros((4, 8, 4 * 512), jnp.float16)) == "xla"  # CPU
