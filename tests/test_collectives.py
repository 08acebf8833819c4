"""aot/collectives.py: the bytes a compiled program's collectives send from each chip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from sora_jax.aot import collectives, topology, traffic
from sora_jax.train import fit

KiB = 1024


@pytest.fixture(scope="module")
def mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))


def _compiled_text(fn, mesh: Mesh, x: jax.Array) -> str:
    spec = P(("data", "fsdp"))
    return (
        jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec))
        .lower(x)
        .compile()
        .as_text()
    )


def test_each_collective_sends_what_its_ring_algorithm_sends(mesh):
    def every_kind(x):  # x: [1024] float32 on each of the 8 devices, 4 KiB
        gathered = jax.lax.all_gather(x, "fsdp")  # groups of 4
        summed = jax.lax.psum(x, "fsdp")
        scattered = jax.lax.psum_scatter(x, "data", tiled=True)  # groups of 2
        shifted = jax.lax.ppermute(x, "fsdp", [(i, (i + 1) % 4) for i in range(4)])
        swapped = jax.lax.all_to_all(x.reshape(4, 256), "fsdp", 0, 0)
        total = gathered.sum() + summed.sum() + scattered.sum() + shifted.sum() + swapped.sum()
        return total[None]

    text = _compiled_text(every_kind, mesh, jnp.zeros(8 * 1024, jnp.float32))
    assert collectives.sent_bytes(text, devices=8) == {
        "all-gather": 4 * KiB * 3,  # its piece to each of the 3 others
        "reduce-scatter": 4 * KiB // 2,  # half of its operand, to its one partner
        "all-reduce": 2 * 4 * KiB * 3 // 4,  # a reduce-scatter, then an all-gather
        "all-to-all": 4 * KiB * 3 // 4,  # all but its own quarter
        "collective-permute": 4 * KiB,
    }


def test_every_collective_a_step_report_counts_has_its_bytes():
    assert list(collectives.SENT) == list(fit.COLLECTIVES)


def test_a_collective_in_a_loop_counts_once_per_trip(mesh):
    def summed_five_times(x):  # x: [256] float32, 1 KiB
        def body(carry, _):
            return carry + jax.lax.psum(carry, "fsdp"), None

        return jax.lax.scan(body, x, None, length=5)[0]

    text = _compiled_text(summed_five_times, mesh, jnp.zeros(8 * 256, jnp.float32))
    assert "while" in text  # the loop is kept, not unrolled
    assert collectives.sent_bytes(text, devices=8) == {"all-reduce": 5 * 2 * KiB * 3 // 4}


def _instruction(line: str) -> traffic.Instruction:
    (launch,) = traffic.launches(
        f"ENTRY %main (p: f32[8]) -> f32[8] {{\n  %p = f32[8]{{0}} parameter(0)\n  ROOT {line}\n}}"
    )
    return launch.kernel


@pytest.mark.parametrize(
    ("groups", "size"),
    [
        ("replica_groups={{0,1,2,3},{4,5,6,7}}", 4),  # XLA:CPU's explicit lists
        ("replica_groups=[4,4]<=[16]", 4),  # an iota: 4 groups of 4
        # XLA:TPU's mesh axes, as compiled for v5e:4x4 and v5p:2x2x2 (the grouped axes
        # multiply; the device order does not change a group's size)
        (
            "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=4], "
            "device_ids=([4,4]T(1,0)) {'axis_0'}",
            4,
        ),
        ("replica_groups=mesh['axis_0'=1,'axis_1'=16,'axis_2'=1] {'axis_0','axis_1'}", 16),
        ("replica_groups=mesh['axis_0'=1,'axis_1'=8] {'axis_1'}", 8),
        ("replica_groups={}", 16),  # none named: every chip
    ],
)
def test_a_groups_size_is_read_from_each_spelling_xla_uses(groups, size):
    kernel = _instruction(f"%r = f32[8]{{0}} all-reduce(%p), channel_id=1, {groups}, to_apply=%add")
    assert collectives.group_size(kernel, devices=16) == size


@pytest.mark.parametrize(
    ("chip", "slices", "bound"),
    [
        ("v5e", 1, 3e9 / 200e9),  # 400 GB/s both ways
        ("v5p", 1, 3e9 / 600e9),
        ("v6e", 1, 3e9 / 400e9),
        ("v5e", 2, None),
        ("v4", 1, None),
    ],
)
def test_the_time_bound_is_the_ici_one_way_within_one_slice(chip, slices, bound):
    """Across slices some collectives run on the data-centre network, and v4's page gives
    no ICI bandwidth: no bound then, rather than a wrong one."""
    sent = {"all-reduce": 2 * 10**9, "all-gather": 10**9}
    found = collectives.time_bound(sent, topology.CHIPS[chip], slices)
    assert found == (pytest.approx(bound) if bound else None)
