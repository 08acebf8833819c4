"""Where a compiled step's memory traffic goes, by part of the model and by pass.

A step far below its chip's ridge point (FLOPs per byte of HBM traffic) is bound by
memory, and raising its arithmetic intensity starts with knowing which part moves the
bytes. XLA's cost analysis gives one total, `bytes accessed`, which charges every operand
of every operation wherever it lives: on a TPU, arrays that XLA keeps in a core's on-chip
memory (VMEM, memory space `S(1)` in a layout) move no HBM bytes, so that total can be
several times the HBM traffic (and a bound computed from it is no lower bound). This
reads the compiled program itself. Each kernel it launches (a fusion, a convolution, a
collective) reads its operands and writes its result; the bytes of those that live in
HBM are charged to the part of the model that the kernel's metadata names (`op_name`, the
JAX name stack: flax modules, and the trainer's `loss` and `optimizer` scopes), in the
forward or the backward pass. Also:
- an asynchronous copy, slice or collective reads at `-start` and writes at `-done`, so
  XLA's prefetches into VMEM and evictions back count once, on their HBM side ("prefetch
  and evict" when XLA gave them no name);
- a fusion that only slices an operand (itself, or in a fusion nested in it) reads the
  slices, and one whose root is a dynamic-update-slice writes its update in place (a
  scan's step writes one row);
- a loop's body counts once per trip: the trip count XLA recorded (XLA:CPU) or the bound
  of its `counter < N` condition (XLA:TPU), so the audio cell's scan counts per step.

Each kernel's bytes are the least it can move (a kernel that tiles an operand may read
it more than once), so their sum is a lower bound on the step's HBM traffic.
"""

import collections
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

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
    "prefetch and evict",
    "other",
)
PASSES = ("forward", "backward")

_ITEM_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_ITEM_BYTES) + r")\[([\d,]*)\](\{[^}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")  # in a layout; none (or 0) is the device's HBM
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_NAME = re.compile(r"^\s*(ROOT )?%(\S+) = ")
_OPERAND = re.compile(r"%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
# Instructions that launch no kernel of their own: they name, group or alias buffers, or
# hold other computations whose kernels are counted where they run.
_NO_TRAFFIC = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "partition-id", "replica-id", "opt-barrier", "while", "call", "conditional",
    "add-dependency", "domain",
}  # fmt: skip
_SLICES = ("slice", "dynamic-slice")  # a fused slice of a parameter reads only the slice
# XLA's asynchronous copies between HBM and a core's VMEM; unnamed, "prefetch and evict".
_PREFETCHES = {"copy-start", "copy-done", "slice-start", "slice-done"}


class Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    rest: str  # operands, then attributes
    root: bool

    @property
    def operands(self) -> list[str]:
        return _OPERAND.findall(self.rest.partition("), ")[0])

    @property
    def attributes(self) -> str:
        return self.rest.partition("), ")[2]

    @property
    def calls(self) -> str:
        """The computation a fusion runs, or ""."""
        called = _CALLS.search(self.attributes)
        return called.group(1) if called else ""

    @property
    def op_name(self) -> str:
        """The JAX name stack its metadata gives (flax modules, named scopes), or ""."""
        found = _OP_NAME.search(self.rest)
        return found.group(1) if found else ""


