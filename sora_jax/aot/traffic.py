"""Where a compiled step's memory traffic goes, by part of the model and by pass.

A step far below its chip's ridge point (FLOPs per byte of HBM traffic) is bound by
memory, and raising its arithmetic intensity starts with knowing which part moves the
bytes. XLA's cost analysis gives one total; this reads the compiled program itself. Each
kernel the program launches (a fusion, a convolution, a copy, a collective) reads its
operands and writes its result; its bytes are charged to the part of the model that the
kernel's metadata names (`op_name`, the JAX name stack: flax modules, and the trainer's
`loss` and `optimizer` scopes), in the forward or the backward pass. A loop's body counts
once per trip when XLA knows the trip count (the audio cell's scan over time).

These are bytes of the kernels' arguments and results (a kernel that slices an operand
reads less of it). The compiler's `bytes accessed` counts differently, charging each
operation inside a fusion, and comes out larger (small.py on a v5e: 464 MB against these
264 MB); compare shares, and one program before and after a change.
"""

import collections
import re

import numpy as np

# Parts in the order they are reported.
PARTS = (
    "visual convolutions",
    "visual norms",
    "visual other",
    "audio",
    "fusion attention",
    "fusion other",
    "projection",
    "loss",
    "optimizer",
    "other",
)
PASSES = ("forward", "backward")

_ITEM_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_NAME = re.compile(r"^\s*(?:ROOT )?%(\S+) = ")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Instructions that launch no kernel of their own: they name, group or alias buffers, or
# hold other computations whose kernels are counted where they run.
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "while", "call", "conditional",
    "add-dependency", "domain",
}  # fmt: skip


def array_bytes(shape: str) -> int:
    """Bytes of every array in an HLO shape, e.g. `(f32[8,16]{1,0}, s32[])` -> 516."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
        total += size * _ITEM_BYTES[dtype]
    return total


def _split_instruction(line: str) -> tuple[str, str, str, str] | None:
    """(name, shape, opcode, rest) of an instruction line, or None."""
    m = _NAME.match(line)
    if not m:
        return None
    text = line[m.end() :]
    if text.startswith("("):  # a tuple shape: up to its closing parenthesis
        depth = np.cumsum([(ch == "(") - (ch == ")") for ch in text])
        end = int(np.argmax(depth == 0)) + 1
        shape, text = text[:end], text[end:].lstrip()
    else:
        shape, _, text = text.partition(" ")
    opcode, paren, rest = text.partition("(")
    if not paren:
        return None
    return m.group(1), shape, opcode, rest


def _parse(hlo_text: str) -> tuple[dict, str]:
    """{computation: [(name, shape, opcode, rest)]} and the entry computation's name."""
    computations: dict[str, list] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = computations.setdefault(m.group(1), [])
            entry = m.group(1) if line.startswith("ENTRY") else entry
            continue
        if line.startswith("}"):
            current = None
        elif current is not None and (parts := _split_instruction(line)):
            current.append(parts)
    return computations, entry


def part_of(op_name: str) -> str:
    """The part of the model (PARTS) a kernel's `op_name` names."""
    scopes = op_name.split("/")
    if "optimizer" in scopes:
        return "optimizer"
    if any(s == "loss" or s.endswith("(loss)") for s in scopes):
        return "loss"
    m = re.search(r"SoraModel\)*/(\w+)(.*)", op_name)
    if not m:
        return "other"
    module, inside = m.groups()
    if module == "visual":
        if re.search(r"/(\w*norm\w*)/", inside + "/"):
            return "visual norms"
        if re.search(r"/(conv\w*|shortcut_proj|stem\w*)/", inside + "/"):
            return "visual convolutions"
        return "visual other"
    if module == "audio":
        return "audio"
    if module == "fusion":  # cross-modal attention: fusion/video_from_audio/MultiHead...
        return "fusion attention" if "attention" in inside.lower() else "fusion other"
    if module == "contrastive":  # the projection heads of contrastive pretraining
        return "projection"
    return "other"


def pass_of(op_name: str) -> str:
    """The pass of a kernel: "backward" in the transposed (gradient) program."""
    return "backward" if "transpose(" in op_name else "forward"


def bytes_by_part(hlo_text: str) -> dict[str, dict[str, int]]:
    """{part: {"forward": bytes, "backward": bytes}} of a compiled program's kernels (its
    `compiled.as_text()`), parts in PARTS order, those with no traffic left out."""
    computations, entry = _parse(hlo_text)
    traffic: dict[tuple[str, str], int] = collections.Counter()

    def walk(name: str, times: int, seen: tuple[str, ...]) -> None:
        instructions = computations.get(name, [])
        shapes = {n: s for n, s, _, _ in instructions}
        for _, shape, opcode, rest in instructions:
            if opcode == "while":
                trips = _TRIP_COUNT.search(rest)
                body = re.search(r"body=%([\w.\-]+)", rest)
                if body and body.group(1) not in seen:
                    trip_count = int(trips.group(1)) if trips else 1
                    walk(body.group(1), times * trip_count, (*seen, body.group(1)))
                continue
            args, _, attributes = rest.partition("), ")  # operands, then attributes
            if opcode in ("call", "conditional"):  # every branch, as if each ran
                for called in _OPERAND.findall(attributes):
                    if called in computations and called not in seen:
                        walk(called, times, (*seen, called))
                continue
            if opcode in _NO_TRAFFIC:
                continue
            moved = array_bytes(shape) + sum(
                array_bytes(shapes.get(o, "")) for o in _OPERAND.findall(args)
            )
            op_name = _OP_NAME.search(rest)
            op_name = op_name.group(1) if op_name else ""
            traffic[part_of(op_name), pass_of(op_name)] += moved * times

    walk(entry, 1, (entry,))
    return {
        part: {p: int(traffic[part, p]) for p in PASSES}
        for part in PARTS
        if traffic[part, "forward"] or traffic[part, "backward"]
    }
