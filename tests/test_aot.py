"""sora-compile: the run's train and eval steps compiled for TPU slices that are not
attached (libtpu compiles them here; nothing runs on a TPU)."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from configs import demo
from sora_jax.aot import analysis, topology, traffic
from sora_jax.kernels import onednn
from sora_jax.train import fit, setup, sharding
from sora_jax.train import step as step_lib
from tests.conftest import ONE_DEVICE, needs_libtpu  # the topology parser's tests need none

ROOT = pathlib.Path(__file__).resolve().parents[1]
OWN_KERNELS = ("SoraConv", "SoraLstm")  # this project's CPU custom calls (kernels/onednn.py)


@needs_libtpu
@pytest.mark.slow
def test_sora_compile_prints_the_contract_for_a_tpu_slice(tmp_path):
    done = subprocess.run(
        [
            pathlib.Path(sys.executable).parent / "sora-compile",
            "--config=configs/demo.py:runlocal",
            "--topology=v5e:2x2",
            "--config.mesh.fsdp=2",
            "--max_compiles=1",
            f"--dump_hlo={tmp_path / 'train_step.hlo'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_LOG_COMPILES="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["topology"], result["devices"], result["chip"]) == ("v5e:2x2", 4, "v5e")
    assert result["fits"] is True and result["device_memory_bytes"] == 16 * 2**30
    b = result["bytes_per_device"]
    assert set(b) == {"params", "opt_state", "batch", "temp", "total"}
    assert b["total"] >= b["params"] + b["opt_state"] + b["batch"] > 0
    peak = max(b["total"], result["eval_bytes_per_device"]["total"])
    assert result["margin_bytes"] == 16 * 2**30 - peak
    assert result["flops_per_step"] > 0 and result["step_time_bound_s"] > 0
    # Four chips, two data-parallel groups of two: gradients are summed across chips.
    collectives = result["collectives"]
    assert collectives.get("all-reduce", 0) + collectives.get("reduce-scatter", 0) > 0
    # What each chip sends in them (aot/collectives.py): at least its shard of the
    # float32 gradients. The least time that takes is at the chip's ICI bandwidth one way.
    sent = result["collective_bytes_per_step"]
    assert sent.get("all-reduce", 0) + sent.get("reduce-scatter", 0) >= b["params"] > 0
    ici = result["chip_figures"]["ici_bidirectional_bytes_per_s"]
    assert result["collective_time_bound_s"] == sum(sent.values()) / (ici / 2) > 0
    # Neither program calls this project's CPU kernels: they are chosen by the devices a
    # program is compiled for, not by this CPU host (kernels/platform.py).
    assert not [t for t in result["custom_calls"] if t.startswith(OWN_KERNELS)]
    # Where the train step's HBM traffic goes, by part of the model and pass, and the
    # trainer's loss and optimizer scopes (aot/traffic.py). A program this small keeps
    # most arrays in the cores' VMEM, so its HBM bytes are mostly XLA's prefetches and
    # far fewer than the compiler's `bytes accessed`, which charges every operand.
    moved = result["bytes_by_part"]
    assert {"visual convolutions", "audio", "loss", "optimizer", "prefetch and evict"} <= set(moved)
    assert moved["optimizer"]["backward"] == 0  # the update is not differentiated
    hbm = sum(p["forward"] + p["backward"] for p in moved.values())
    assert result["hbm_bytes_per_step"] == hbm
    hlo = (tmp_path / "train_step.hlo").read_text()  # the program those bytes were read from
    assert hlo.startswith("HloModule jit_train_step") and "S(1)" in hlo
    assert 0 < hbm < result["bytes_accessed_per_step"] / 4
    # XLA:TPU's own cycle estimates, by part: the convolutions are there.
    assert result["estimated_cycles_by_part"]["visual convolutions"] > 0
    chip = result["chip_figures"]
    assert result["step_time_bound_s"] == max(
        result["flops_per_step"] / chip["peak_bf16_flops_per_s"], hbm / chip["hbm_bytes_per_s"]
    )
    # What the compiler expects: its kernels' cycles at the chip's clock. Not faster than
    # the chip's peak allows, and the utilisation it leaves is a share of that peak.
    cycles = sum(result["estimated_cycles_by_part"].values())
    at_peak = result["flops_per_step"] / chip["peak_bf16_flops_per_s"]
    assert result["expected_step_time_s"] == cycles / chip["clock_hz"]
    assert result["expected_step_time_s"] == pytest.approx(at_peak / result["expected_mfu"])
    assert 0 < result["expected_mfu"] <= 1 and result["remat"] is False
    # One compile for the search, at twice the batch: it fits, so the answer is a lower bound.
    assert result["largest_fitting_batch"] == {"batch_size": 16, "exact": False, "compiles": 1}
    # Each step compiled once (the train step once more, for the search's batch).
    compiled = re.findall(r"Compiling (jit\(\w+\))", done.stderr)
    assert compiled.count("jit(train_step)") == 2 and compiled.count("jit(eval_step)") == 1
    assert "libtpu" not in done.stderr and "TPU_" not in done.stderr  # its start-up is quiet


@pytest.mark.slow  # the control of the test above
@pytest.mark.skipif(
    not onednn.available(), reason=f"no oneDNN kernels: {onednn.unavailable_reason()}"
)
@needs_libtpu
def test_the_same_program_compiled_for_this_cpu_calls_the_cpu_kernels():
    """What the command's check above rules out for TPU programs does happen on the CPU,
    so that check can fail."""
    on_cpu = analysis.compile_run(demo.get_config("runlocal"), ONE_DEVICE)
    assert "SoraLstmForward" in on_cpu.train.custom_calls, on_cpu.train.custom_calls


@needs_libtpu
def test_parameter_and_optimizer_bytes_per_chip_shrink_with_fsdp():
    devices = topology.tpu_devices("v5e:4x4")
    assert len(devices) == 16
    per_chip = {}
    for fsdp in (1, 4, 16):
        config = demo.get_config("runlocal")
        config.batch_size = config.data.eval_batch_size = 16
        config.mesh.fsdp = fsdp
        config.model.update(embed_dim=128)
        config.model.visual.widths, config.model.audio.hidden = (64, 128), 128
        state = setup.build(config, devices).abstract_state
        per_chip[fsdp] = analysis.shard_bytes((state.params, state.opt_state, state.ema_params))
    # Each large array is split fsdp ways; the small ones (under sharding.MIN_SHARDED_SIZE)
    # stay whole on every chip.
    assert per_chip[4] < 0.3 * per_chip[1] and per_chip[16] < 0.4 * per_chip[4], per_chip


@needs_libtpu
@pytest.mark.parametrize(("name", "slices", "chips"), [("v4:2x2x2", 1, 8), ("v5e:2x2", 2, 8)])
def test_a_slice_has_one_device_per_chip(name, slices, chips):
    """Every figure is per chip. A v4 chip's two TensorCores are one device (megacore), as
    JAX drives them on a real v4; libtpu's compile-only v4 topology has one per core
    unless asked."""
    devices = topology.tpu_devices(name, slices)
    assert len(devices) == chips and {d.core_on_chip for d in devices} == {0}
    assert len({(getattr(d, "slice_index", 0), *d.coords) for d in devices}) == chips


@needs_libtpu
def test_parameters_are_shared_within_a_slice_not_across_slices():
    devices = topology.tpu_devices("v5e:2x2", slices=2)
    mesh = sharding.make_mesh(4, devices[::-1])  # in any order
    for row in mesh.devices:  # [data, fsdp]
        assert len({d.slice_index for d in row}) == 1
    with pytest.raises(ValueError, match=r"mesh\.fsdp=8 does not divide the 4 devices of each"):
        sharding.make_mesh(8, devices)


@needs_libtpu
@pytest.mark.slow  # four TPU compiles
@pytest.mark.parametrize("name", ["v4:2x2x1", "v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_each_clock_puts_the_compilers_large_matmul_just_under_the_published_peak(name):
    """The clock that turns XLA:TPU's cycles into an expected time (topology.Chip.clock_hz)
    is the compiler's own: a [32768]^3 bfloat16 matmul, which keeps the MXUs busy, is
    expected to take at least its FLOPs at the published peak, and at most 6% more."""
    chip, _ = topology.parse(name)
    on_chip = jax.sharding.SingleDeviceSharding(topology.tpu_devices(name)[0])
    square = jax.ShapeDtypeStruct((32768, 32768), jax.numpy.bfloat16, sharding=on_chip)
    compiled = jax.jit(jax.numpy.matmul).lower(square, square).compile()
    cycles = sum(launch.cycles * launch.times for launch in traffic.launches(compiled.as_text()))
    at_peak = 2 * 32768**3 / chip.peak_flops
    assert 1.0 <= cycles / chip.clock_hz / at_peak <= 1.06, (cycles, chip.clock_hz)


@needs_libtpu
def test_a_slice_libtpu_was_seen_to_crash_on_is_warned_of():
    v6e, v5e = topology.CHIPS["v6e"], topology.CHIPS["v5e"]
    crashes = importlib.metadata.version("libtpu").startswith("0.0.42.")
    assert bool(topology.known_crash(v6e, 8)) == crashes
    assert topology.known_crash(v6e, 4) is None and topology.known_crash(v5e, 256) is None


def test_an_unknown_topology_is_named():
    with pytest.raises(ValueError, match="v9:4x4"):
        topology.parse("v9:4x4")


@needs_libtpu
@pytest.mark.slow  # two TPU compiles
def test_fsdp_over_every_chip_gathers_the_weights_instead_of_windowing_the_convs(monkeypatch):
    """With fsdp over all of a slice's chips (one data row), XLA:TPU would run each conv
    whose weight is split along its output features as a windowed einsum: weight pieces
    passed around the ring (collective-permutes) in a loop that re-reads the activations
    for each piece. For audioset on v5p:2x2x2 that was a step 4.4x slower than with the
    weights gathered (BENCHMARKS.md section 7). The train step gathers them."""
    config = demo.get_config("runlocal")
    config.mesh.fsdp, config.batch_size = 8, 32  # 4 clips a chip: enough for XLA to window
    config.model.visual.widths = (64, 128)  # weights large enough to be split (MIN_SHARDED_SIZE)
    devices = topology.tpu_devices("v5p:2x2x2")

    def collectives() -> dict[str, int]:
        run = analysis.abstract_run(config, devices)
        state = run.built.abstract_state
        return fit.compile_step(run.train_step, state, run.train_batch)[1].collectives

    gathered = collectives()
    assert "collective-permute" not in gathered and gathered.get("all-gather", 0) > 0, gathered
    # The control: without the gather, the same program windows its convolutions.
    monkeypatch.setattr(step_lib, "gathered", lambda params, mesh: params)
    assert collectives().get("collective-permute", 0) > 0


@needs_libtpu
def test_the_lstm_loops_compile_as_pallas_kernels_and_their_cycles_are_counted():
    """On a TPU, `auto` runs each LSTM loop as one Pallas kernel (kernels/pallas_lstm.py).
    XLA's cost model writes no cycles for such a kernel; aot/mosaic.py counts them with
    libtpu's static profile, and never below the kernel's own HBM traffic. At these shapes
    the compiler expects the two kernels to take less than the scan's chain of kernels."""
    from sora_jax.aot import mosaic
    from sora_jax.kernels import platform
    from sora_jax.models import lstm

    chip, _ = topology.parse("v5e:2x2")
    on_chip = jax.sharding.SingleDeviceSharding(topology.tpu_devices("v5e:2x2")[0])
    bf16 = jax.numpy.bfloat16
    gates = jax.ShapeDtypeStruct((64, 8, 4 * 128), bf16, sharding=on_chip)  # [T, B, 4H]
    w_h = jax.ShapeDtypeStruct((128, 4 * 128), jax.numpy.float32, sharding=on_chip)

    def launched(backend):
        loss = lambda g, w: lstm.lstm_sequence(g, w, bf16, 4, backend).sum()
        with platform.targeting("tpu"):
            compiled = jax.jit(jax.grad(loss, (0, 1))).lower(gates, w_h).compile()
        return list(traffic.launches(compiled.as_text())), compiled

    scan, _ = launched("xla")
    kernels, compiled = launched("auto")
    pallas = [k for k in kernels if "tpu_custom_call" in k.kernel.rest]
    assert len(pallas) == 2 and all(k.cycles == 0 for k in pallas)  # forward, backward
    counted = mosaic.with_pallas_cycles(kernels, "TPU v5 lite")
    for k in counted:
        if "tpu_custom_call" in k.kernel.rest:
            assert k.cycles > 0 and k.cycles >= k.hbm_bytes / chip.hbm_bytes_per_s * chip.clock_hz
    total = lambda ks: sum(k.cycles * k.times for k in ks)
    assert total(counted) < total(scan), (total(counted), total(scan))
    # XLA's cost analysis counts the recurrent products the kernels do (their cost_estimate).
    assert compiled.cost_analysis()["flops"] >= 2 * 2 * 64 * 8 * 128 * 4 * 128


