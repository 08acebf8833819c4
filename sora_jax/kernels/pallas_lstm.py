"""The LSTM's two loops over time as Pallas kernels for the TPU: each loop one kernel.

XLA:TPU runs a scanned LSTM step as a chain of small kernels (the recurrent matmul, the
gate arithmetic, the slices and updates of the carried arrays), one after another, each
paying its own launch and pipeline fill; at the production shapes (32 clips a chip,
hidden 512) a step costs ~9 us against 0.3 us of matmul at the MXU's peak (BENCHMARKS.md
section 7). Here a whole loop is one kernel: the recurrent weights are copied into the
core's VMEM once, the state (h, c going forward; dh, dc going back) stays in VMEM across
steps, and Pallas streams blocks of `steps` time steps in and out of HBM while the
previous block computes.

The mathematics are lstm.py's (gate order i, f, g, o; gates and state in float32, the
recurrent product in the compute dtype). As with the oneDNN loops, the product is
accumulated in float32 and not rounded to the compute dtype first, as XLA's scan does: a
rounding difference, not a different model.

Off the TPU the kernels run in Pallas's interpreter (slow: for tests, which check them
against the XLA scan on the CPU).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sora_jax.kernels import platform

F32 = jnp.float32
LANES = 128  # a TPU vector register's minor dimension: gate slices are cut at multiples
MAX_STEPS_PER_BLOCK = 8  # time steps per grid step: fewer grid steps, each ~0.35 us
# What a kernel's blocks may take of a core's VMEM: Pallas double-buffers each, and Mosaic's
# default scoped limit is 16 MiB; the rest is for a step's own values (256 clips' gates
# alone are 2 MiB). Blocks of 15.7 MiB failed to compile (16.14 MiB in all).
VMEM_BUDGET = 10 << 20


def block_shape(length: int, batch: int, row_step_bytes: int, fixed_bytes: int) -> tuple[int, int]:
    """(clips, steps) of a block: the most time steps, up to MAX_STEPS_PER_BLOCK, that divide
    `length`, and the most clips (all, or a multiple of 8 dividing `batch`) whose blocks
    (`row_step_bytes` a clip and step, in and out) fit VMEM_BUDGET beside the `fixed_bytes`
    of the weights, all double-buffered. Clips are cut first: a block of fewer steps costs
    grid steps, one of fewer clips only splits the same work."""
    fits = lambda rows, k: 2 * (rows * k * row_step_bytes + fixed_bytes) <= VMEM_BUDGET
    row_options = [batch] + [r for r in range(batch - 8, 0, -8) if batch % r == 0]
    rows = next((r for r in row_options if fits(r, 1)), row_options[-1])
    steps = [k for k in range(1, MAX_STEPS_PER_BLOCK + 1) if length % k == 0 and fits(rows, k)]
    return rows, max(steps, default=1)


def _gates(pre: jax.Array, hidden: int) -> tuple[jax.Array, ...]:
    """Pre-activations [B, 4H] -> i, f, g, o [B, H] (sigmoid, sigmoid, tanh, sigmoid)."""
    part = lambda k: pre[:, k * hidden : (k + 1) * hidden]
    sigmoid = lambda x: 0.5 * jnp.tanh(0.5 * x) + 0.5  # one EUP op, exact in real numbers
    return sigmoid(part(0)), sigmoid(part(1)), jnp.tanh(part(2)), sigmoid(part(3))


def _forward_kernel(gx_ref, w_ref, h_ref, acts_ref, c_ref, h_state, c_state, *, dtype):
    # gx [K, b, 4H] block (b of the B clips), w [H, 4H]; out h, c [K, b, H], acts
    # [K, b, 4H]; state [b, H]. Grid: (blocks of clips, blocks of time).
    steps, _, hidden = h_ref.shape

    @pl.when(pl.program_id(1) == 0)  # a block of clips starts
    def _():
        h_state[...] = jnp.zeros_like(h_state)
        c_state[...] = jnp.zeros_like(c_state)

    h, c = h_state[...], c_state[...]
    w = w_ref[...]
    for s in range(steps):  # unrolled: K static steps
        recurrent = jnp.dot(h.astype(dtype), w, preferred_element_type=F32)
        i, f, g, o = _gates(gx_ref[s].astype(F32) + recurrent, hidden)
        c = f * c + i * g
        h = o * jnp.tanh(c)
        for k, gate in enumerate((i, f, g, o)):
            acts_ref[s, :, k * hidden : (k + 1) * hidden] = gate
        h_ref[s] = h
        c_ref[s] = c
    h_state[...] = h
    c_state[...] = c


def _backward_kernel(
    dh_ref, acts_ref, c_ref, c_before_ref, w_t_ref, d_gates_ref, dh_state, dc_state, *, dtype
):
    # Blocks run last to first. dh, c [K, B, H], acts [K, B, 4H]; c_before: the block
    # before (its last row is this block's first c_prev); w_t [4H, H]; out d_gates [K, B, 4H]
    steps, _, hidden = dh_ref.shape
    first_block = pl.program_id(1) == pl.num_programs(1) - 1  # holds time step 0

    @pl.when(pl.program_id(1) == 0)  # a block of clips starts, at its last time steps
    def _():
        dh_state[...] = jnp.zeros_like(dh_state)
        dc_state[...] = jnp.zeros_like(dc_state)

    dh_next, dc_next = dh_state[...], dc_state[...]
    w_t = w_t_ref[...]
    # The c before this block's first step: the last of the block before (none at t = 0).
    c_entering = jnp.where(first_block, 0.0, c_before_ref[steps - 1])
    for s in reversed(range(steps)):
        c_prev = c_ref[s - 1] if s > 0 else c_entering
        acts = acts_ref[s]
        i, f, g, o = (acts[:, k * hidden : (k + 1) * hidden] for k in range(4))
        dh = dh_ref[s] + dh_next
        tanh_c = jnp.tanh(c_ref[s])
        dc = dc_next + dh * o * (1 - tanh_c * tanh_c)
        d_gates = (  # through the sigmoids and the tanh: pre-activation
            dc * g * i * (1 - i),
            dc * c_prev * f * (1 - f),
            dc * i * (1 - g * g),
            dh * tanh_c * o * (1 - o),
        )
        for k, d in enumerate(d_gates):
            d_gates_ref[s, :, k * hidden : (k + 1) * hidden] = d
        d_all = jnp.concatenate(d_gates, axis=-1).astype(dtype)  # [B, 4H]
        dh_next = jnp.dot(d_all, w_t, preferred_element_type=F32)
        dc_next = dc * f
    dh_state[...] = dh_next
    dc_state[...] = dc_next


def _on_tpu() -> bool:
    return platform.target_platform() == "tpu"


def _cost(length: int, batch: int, hidden: int, transcendentals: int, arrays) -> pl.CostEstimate:
    """What XLA's cost analysis should count for a loop (it cannot see inside a kernel):
    the recurrent products, the tanh of each gate or state, the bytes of its arrays."""
    return pl.CostEstimate(
        flops=2 * length * batch * hidden * 4 * hidden,
        transcendentals=transcendentals * length * batch * hidden,
        bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays),
    )


def _params() -> pltpu.CompilerParams:
    # Blocks of clips are independent ("parallel": a megacore chip's two cores split them);
    # in time each needs the state the one before left ("arbitrary").
    return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def lstm_forward(input_gates: jax.Array, w: jax.Array) -> tuple[jax.Array, ...]:
    """input_gates [T, B, 4H], w [H, 4H] (the compute dtype) -> h [T, B, H], the gate
    activations [T, B, 4H] and c [T, B, H], all float32, from a zero state."""
    length, batch, gates = input_gates.shape
    hidden = gates // 4
    # A step's blocks: its gate inputs in, h, c and the four activations out (float32).
    row_bytes = gates * input_gates.dtype.itemsize + 6 * hidden * 4
    rows, k = block_shape(length, batch, row_bytes, w.size * w.dtype.itemsize)
    block = lambda width: pl.BlockSpec((k, rows, width), lambda b, t: (t, b, 0))
    state = pltpu.VMEM((rows, hidden), F32)
    out = lambda width: jax.ShapeDtypeStruct((length, batch, width), F32)
    outs = [out(hidden), out(gates), out(hidden)]
    return pl.pallas_call(
        functools.partial(_forward_kernel, dtype=w.dtype),
        grid=(batch // rows, length // k),
        in_specs=[block(gates), pl.BlockSpec((hidden, gates), lambda b, t: (0, 0))],
        out_specs=[block(hidden), block(gates), block(hidden)],
        out_shape=outs,
        scratch_shapes=[state, state],
        compiler_params=_params(),
        cost_estimate=_cost(length, batch, hidden, 5, [input_gates, w, *outs]),
        interpret=not _on_tpu(),
        name="lstm_forward",
    )(input_gates, w)


def lstm_backward(dhs: jax.Array, activations: jax.Array, cs: jax.Array, w: jax.Array) -> jax.Array:
    """The gate gradients [T, B, 4H] (float32) from the output gradients dhs [T, B, H],
    what the forward kernel saved, and w [H, 4H] (the compute dtype)."""
    length, batch, hidden = dhs.shape
    gates = 4 * hidden
    # A step's blocks: dh, c twice, the activations and their gradients (float32).
    rows, k = block_shape(length, batch, (3 * hidden + 2 * gates) * 4, w.size * w.dtype.itemsize)
    blocks = length // k
    last_first = lambda b, t: (blocks - 1 - t, b, 0)
    before = lambda b, t: (jnp.maximum(blocks - 2 - t, 0), b, 0)
    state = pltpu.VMEM((rows, hidden), F32)
    d_gates = jax.ShapeDtypeStruct((length, batch, gates), F32)
    return pl.pallas_call(
        functools.partial(_backward_kernel, dtype=w.dtype),
        grid=(batch // rows, blocks),
        in_specs=[
            pl.BlockSpec((k, rows, hidden), last_first),
            pl.BlockSpec((k, rows, gates), last_first),
            pl.BlockSpec((k, rows, hidden), last_first),
            pl.BlockSpec((k, rows, hidden), before),
            pl.BlockSpec((gates, hidden), lambda b, t: (0, 0)),
        ],
        out_specs=pl.BlockSpec((k, rows, gates), last_first),
        out_shape=d_gates,
        scratch_shapes=[state, state],
        compiler_params=_params(),
        cost_estimate=_cost(length, batch, hidden, 1, [dhs, activations, cs, cs, w, d_gates]),
        interpret=not _on_tpu(),
        name="lstm_backward",
    )(dhs.astype(F32), activations, cs, cs, w.T)
