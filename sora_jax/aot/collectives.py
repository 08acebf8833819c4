"""What a compiled step sends between chips, and the least time that takes on the slice.

XLA:TPU's cycle estimates (traffic.cycles_by_part) carry none for collectives, so the
step time the compiler expects leaves them out. This reads them from the compiled program
instead: for each collective, the bytes one chip sends, by the textbook algorithms over a
group of n chips (a ring, or a ring in each direction, which sends the same bytes):

  all-gather           operand x (n - 1)      (each chip's piece, to every other)
  reduce-scatter       operand x (n - 1) / n
  all-reduce           operand x 2 (n - 1) / n (a reduce-scatter, then an all-gather)
  all-to-all           operand x (n - 1) / n
  collective-permute   operand

A loop's collectives count once per trip (traffic.launches). Divided by what a chip can
send over all its inter-chip links at once (half the bidirectional ICI bandwidth Google
publishes per chip), that is a lower bound on the time the step spends communicating, in
the same sense as the HBM bound: a ring along one axis of a torus uses two of a chip's
links, not all of them, so the real time can be a few times longer. Whether that time
hides behind the compute is up to XLA's scheduler, which overlaps asynchronous
collectives with the kernels around them.
"""

import collections
import math
import re
from collections.abc import Sequence

from sora_jax.aot import topology, traffic
from sora_jax.train.fit import COLLECTIVES  # the kinds a step report counts

# What one chip sends in a group of n chips, as a multiple of its operand's bytes: one
# entry for each of COLLECTIVES (tests/test_collectives.py holds the two together).
SENT = {
    "all-reduce": lambda n: 2 * (n - 1) / n,
    "all-gather": lambda n: n - 1,
    "reduce-scatter": lambda n: (n - 1) / n,
    "all-to-all": lambda n: (n - 1) / n,
    "collective-permute": lambda n: 1,
}

# How XLA writes a collective's groups of devices:
_EXPLICIT = re.compile(r"replica_groups=\{\{([\d,]*)\}")  # {{0,1,2,3},{4,5,6,7}}
_IOTA = re.compile(r"replica_groups=\[\d+,(\d+)\]<=")  # [2,4]<=[8]: 2 groups of 4
_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}")  # sizes, grouped axes
_AXIS = re.compile(r"'(\w+)'=(\d+)")


def group_size(kernel: traffic.Instruction, devices: int) -> int:
    """The chips in each of a collective's groups: from its replica groups in any of
    XLA's three spellings (explicit lists, an iota `[groups,size]<=[...]`, or mesh axes
    `mesh['axis_0'=4,'axis_1'=2] {'axis_1'}`); every chip when it names none."""
    attributes = kernel.attributes
    if found := _EXPLICIT.search(attributes):
        return max(1, len([d for d in found.group(1).split(",") if d]))
    if found := _IOTA.search(attributes):
        return int(found.group(1))
    if found := _MESH.search(attributes):
        sizes = {name: int(size) for name, size in _AXIS.findall(found.group(1))}
        grouped = re.findall(r"'(\w+)'", found.group(2))
        return math.prod(sizes.get(axis, 1) for axis in grouped)
    return devices


def kind_of(opcode: str) -> str | None:
    """The collective an opcode is (its -start counts; its -done moves nothing more)."""
    kind = opcode.removesuffix("-start")
    return kind if kind in SENT else None


def sent_bytes(program: str | Sequence[traffic.Launch], devices: int) -> dict[str, int]:
    """{collective: bytes one chip sends per step} of a compiled program (its text, or
    its traffic.launches() already read), collectives with none left out."""
    launched = traffic.launches(program) if isinstance(program, str) else program
    sent: dict[str, float] = collections.Counter()
    for launch in launched:
        kernel = launch.kernel
        kind = kind_of(kernel.opcode)
        if kind is None:
            continue
        n = group_size(kernel, devices)
        sent[kind] += launch.operand_bytes * SENT[kind](n) * launch.times
    return {kind: int(sent[kind]) for kind in COLLECTIVES if sent[kind]}


def time_bound(sent: dict[str, int], chip: topology.Chip, slices: int = 1) -> float | None:
    """The least time a chip takes to send `sent` (sent_bytes): all its links at once, one
    way (half the published bidirectional ICI bandwidth). None across several slices, where
    some collectives run on the data-centre network instead (not modelled), and for a chip
    whose ICI bandwidth is not published (v4): no bound rather than a wrong one."""
    if slices > 1 or not chip.ici_bytes_per_s:
        return None
    return sum(sent.values()) / (chip.ici_bytes_per_s / 2)