@needs_libtpu
def test_pallas_kernels_on_a_v4_count_their_traffic_and_say_so():
    """libtpu's profile has no DMA model for v4: the kernels' cycles are their HBM bytes at
    the chip's bandwidth, a floor, and the reader is told."""
    from sora_jax.aot import mosaic
    from sora_jax.kernels import platform
    from sora_jax.models import lstm

    chip, _ = topology.parse("v4:2x2x1")
    on_chip = jax.sharding.SingleDeviceSharding(topology.tpu_devices("v4:2x2x1")[0])
    gates = jax.ShapeDtypeStruct((4096, 32, 4 * 128), jax.numpy.bfloat16, sharding=on_chip)
    w_h = jax.ShapeDtypeStruct((128, 4 * 128), jax.numpy.float32, sharding=on_chip)
    loss = lambda g, w: lstm.lstm_sequence(g, w, jax.numpy.bfloat16, 4, "pallas").sum()
    with platform.targeting("tpu"):
        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(gates, w_h).compile()
    with pytest.warns(UserWarning, match="cannot profile Pallas kernels for TPU v4"):
        counted = mosaic.with_pallas_cycles(list(traffic.launches(compiled.as_text())), "TPU v4")
    pallas = [k for k in counted if "tpu_custom_call" in k.kernel.rest]
    assert len(pallas) == 2
    for k in pallas:
        assert k.hbm_bytes > 0  # arrays this large live in HBM, not in v4's 128 MiB of CMEM
        assert k.cycles == round(k.hbm_bytes / chip.hbm_bytes_per_s * chip.clock_hz)
