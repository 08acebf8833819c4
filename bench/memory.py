"""Peak memory of training steps, with and without rematerialisation of the visual
stages (config model.visual.remat): host RSS always, device memory where the device
reports it (GPU, TPU). Each variant runs in a fresh process so peaks do not mix.

  python bench/memory.py [--steps 3]
"""

import json
import pathlib
import resource
import subprocess
import sys

import common
import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_one(config_path: str, overrides: list[str], steps: int) -> dict:
    """In this (child) process: run `steps` train steps, report peaks."""
    from train_step import measure

    config = common.load_config(config_path, overrides)
    timing = measure(config, steps=steps, warmup=1, count_flops=False)
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "peak_host_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_mb": stats.get("peak_bytes_in_use", 0) / 2**20 or None,
        "step_ms": timing["step_ms"],
        "batch": config.batch_size,
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", action="store_true", help="internal: measure one variant")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_one(args.config, args.set, args.steps)))
        return 0
    variants = {}
    for remat in (False, True):
        done = subprocess.run(
            [
                sys.executable,
                str(pathlib.Path(__file__).resolve()),
                "--child",
                "--config",
                args.config,
                "--steps",
                str(args.steps),
                *(f"--config.{s}" for s in args.set),
                f"--config.model.visual.remat={remat}",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        variants["remat" if remat else "no_remat"] = json.loads(done.stdout.splitlines()[-1])
    for v in variants.values():
        v["peak_host_rss_mb_per_clip"] = v["peak_host_rss_mb"] / v["batch"]
        if v["peak_device_mb"]:
            v["peak_device_mb_per_clip"] = v["peak_device_mb"] / v["batch"]
    result = {
        "benchmark": "memory",
        "config": args.config,
        "overrides": args.set,
        **variants,
        **common.machine(),
    }
    table = [
        (
            name,
            f"host peak {v['peak_host_rss_mb']:.0f} MB, "
            + (f"device peak {v['peak_device_mb']:.0f} MB, " if v["peak_device_mb"] else "")
            + f"step {v['step_ms']:.0f} ms",
        )
        for name, v in variants.items()
    ]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
