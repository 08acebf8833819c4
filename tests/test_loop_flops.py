"""aot/loop_flops.py: the FLOPs a compiled program's loops repeat, which XLA's cost
analysis charges once, and fit.compile_step's FLOPs with every trip counted."""

import jax
import jax.numpy as jnp
import pytest

from configs import demo
from sora_jax.aot import analysis, loop_flops, traffic
from sora_jax.train import fit
from tests.conftest import ONE_DEVICE


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))


def _counted_flops(compiled) -> int:
    text = compiled.as_text()
    computations, _ = traffic.parse(text)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    return sum(
        loop_flops.instruction_flops(launch.kernel, shapes, computations) * launch.times
        for launch in traffic.launches(text)
    )


def _conv(x, w, stride):  # x: [N, H, W, C], w: [3, 3, C, O]
    dims = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=dims)


@pytest.mark.parametrize("stride", [1, 2])
def test_convolutions_count_as_xla_counts_them_forward_and_backward(stride):
    x, w = jnp.ones((4, 15, 15, 8)), jnp.ones((3, 3, 8, 16))
    forward = jax.jit(lambda x, w: _conv(x, w, stride)).lower(x, w).compile()
    # Padding taps do no work: a 15x15 SAME conv has fewer than 9 x 225 taps per channel.
    assert _counted_flops(forward) < 2 * 4 * 225 / stride**2 * 16 * 8 * 9
    assert _counted_flops(forward) == pytest.approx(_xla_flops(forward), rel=0.01)
    # Both gradients: the weights' (a conv over the batch) and the input's (for stride 2,
    # a conv over a dilated input whose holes do no work either).
    grads = jax.grad(lambda x, w: jnp.sum(_conv(x, w, stride)), argnums=(0, 1))
    backward = jax.jit(grads).lower(x, w).compile()
    assert _counted_flops(backward) == pytest.approx(_xla_flops(backward), rel=0.03)


def test_a_loop_of_matmuls_counts_every_trip():
    x, w = jnp.ones((64, 128)), jnp.ones((128, 128))

    def six_matmuls(x, w):
        return jax.lax.fori_loop(0, 6, lambda i, x: jnp.tanh(x @ w), x)

    compiled, report = fit.compile_step(jax.jit(six_matmuls), x, w)
    one = 2 * 64 * 128 * 128
    assert _xla_flops(compiled) < 2 * one  # XLA's own count: the body once
    assert report.flops == pytest.approx(6 * one, rel=0.02)  # every trip
    assert loop_flops.repeated_flops(compiled.as_text()) == 5 * one


@pytest.mark.slow  # two train steps compiled, ~30 s
def test_a_step_of_two_micro_batches_reports_the_flops_of_one_pass_over_the_batch():
    # Gradient accumulation runs the forward and backward passes in a two-trip loop: the
    # step's FLOPs (sora-compile's FLOP/byte and MFU, the benchmarks' MFU) must not halve.
    # The LSTM as XLA's scan puts a loop inside that loop.
    xla, reported = {}, {}
    for accum in (1, 2):
        config = demo.get_config("runlocal")
        config.accum_steps, config.batch_size = accum, 8
        config.model.visual.widths = (32, 64)  # convolutions ~90% of the FLOPs, as in a real model
        config.model.visual.conv_backend = config.model.audio.lstm_backend = "xla"
        run = analysis.abstract_run(config, ONE_DEVICE)
        compiled, report = fit.compile_step(
            run.train_step, run.built.abstract_state, run.train_batch
        )
        xla[accum], reported[accum] = _xla_flops(compiled), report.flops
    assert xla[2] < 0.55 * xla[1]  # XLA's own count: the loop body once
    # What is left out is the loop's elementwise work counted once (under a tenth here).
    assert reported[2] == pytest.approx(reported[1], rel=0.06)
