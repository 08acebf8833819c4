"""The production configs compiled for TPU slices (BENCHMARKS.md section 7): each case is
one `sora-compile` run, and its JSON is kept whole, so every figure in that section's
tables (memory, FLOPs, HBM traffic, the compiler's expected step time and MFU, where the
bytes and cycles go) can be read back from the file.

A production step takes 5-20 minutes to compile on a 2-core machine, so runs add to the
results file instead of replacing it: each case is stored under its label (the case's
name, with --label for a variant), with the machine and date it was compiled on.

  python bench/tpu_compile.py [--cases kinetics_sounds@v5e:4x4 ...]
      [--label NAME --config.KEY=VALUE ...] [--out bench/results/tpu_compile.json]
      [--dump-hlo DIR]
"""

import json
import pathlib
import shlex
import subprocess
import sys
import time

import common

ROOT = pathlib.Path(__file__).resolve().parents[1]
# name -> (config, topology): the production configs on the two chips users pretrain on.
CASES = {
    "kinetics_sounds@v5e:4x4": ("configs/kinetics_sounds.py", "v5e:4x4"),
    "kinetics_sounds@v5p:2x2x2": ("configs/kinetics_sounds.py", "v5p:2x2x2"),
    "audioset@v5e:4x4": ("configs/audioset.py", "v5e:4x4"),
    "audioset@v5p:2x2x2": ("configs/audioset.py", "v5p:2x2x2"),
}


def compile_case(config: str, topology: str, overrides: list[str], hlo: str | None) -> dict:
    """One `sora-compile --nosearch` run -> its JSON (the last line of its stdout)."""
    command = [
        str(pathlib.Path(sys.executable).parent / "sora-compile"),
        f"--config={config}",
        f"--topology={topology}",
        "--nosearch",
        *(f"--config.{o}" for o in overrides),
    ]
    dump = [f"--dump_hlo={hlo}"] if hlo else []
    started = time.monotonic()
    done = subprocess.run(command + dump, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    command[0] = "sora-compile"
    return {"command": shlex.join(command), "wall_s": round(time.monotonic() - started), **result}


def main(argv=None) -> int:
    p = common.parser(__doc__, config=False)  # each case names its config
    p.set_defaults(out=str(common.RESULTS / "tpu_compile.json"))
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--label", default="", help="a variant's name, stored as CASE, LABEL")
    p.add_argument("--dump-hlo", default=None, help="keep each train step's HLO in this folder")
    args = p.parse_args(argv)
    if args.set and not args.label:
        p.error("--config overrides make a variant: name it with --label")
    out = pathlib.Path(args.out)
    stored = json.loads(out.read_text()) if out.exists() else {"benchmark": "tpu_compile"}
    runs = stored.setdefault("runs", {})
    table = []
    for case in args.cases:
        config, topology = CASES[case]
        label = f"{case}, {args.label}" if args.label else case
        hlo = None
        if args.dump_hlo:
            pathlib.Path(args.dump_hlo).mkdir(parents=True, exist_ok=True)
            hlo = str(pathlib.Path(args.dump_hlo, label.replace(", ", "_") + ".hlo"))
        r = compile_case(config, topology, args.set, hlo)
        runs[label] = {"machine": common.machine(), "overrides": args.set, **r}
        table.append(
            (
                label,
                f"{r['flops_per_byte']:.0f} FLOP/B (ridge {r['ridge_flops_per_byte']:.0f}), "
                f"expected {r['expected_step_time_s'] * 1e3:.1f} ms, "
                f"MFU {r['expected_mfu']:.1%}",
            )
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(stored, indent=1) + "\n")  # after each case: hours of work
    common.emit(stored, None, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
