"""The LSTM loops as oneDNN-backed custom calls: the same numbers as XLA's scan, forward and
backward, whole and sharded over the mesh, in the full audio encoder, and refused with a
clear error where they cannot run."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax import config as config_lib
from sora_jax import models
from sora_jax.kernels import build
from sora_jax.models import lstm
from sora_jax.models.audio import AudioEncoder
from sora_jax.train.sharding import BATCH_AXES, make_mesh
from tests.conftest import initialised, needs_onednn_bfloat16, normal


def _inputs(t=7, b=4, h=8, dtype=jnp.float32):
    return normal(0, t, b, 4 * h).astype(dtype), 0.5 * normal(1, h, 4 * h)


def _value_and_grads(backend: str, dtype=jnp.float32):
    def loss(gates, w_h):  # nonlinear in every output: each step has its own cotangent
        return jnp.sum(jnp.sin(3 * lstm.lstm_sequence(gates, w_h, dtype, 1, backend)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


@pytest.mark.parametrize("shape", [(7, 4, 8), (1, 3, 5), (30, 2, 16)])
def test_equals_the_xla_scan_forward_and_backward(shape):
    gates, w_h = _inputs(*shape)
    got = _value_and_grads("onednn")(gates, w_h)
    want = _value_and_grads("xla")(gates, w_h)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    assert float(jnp.abs(want[1][0]).max()) > 0.1  # the gradients carry signal
    assert shape[0] == 1 or float(jnp.abs(want[1][1]).max()) > 0.1  # one step: dW_h = 0
    for a, e in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def test_lowers_to_two_custom_calls_and_no_loop():
    gates, w_h = _inputs()
    hlo = _value_and_grads("onednn").lower(gates, w_h).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom_call_target" in line]
    assert len(calls) == 2
    assert any("SoraLstmForward" in c for c in calls) and any(
        "SoraLstmBackward" in c for c in calls
    )
    assert " while(" not in hlo
    assert " while(" in _value_and_grads("xla").lower(gates, w_h).compile().as_text()


@needs_onednn_bfloat16
def test_bfloat16_close_to_float32():
    gates, w_h = _inputs(t=12, b=4, h=32)
    exact = _value_and_grads("onednn")(gates, w_h)
    low = _value_and_grads("onednn", jnp.bfloat16)(gates.astype(jnp.bfloat16), w_h)
    assert low[1][0].dtype == jnp.bfloat16 and low[1][1].dtype == jnp.float32
    for a, e in zip(jax.tree.leaves(low), jax.tree.leaves(exact), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e)
        assert np.linalg.norm(a - e) / np.linalg.norm(e) < 3e-2


def test_sharded_over_the_mesh_equals_one_device():
    """Under the train step's mesh each device runs the loop on its own clips (batch axis
    1, time-major), with no gather; the weight gradient is reduced by XLA."""
    gates, w_h = _inputs(t=9, b=16, h=8)
    expected = _value_and_grads("onednn")(gates, w_h)
    mesh = make_mesh(fsdp=2)  # 8 devices: data 4 x fsdp 2
    sharded = jax.device_put(gates, NamedSharding(mesh, P(None, BATCH_AXES)))
    f = _value_and_grads("onednn")
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        compiled = f.lower(sharded, w_h).compile()
    got = compiled(sharded, w_h)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    hlo = compiled.as_text()
    forward = [line for line in hlo.splitlines() if "SoraLstmForward" in line]
    assert forward and all("f32[9,2,32]" in line for line in forward)  # 2 of 16 clips each
    assert "all-gather" not in hlo


@pytest.mark.parametrize(
    "dtype", ["float32", pytest.param("bfloat16", marks=needs_onednn_bfloat16)]
)
def test_audio_encoder_same_parameters_and_outputs_for_both_backends(dtype):
    """Two layers, both directions (the reverse pass flips each clip within its length),
    clips of different lengths: the backend changes how, not what, is computed."""
    kwargs = dict(hidden=16, layers=2, bidirectional=True, num_mel_bins=16)
    kwargs["dtype"] = jnp.dtype(dtype)
    wave = 0.1 * normal(2, 4, 16000)
    lengths = jnp.array([16000, 9000, 4000, 16000])
    encoders = {b: AudioEncoder(**kwargs, lstm_backend=b) for b in ("xla", "onednn")}
    params = initialised(encoders["xla"], wave, lengths, seed=3)
    onednn_params = initialised(encoders["onednn"], wave, lengths, seed=3)
    assert jax.tree.structure(params) == jax.tree.structure(onednn_params)

    def loss(backend):
        def f(p):
            pooled, seq, _ = encoders[backend].apply(p, wave, lengths)
            return jnp.sum(jnp.sin(pooled.astype(jnp.float32))) + jnp.mean(seq.astype(jnp.float32))

        return jax.jit(jax.value_and_grad(f))

    (got, got_grads), (want, want_grads) = loss("onednn")(params), loss("xla")(params)
    tolerance = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(got, want, rtol=tolerance)
    for a, e in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        a, e = np.asarray(a, np.float32), np.asarray(e, np.float32)
        assert np.linalg.norm(a - e) <= tolerance * np.linalg.norm(e) + 1e-6


def test_unsupported_inputs_and_bad_config_are_refused():
    gates, w_h = _inputs(dtype=jnp.float16)
    with pytest.raises(ValueError, match=r"lstm backend 'onednn'.*not float16"):
        lstm.lstm_sequence(gates, w_h, jnp.float16, 1, "onednn")
    assert lstm.lstm_sequence(gates, w_h, jnp.float16, 1, "auto").shape == (7, 4, 8)  # XLA's
    from configs import demo

    config = demo.get_config()
    config.model.audio.lstm_backend = "cudnn"
    with pytest.raises(config_lib.ConfigError, match=r"model\.audio\.lstm_backend.*'cudnn'"):
        models.check_config(config.model)


@pytest.mark.slow  # builds a second kernel library (~15 s)
def test_held_to_avx2_the_gate_loops_leave_out_avx512(tmp_path, monkeypatch):
    # An AVX-512 host held to AVX2 (`make asan`, `peers.py --max-isa AVX2`) must run what an
    # AVX2 host runs: oneDNN obeys its cap, and our own gate loops follow it.
    def gate_clones(library) -> set[str]:
        names = re.findall(rb"Gates\w*\.(\w+)", library.read_bytes())
        return {name.decode() for name in names}

    assert {"avx2", "avx512f"} <= gate_clones(build.build())
    monkeypatch.setenv("SORA_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    held = build.build()
    assert held.parent == tmp_path / "kernels"
    assert "avx2" in gate_clones(held) and "avx512f" not in gate_clones(held)
