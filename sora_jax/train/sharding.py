"""The device mesh and the one rule that shards parameters and optimizer state.

Mesh axes: `data` (pure data parallelism) x `fsdp` (data parallelism whose parameters
and optimizer state are split across devices). Batches split over both axes.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**12  # smaller arrays are cheaper to replicate than to gather


def make_mesh(fsdp: int, devices: list | None = None) -> Mesh:
    """[data, fsdp] devices: each row of `fsdp` devices shares one copy of the parameters
    and optimizer state, and stays within one slice of a multislice run."""
    devices = list(jax.devices() if devices is None else devices)
    devices.sort(key=lambda d: getattr(d, "slice_index", 0))  # stable: slice by slice
    if len(devices) % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} does not divide the {len(devices)} devices")
    per_slice = len(devices) // len({getattr(d, "slice_index", 0) for d in devices})
    if per_slice % fsdp:
        # A group that shares parameters gathers them every step: across slices, that is
        # over the data-centre network instead of the chips' own links.
        raise ValueError(
            f"mesh.fsdp={fsdp} does not divide the {per_slice} devices of each slice: "
            f"parameters would be gathered across slices"
        )
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)  # [data, fsdp]
    return Mesh(grid, BATCH_AXES)


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension divisible by the fsdp size; replicate small arrays."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
        return P()
    candidates = [(size, axis) for axis, size in enumerate(shape) if size % fsdp == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array of a (params / optimizer / train state) tree."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def gathered(params: Any, mesh: Mesh) -> Any:
    """The parameters whole on every device for a step's compute (one all-gather each,
    which XLA overlaps with the layers before); their gradients are summed back into the
    fsdp shards.

    Left to itself, XLA:TPU may run a convolution whose weight is split along its output
    features as a windowed einsum: a loop that passes weight pieces around the ring and
    re-reads the whole activation for each piece, with outputs 8 channels wide. For
    audioset on v5p:2x2x2 (fsdp over all 8 chips) the tower's convolutions then moved
    614 GiB a step and the step was 4.4x slower (BENCHMARKS.md section 7). These models'
    parameters are about 92 MB. Holding them whole through the step costs 0.6-0.8 GiB a
    chip where XLA had not windowed (kinetics_sounds). Gathering only each conv's weight,
    at its layer, cost nothing there but left other ops windowed (also section 7).
    """
    return jax.lax.with_sharding_constraint(params, replicated(mesh))
