"""bias.Dense: nn.Dense's parameters, values and gradients, without XLA's reduce-window."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.models.bias import Dense
from tests.conftest import initialised, normal


def _loss(module):
    return lambda params, x: jnp.sum(jnp.sin(module.apply(params, x)))


def test_dense_equals_nn_dense():
    x = normal(0, 4, 10, 6)  # [B, F, M] as in the audio
    ours, flax_dense = Dense(12), nn.Dense(12)
    params = initialised(ours, x)
    np.testing.assert_equal(
        jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, initialised(flax_dense, x))
    )
    params = jax.tree.map(lambda p: p + 0.1, params)
    np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        jax.grad(_loss(ours), argnums=(0, 1))(params, x),
        jax.grad(_loss(flax_dense), argnums=(0, 1))(params, x),
    )


def _reduce_windows_over_the_output(module, shape) -> list[str]:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    compiled = jax.jit(jax.grad(_loss(module))).lower(params, x).compile().as_text()
    # A sum over the whole [B, F, G] output gradient shows as a rank-3 reduce-window; ours
    # leaves only a small [F, G] sum (rank 2) after the product with ones.
    shapes = re.findall(r"= f32\[([\d,]*)\]\S* reduce-window\(", compiled)
    return [dims for dims in shapes if dims.count(",") == 2]


def test_bias_gradient_is_not_a_reduce_window_over_the_output():
    shape = (16, 200, 64)  # the reference model's log-mel into a 4 x 256 LSTM projection
    assert _reduce_windows_over_the_output(nn.Dense(1024), shape)
    assert not _reduce_windows_over_the_output(Dense(1024), shape)
