"""The visual tower's Conv: nn.Conv's parameters, values and gradients on both backends,
and the XLA backend's own gradient lowering (test_onednn_conv.py has the oneDNN side)."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax import process
from sora_jax.models.conv import Conv
from tests.conftest import initialised, needs_onednn_bfloat16, needs_onednn_conv, normal

CASES = [  # (N, H, W, in, out, kernel, stride)
    (2, 8, 8, 16, 5, 3, 2),  # phase path: even sizes, 3x3, stride 2, >= 16 channels in
    (2, 12, 6, 16, 6, 3, 2),  # phase path, H != W
    (2, 8, 8, 3, 5, 3, 2),  # RGB input: lax's own input gradient
    (2, 7, 9, 16, 6, 3, 2),  # odd sizes: lax's own input gradient
    (3, 6, 6, 4, 4, 3, 1),  # stride 1
    (2, 6, 10, 4, 8, 1, 2),  # 1x1 shortcut projection
]


def _loss(module):
    # A nonlinear function of the output, so every output pixel gets a different cotangent.
    return lambda params, x: jnp.sum(jnp.sin(module.apply(params, x).astype(jnp.float32)))


def _grads(module, params, x):
    """d loss / d (params, x), compiled as one program: run eagerly, each of its ops
    compiled on its own (~50 per case, most of this file's time)."""
    return jax.jit(jax.grad(_loss(module), argnums=(0, 1)))(params, x)


@pytest.mark.parametrize("backend", ["xla", pytest.param("onednn", marks=needs_onednn_conv)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_conv_equals_nn_conv_in_parameters_values_and_gradients(case, backend):
    n, h, w, cin, cout, k, s = case
    x = normal(0, n, h, w, cin)
    ours = Conv(cout, k, s, backend=backend)
    flax_conv = nn.Conv(cout, (k, k), strides=(s, s), padding="SAME")
    params = initialised(ours, x)
    # Same names, shapes and initial values: checkpoints and runs carry over.
    np.testing.assert_equal(
        jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, initialised(flax_conv, x))
    )
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
    if backend == "xla":  # XLA's own forward convolution: the very same numbers
        np.testing.assert_array_equal(ours.apply(params, x), flax_conv.apply(params, x))
    else:  # oneDNN's kernel sums in another order
        np.testing.assert_allclose(
            ours.apply(params, x), flax_conv.apply(params, x), rtol=1e-5, atol=1e-5
        )
    ours_grads, flax_grads = _grads(ours, params, x), _grads(flax_conv, params, x)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
        ours_grads,
        flax_grads,
    )


@pytest.mark.parametrize(
    "backend", ["xla", pytest.param("onednn", marks=[needs_onednn_conv, needs_onednn_bfloat16])]
)
def test_bfloat16_gradients_stay_close_to_float32(backend):
    x = normal(0, 4, 16, 16, 16)  # phase path
    f32 = Conv(16, 3, 2, backend=backend)
    bf16 = Conv(16, 3, 2, dtype=jnp.bfloat16, backend=backend)
    params = jax.tree.map(lambda p: p + 0.05, initialised(f32, x))
    exact, low = _grads(f32, params, x), _grads(bf16, params, x)
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(exact), strict=True):
        assert a.dtype == b.dtype == jnp.float32  # parameters and inputs keep their dtype
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 2e-2


@pytest.mark.parametrize("backend", ["xla", pytest.param("onednn", marks=needs_onednn_conv)])
def test_fused_relu_equals_conv_then_relu(backend):
    x = normal(0, 4, 12, 12, 16)
    fused = Conv(8, 3, 2, backend=backend, relu=True)
    flax_conv = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME")
    reference = nn.Sequential([flax_conv, nn.relu])
    params = initialised(fused, x)
    ref_params = {"params": {"layers_0": params["params"]}}
    y = fused.apply(params, x)
    assert 0 < float(jnp.mean(y > 0)) < 1  # the ReLU cuts somewhere
    np.testing.assert_allclose(y, reference.apply(ref_params, x), rtol=1e-5, atol=1e-6)
    grads, ref_grads = _grads(fused, params, x), _grads(reference, ref_params, x)
    ref_grads = ({"params": ref_grads[0]["params"]["layers_0"]}, ref_grads[1])
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads, ref_grads
    )


def _conv_ops(hlo_text: str) -> list[str]:
    return [line for line in hlo_text.splitlines() if "convolution(" in line]


def test_strided_input_gradient_has_no_zero_dilated_convolution():
    """XLA's own input gradient of a stride-2 conv dilates dy with zeros (lhs_dilate);
    the phase split must replace it, and odd sizes must keep XLA's."""
    x = jnp.ones((2, 8, 8, 16))
    model = Conv(8, 3, 2, backend="xla")
    params = initialised(model, x)
    input_grad = jax.jit(jax.grad(_loss(model), argnums=1))
    ops = _conv_ops(input_grad.lower(params, x).as_text(dialect="hlo"))
    assert ops and not any("lhs_dilate" in op for op in ops)
    odd = jnp.ones((2, 7, 7, 16))
    ops = _conv_ops(input_grad.lower(params, odd).as_text(dialect="hlo"))
    assert any("lhs_dilate" in op for op in ops)


def _reduce_windows_over_activations(module, shape) -> list[str]:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
    compiled = jax.jit(jax.grad(_loss(module))).lower(params, x).compile().as_text()
    # A sum over the whole [N, H, W, C] activation shows as a rank-4 reduce-window.
    shapes = re.findall(r"= f32\[([\d,]*)\]\S* reduce-window\(", compiled)
    return [dims for dims in shapes if dims.count(",") == 3]


def test_bias_gradient_is_not_a_reduce_window_over_the_activation():
    """XLA:CPU turns nn.Conv's bias gradient (a sum over N, H, W) into a slow reduce-window;
    ours sums over N as a product with ones first, leaving a small [H*W, C] sum."""
    shape = (64, 32, 32, 8)
    assert _reduce_windows_over_activations(nn.Conv(8, (3, 3), padding="SAME"), shape)
    assert not _reduce_windows_over_activations(Conv(8, 3, 1, backend="xla"), shape)


def _xla_flags_after_configure(env_flags: str | None, monkeypatch) -> str:
    """XLA_FLAGS after an entry point's `process.configure()` in a CPU process."""
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    if env_flags is None:
        monkeypatch.delenv("XLA_FLAGS", raising=False)
    else:
        monkeypatch.setenv("XLA_FLAGS", env_flags)
    process.configure()
    return os.environ["XLA_FLAGS"]


def test_cpu_processes_route_convolutions_off_ynnpack_unless_the_user_chose(monkeypatch):
    flags = lambda env_flags: _xla_flags_after_configure(env_flags, monkeypatch)
    assert flags(None) == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert flags("--xla_force_host_platform_device_count=2").split() == [
        "--xla_force_host_platform_device_count=2",
        "--xla_cpu_experimental_ynn_fusion_type=individual_dot",
    ]
    own = "--xla_cpu_experimental_ynn_fusion_type="
    assert flags(own) == own
