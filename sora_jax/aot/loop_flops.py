"""The FLOPs a compiled program's loops repeat, which XLA's cost analysis counts once.

`compiled.cost_analysis()` walks the program's instructions once: a while loop's body is
charged for one trip, whatever its trip count. The train step's FLOPs, and the FLOP per
byte, bound and MFU that sora-compile derives from them, then fall short by the trips it
leaves out. Gradient accumulation is the loud case: with `accum_steps=2` the whole forward
and backward pass sits in a two-trip loop, and the step reported half its FLOPs (audioset
on v5e:4x4: 5.98e12 against 11.96e12 for the same work in one pass). A scan of the LSTM
as XLA's while loop (`model.audio.lstm_backend=xla`) falls short the same way.

This reads the compiled program's launches (traffic.launches: a loop's kernels with their
trip count) and counts the multiply-adds of the kernels XLA's count is made of on a TPU:
convolutions and dots (inside fusions too), and a Pallas kernel's own cost estimate. The
FLOPs the loops repeat are each launch's FLOPs times its trips beyond the first. The
elementwise work of a loop's body still counts once: in the production configs' steps,
convolutions and dots are 98-99% of XLA's count; in a toy model they can be two thirds.
"""

import json
import math
import re
from collections.abc import Sequence

from sora_jax.aot import traffic

_DIM_LABELS = re.compile(r"dim_labels=(\w+)_(\w+)->(\w+)")
_CONTRACTING = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")
_COST_ESTIMATE = re.compile(r'"cost_estimate":(\{[^{}]*\})')


def _dims(shape: str) -> list[int]:
    found = traffic.arrays(shape)
    return found[0][1] if found else []


def instruction_flops(
    instruction: traffic.Instruction,
    shapes: dict[str, str],
    computations: dict[str, list[traffic.Instruction]],
) -> int:
    """The FLOPs (two per multiply-add) of one instruction: a convolution, a dot, a fusion
    of them, or a Pallas kernel (its cost estimate); 0 for anything else."""
    if instruction.opcode == "fusion" and instruction.calls in computations:
        fused = computations[instruction.calls]
        inner = {i.name: i.shape for i in fused}
        return sum(instruction_flops(i, inner, computations) for i in fused)
    if instruction.opcode == "convolution":
        return _convolution_flops(instruction, shapes)
    if instruction.opcode == "dot":
        lhs = _dims(shapes.get(instruction.operands[0], ""))
        contracting = _CONTRACTING.search(instruction.attributes)
        axes = [int(a) for a in contracting.group(1).split(",") if a] if contracting else []
        if not lhs or any(a >= len(lhs) for a in axes):
            return 0
        return 2 * math.prod(_dims(instruction.shape)) * math.prod(lhs[a] for a in axes)
    if instruction.opcode == "custom-call":
        estimate = _COST_ESTIMATE.search(instruction.rest)
        return int(json.loads(estimate.group(1)).get("flops", 0)) if estimate else 0
    return 0


def repeated_flops(hlo_text: str, launched: Sequence[traffic.Launch] | None = None) -> int:
    """The FLOPs that a compiled program's loops run beyond their first trip: what XLA's
    cost analysis leaves out of it (`launched`: traffic.launches of the same text, if
    already read). Called on every compile (fit.compile_step): a program without a loop,
    such as the production configs' TPU steps, is not read at all."""
    if " while(" not in hlo_text:
        return 0
    computations, _ = traffic.parse(hlo_text)
    shapes = {i.name: i.shape for body in computations.values() for i in body}  # unique names
    return sum(
        instruction_flops(launch.kernel, shapes, computations) * (launch.times - 1)
        for launch in (traffic.launches(hlo_text) if launched is None else launched)
        if launch.times > 1
    )


def _window(attributes: str, rank: int) -> dict[str, list]:
    """A convolution's window attribute, per spatial dimension, with XLA's defaults."""
    found = re.search(r"window=\{([^}]*)\}", attributes)
    fields = dict(f.split("=", 1) for f in found.group(1).split()) if found else {}

    def each(key: str, default: int) -> list[int]:
        return [int(v) for v in fields[key].split("x")] if key in fields else [default] * rank

    pads = [p.split("_") for p in fields["pad"].split("x")] if "pad" in fields else []
    return {
        "stride": each("stride", 1),
        "pad_low": [int(lo) for lo, _ in pads] or [0] * rank,
        "lhs_dilate": each("lhs_dilate", 1),
        "rhs_dilate": each("rhs_dilate", 1),
    }


def _valid_taps(size: int, window: int, out: int, stride: int, pad: int, lhs: int, rhs: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that land on an input
    element, not on padding or on the holes of a dilated input: as XLA counts them."""
    extent = (size - 1) * lhs + 1
    return sum(
        1
        for o in range(out)
        for k in range(window)
        if 0 <= (p := o * stride + k * rhs - pad) < extent and p % lhs == 0
    )


def _convolution_flops(instruction: traffic.Instruction, shapes: dict[str, str]) -> int:
    lhs, rhs = (_dims(shapes.get(o, "")) for o in instruction.operands[:2])
    out = _dims(instruction.shape)
    labels = _DIM_LABELS.search(instruction.attributes)
    if not (lhs and rhs and out and labels) or len(labels.group(2)) != len(rhs):
        return 0
    lhs_labels, rhs_labels, out_labels = labels.groups()
    spatial = [c for c in rhs_labels if c.isdigit()]
    window = _window(instruction.attributes, len(spatial))
    taps = 1
    for d, c in enumerate(spatial):
        taps *= _valid_taps(
            lhs[lhs_labels.index(c)],
            rhs[rhs_labels.index(c)],
            out[out_labels.index(c)],
            window["stride"][d],
            window["pad_low"][d],
            window["lhs_dilate"][d],
            window["rhs_dilate"][d],
        )
    batch, features = out[out_labels.index("b")], out[out_labels.index("f")]
    return 2 * batch * features * rhs[rhs_labels.index("i")] * taps