def arrays(shape: str) -> list[tuple[str, list[int]]]:
    """(dtype, dims) of every array in an HLO shape, e.g. `(f32[8,16]{1,0}, s32[])` ->
    [("f32", [8, 16]), ("s32", [])]."""
    return [
        (dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims, _ in _ARRAY.findall(shape)
    ]


def array_bytes(shape: str, hbm_only: bool = False) -> int:
    """Bytes of every array in an HLO shape, e.g. `(f32[8,16]{1,0}, s32[])` -> 516; with
    hbm_only, of those in the device's main memory (a TPU's HBM): an array whose layout
    names another memory space (`S(1)`, a TPU core's VMEM) moves no HBM bytes."""
    total = 0
    for dtype, dims, layout in _ARRAY.findall(shape):
        space = _MEMORY_SPACE.search(layout)
        if hbm_only and space and space.group(1) != "0":
            continue
        size = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
        total += size * _ITEM_BYTES[dtype]
    return total


def _tuple_elements(shape: str) -> list[str]:
    """The top-level elements of a tuple shape, e.g. `(f32[2], (s32[], u8[4]))`."""
    depth, start, elements = 0, 1, []
    for i, ch in enumerate(shape):
        depth += (ch in "({[") - (ch in ")}]")
        if (ch == "," and depth == 1) or (ch == ")" and depth == 0):
            elements.append(shape[start:i].strip())
            start = i + 1
    return elements


def _split_instruction(line: str) -> Instruction | None:
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
    return Instruction(m.group(2), shape, opcode, rest, root=bool(m.group(1)))


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """{computation: [Instruction]} and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = computations.setdefault(m.group(1), [])
            entry = m.group(1) if line.startswith("ENTRY") else entry
            continue
        if line.startswith("}"):
            current = None
        elif current is not None and (instruction := _split_instruction(line)):
            current.append(instruction)
    return computations, entry


def trip_count(loop: Instruction, computations: dict[str, list[Instruction]]) -> int:
    """How many times a while loop runs its body: the count XLA recorded (XLA:CPU), or
    the bound of a condition `counter < N` (a scan, as XLA:TPU leaves it); else 1."""
    known = _TRIP_COUNT.search(loop.rest)
    if known:
        return int(known.group(1))
    condition = re.search(r"condition=%([\w.\-]+)", loop.attributes)
    instructions = computations.get(condition.group(1), []) if condition else []
    constants = {i.name: i.rest.partition(")")[0] for i in instructions if i.opcode == "constant"}
    for i in instructions:
        if i.root and i.opcode == "compare" and "direction=LT" in i.rest:
            bound = constants.get(i.operands[-1], "")
            if bound.isdigit():
                return int(bound)
    return 1


def _sliced_bytes(
    param: str, fused: list[Instruction], computations: dict[str, list[Instruction]]
) -> int | None:
    """The bytes a fused computation reads of its parameter `param` when it only slices
    it (directly, or inside a fusion nested in it); None when it reads it whole, or when
    the parameter could not be identified (a whole read, rather than none)."""
    if not param:
        return None
    read = 0
    for user in fused:
        if param not in user.operands:
            continue
        if user.opcode in _SLICES and user.operands.index(param) == 0:
            read += array_bytes(user.shape)
        elif user.opcode == "fusion" and user.calls in computations:
            inner = computations[user.calls]
            inner_params = _parameters(inner)
            for index, operand in enumerate(user.operands):
                if operand == param:
                    sliced = _sliced_bytes(inner_params.get(index, ""), inner, computations)
                    if sliced is None:
                        return None
                    read += sliced
        else:
            return None
    return read


def _parameters(fused: list[Instruction]) -> dict[int, str]:
    return {int(i.rest.partition(")")[0]): i.name for i in fused if i.opcode == "parameter"}


def _fusion_bytes(
    kernel: Instruction,
    shapes: dict[str, str],
    fused: list[Instruction],
    computations: dict[str, list[Instruction]],
) -> int:
    """HBM bytes a fusion reads and writes. A parameter it only slices is read as the
    slices; a root dynamic-update-slice writes its update in place (a scan's step writes
    one row of its outputs, not all of them)."""
    by_name = {i.name: i for i in fused}
    root = next((i for i in fused if i.root), None)
    tuple_root = root is not None and root.opcode == "tuple"
    outputs = [by_name.get(o) for o in root.operands] if tuple_root else [root]
    elements = _tuple_elements(kernel.shape) if tuple_root else [kernel.shape]
    if len(outputs) != len(elements) or any(o is None or o.opcode == "parameter" for o in outputs):
        return _plain_bytes(kernel, shapes)  # a form not read here: every operand, whole
    written, in_place = 0, set()
    for output, element in zip(outputs, elements, strict=True):
        if output.opcode == "dynamic-update-slice":
            in_place.add(output.operands[0])
            update = array_bytes(by_name[output.operands[1]].shape)
            written += update if array_bytes(element, hbm_only=True) else 0
        else:
            written += array_bytes(element, hbm_only=True)
    params = _parameters(fused)
    read = 0
    for index, operand in enumerate(kernel.operands):
        param, in_hbm = params.get(index, ""), array_bytes(shapes.get(operand, ""), hbm_only=True)
        if param in in_place or not in_hbm:
            continue
        sliced = _sliced_bytes(param, fused, computations)
        read += in_hbm if sliced is None else min(sliced, in_hbm)
    return read + written


def kernel_bytes(
    kernel: Instruction, shapes: dict[str, str], computations: dict[str, list[Instruction]]
) -> int:
    """The HBM bytes one kernel reads and writes. An asynchronous copy, slice or collective
    reads its operands at `-start` and writes its result at `-done`: the prefetches into a
    TPU core's VMEM that XLA schedules count once, and only on the HBM side."""
    operands = [shapes.get(o, "") for o in kernel.operands]
    if kernel.opcode.endswith("-done"):
        return array_bytes(kernel.shape, hbm_only=True)
    if kernel.opcode == "slice-start":  # reads the slice, the second element of its result
        sliced = array_bytes(_tuple_elements(kernel.shape)[1])
        return sum(min(array_bytes(s, hbm_only=True), sliced) for s in operands)
    if kernel.opcode.endswith("-start"):
        return sum(array_bytes(s, hbm_only=True) for s in operands)
    if kernel.opcode == "fusion" and kernel.calls in computations:
        return _fusion_bytes(kernel, shapes, computations[kernel.calls], computations)
    return _plain_bytes(kernel, shapes)


def _plain_bytes(kernel: Instruction, shapes: dict[str, str]) -> int:
    """The HBM bytes of a kernel's result and of its operands, whole."""
    operands = sum(array_bytes(shapes.get(o, ""), hbm_only=True) for o in kernel.operands)
    return array_bytes(kernel.shape, hbm_only=True) + operands


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


class Launch(NamedTuple):
    """A kernel of a compiled program, where it is charged, and how often it runs."""

    kernel: Instruction
    part: str  # one of PARTS
    direction: str  # "forward" or "backward"
    times: int  # launches per run of the program (trips of the loops around it)
    hbm_bytes: int  # per launch (kernel_bytes)
    cycles: int  # per launch: XLA:TPU's estimate (cycles_by_part), 0 where it has none
    loop: str = ""  # the innermost while loop's body it runs in ("": none)
    operand_bytes: int = 0  # its operands, whole, in any memory (what a collective sends)


def launches(hlo_text: str) -> Iterator[Launch]:
    """Every kernel of a compiled program (its `compiled.as_text()`), once per place it
    runs: loop bodies once with their trip count, every branch of a conditional as if
    each ran."""
    computations, entry = parse(hlo_text)

    def walk(name: str, times: int, seen: tuple[str, ...], loop: str = "") -> Iterator[Launch]:
        instructions = computations.get(name, [])
        shapes = {i.name: i.shape for i in instructions}
        for kernel in instructions:
            if kernel.opcode == "while":
                body = re.search(r"body=%([\w.\-]+)", kernel.attributes)
                if body and body.group(1) not in seen:
                    trips = trip_count(kernel, computations)
                    body = body.group(1)
                    yield from walk(body, times * trips, (*seen, body), body)
                continue
            if kernel.opcode in ("call", "conditional"):
                for called in _OPERAND.findall(kernel.attributes):
                    if called in computations and called not in seen:
                        yield from walk(called, times, (*seen, called), loop)
                continue
            if kernel.opcode in _NO_TRAFFIC:
                continue
            op_name = kernel.op_name
            part = part_of(op_name)
            if part == "other" and kernel.opcode in _PREFETCHES:
                part = "prefetch and evict"  # XLA's own copies between HBM and VMEM
            moved = kernel_bytes(kernel, shapes, computations)
            estimate = _CYCLES.search(kernel.rest)
            cycles = int(estimate.group(1)) if estimate else 0
            operands = sum(array_bytes(shapes.get(o, "")) for o in kernel.operands)
            yield Launch(kernel, part, pass_of(op_name), times, moved, cycles, loop, operands)

    yield from walk(entry, 1, (entry,))


def _launched(program: str | Sequence[Launch]) -> Sequence[Launch] | Iterator[Launch]:
    return launches(program) if isinstance(program, str) else program


def bytes_by_part(program: str | Sequence[Launch]) -> dict[str, dict[str, int]]:
    """{part: {"forward": bytes, "backward": bytes}} of a compiled program's HBM traffic
    (its text, or its launches() already read), parts in PARTS order, those with no
    traffic left out."""
    traffic: dict[tuple[str, str], int] = collections.Counter()
    for launch in _launched(program):
        traffic[launch.part, launch.direction] += launch.hbm_bytes * launch.times
    return {
        part: {p: int(traffic[part, p]) for p in PASSES}
        for part in PARTS
        if traffic[part, "forward"] or traffic[part, "backward"]
    }


def cycles_by_part(program: str | Sequence[Launch]) -> dict[str, int]:
    """{part: cycles} of XLA:TPU's own estimate of each kernel's run time: the
    `estimated_cycles` its cost model writes into a kernel's backend config, times the
    kernel's launches. Where the bytes go is not where the time goes: a scan of small
    matmuls moves few bytes but runs one step after another. The field is undocumented and
    missing on asynchronous copies and collectives, so read shares, not a step time. Empty
    for a program without it (XLA:CPU's)."""
    cycles: dict[str, int] = collections.Counter()
    for launch in _launched(program):
        cycles[launch.part] += launch.cycles * launch.times
    return {part: cycles[part] for part in PARTS if cycles[part]}
