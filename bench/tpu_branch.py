"""One branch of a production model (the audio branch or the visual tower) compiled alone
for one TPU chip, forward and backward at the config's clips per chip: XLA:TPU's expected
time for it in a few minutes, where the whole step takes 10-35 (bench/tpu_compile.py).
For trying a change to one branch, and for seeing where its time goes: each layer's
expected time and HBM bytes per pass, and each while loop's kernels per trip.

The figures are the compiler's (aot/traffic.py), as sora-compile's: estimated cycles at
the chip's clock, the program's FLOPs at the published peak. The branch is the model's own
module, built from the config, applied as at evaluation (no SpecAugment); the loss is a
plain sum of squares of its outputs.

  python bench/tpu_branch.py [--config configs/kinetics_sounds.py] [--topology v5e:4x4]
      [--branches audio visual] [--label NAME --config.KEY=VALUE ...]
      [--out bench/results/tpu_branch.json]
"""

import collections
import json
import pathlib
import statistics
import time

import common
import jax
import jax.numpy as jnp

from sora_jax import config as config_lib
from sora_jax.aot import loop_flops, mosaic, topology, traffic
from sora_jax.inputs import InputSpec
from sora_jax.kernels import platform
from sora_jax.models import build_model

BRANCHES = ("audio", "visual")


def branch_loss(model, branch: str, spec: InputSpec, batch: int):
    """(loss(params, inputs), params shapes, inputs shapes) of one branch at `batch` clips."""
    module = getattr(model, branch)
    if branch == "audio":  # waveform [B, A] float in [-1, 1], valid samples [B]
        inputs = (jnp.zeros((batch, spec.audio_samples)), jnp.full((batch,), spec.audio_samples))
    else:  # frames [B, T, S, S, 3] uint8, frame mask [B, T]
        T, S = spec.num_frames, spec.crop_size
        inputs = (jnp.zeros((batch, T, S, S, 3), jnp.uint8), jnp.ones((batch, T), bool))
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))

    def loss(params, *inputs):
        pooled, steps = module.apply(params, *inputs)[:2]
        return sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in (pooled, steps))

    return loss, params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)


def layer_of(launch: traffic.Launch) -> str:
    """A kernel's layer: the first two module scopes its op_name names inside the branch,
    e.g. "stage0_block1/conv_a" (the transformations' scopes, "jvp(...)", left out)."""
    scopes = [s for s in launch.kernel.op_name.split("/") if "(" not in s]
    return "/".join(scopes[:2]) or "(unnamed)"


def layers(launched: list[traffic.Launch], clock_hz: float) -> list[dict]:
    """Expected time and HBM bytes per layer and pass, the costliest first: which layer to
    change, before compiling the whole step."""
    cycles, hbm = collections.Counter(), collections.Counter()
    for launch in launched:
        key = (layer_of(launch), launch.direction)
        cycles[key] += launch.cycles * launch.times
        hbm[key] += launch.hbm_bytes * launch.times
    return [
        {"layer": layer, "pass": pass_, "expected_s": c / clock_hz, "hbm_bytes": hbm[layer, pass_]}
        for (layer, pass_), c in cycles.most_common()
    ]


def loops(launched: list[traffic.Launch], clock_hz: float) -> list[dict]:
    """Each while loop's kernels per trip (cycles and HBM bytes), the costliest first."""
    by_loop = collections.defaultdict(list)
    for launch in launched:
        if launch.loop:
            by_loop[launch.loop].append(launch)
    rows = []
    for kernels in by_loop.values():
        cycles = [k.cycles for k in kernels if k.cycles]
        trips = max(k.times for k in kernels)
        rows.append(
            {
                "trips": trips,
                "kernels_per_trip": len(kernels),
                "cycles_per_trip": sum(cycles),
                "median_kernel_cycles": statistics.median(cycles) if cycles else 0,
                "hbm_bytes_per_trip": sum(k.hbm_bytes for k in kernels),
                "kernels_moving_no_hbm_bytes": sum(k.hbm_bytes == 0 for k in kernels),
                "expected_s": sum(k.cycles * k.times for k in kernels) / clock_hz,
                "pass": kernels[0].direction,
            }
        )
    return sorted(rows, key=lambda r: -r["expected_s"])


def compile_branch(config, topology_name: str, devices: list, branch: str) -> dict:
    """One branch's forward and backward on one chip of the slice (its `devices`) -> its
    figures."""
    chip, _ = topology.parse(topology_name)
    batch = config.batch_size // config.accum_steps // len(devices)  # as the step shards it
    model = build_model(config.model)
    loss, params, inputs = branch_loss(model, branch, InputSpec.from_config(config), batch)
    one_chip = jax.sharding.SingleDeviceSharding(devices[0])
    started = time.monotonic()
    with platform.targeting("tpu"):  # XLA's kernels, not the CPU's oneDNN calls
        lowered = jax.jit(jax.grad(loss), in_shardings=one_chip, out_shardings=one_chip).lower(
            params, *inputs
        )
    compiled = lowered.compile()
    compile_s = time.monotonic() - started
    text = compiled.as_text()
    launched = list(traffic.launches(text))
    cost = compiled.cost_analysis()
    flops = float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    flops += loop_flops.repeated_flops(text, launched)  # the trips XLA's count leaves out
    launched = mosaic.with_pallas_cycles(launched, devices[0].device_kind)
    cycles = sum(k.cycles * k.times for k in launched)
    hbm = sum(k.hbm_bytes * k.times for k in launched)
    expected_s = cycles / chip.clock_hz
    return {
        "clips_per_chip": batch,
        "flops": flops,
        "hbm_bytes": hbm,
        "flops_per_byte": flops / max(hbm, 1),
        "estimated_cycles": cycles,
        "expected_s": expected_s,
        "expected_mfu": flops / chip.peak_flops / expected_s if expected_s else None,
        "loops": loops(launched, chip.clock_hz),
        "layers": layers(launched, chip.clock_hz),
        "compile_s": round(compile_s, 1),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.set_defaults(config="configs/kinetics_sounds.py", out=str(common.RESULTS / "tpu_branch.json"))
    p.add_argument("--topology", default="v5e:4x4")
    p.add_argument("--branches", nargs="+", default=list(BRANCHES), choices=BRANCHES)
    p.add_argument("--label", default="", help="a variant's name, stored as BRANCH..., LABEL")
    args = p.parse_args(argv)
    if args.set and not args.label:
        p.error("--config overrides make a variant: name it with --label")
    config = common.load_config(args.config, args.set)
    # A bad override, or a batch the slice cannot split, fails here, naming its key.
    devices = topology.tpu_devices(args.topology)
    config_lib.validate(config, len(devices))
    out = pathlib.Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {"benchmark": "tpu_branch"}
    runs = stored.setdefault("runs", {})  # runs add to the file, as tpu_compile.py's
    table = []
    for branch in args.branches:
        r = compile_branch(config, args.topology, devices, branch)
        label = f"{branch} of {args.config}@{args.topology}"
        label += f", {args.label}" if args.label else ""
        runs[label] = {"machine": common.machine(), "overrides": args.set, **r}
        table.append(
            (
                label,
                f"expected {r['expected_s'] * 1e3:.1f} ms, MFU {r['expected_mfu']:.1%}, "
                f"{r['flops_per_byte']:.0f} FLOP/B, {len(r['loops'])} loops",
            )
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stored, indent=1) + "\n")
    common.emit(stored, None, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
