"""The kill drill: SIGKILL a training run at random moments (starting up, compiling,
stepping, writing a checkpoint), again and again, rerunning the same command each time,
then let it finish. What a user depends on is then checked against an uninterrupted run
of the same command, and the figures printed as JSON (last line):

- the losses of every step equal the uninterrupted run's, each step logged once;
- no process outlives its trainer (grain's decoding workers die with it);
- nothing stale is left in the work dir (orbax temporaries, partial metric files,
  checkpoints set aside as corrupt), and every checkpoint's digests still verify;
- then the newest checkpoint loses its digests and has bytes flipped: the same command
  resumes from the sealed one before it, sets it aside untouched and never seals it;
- the work dir's lock never outlives a killed owner (each rerun starts).

  python bench/kill_drill.py [--kills 12] [--seed 0] [--data-dir data/prepared --name sora_demo]

Needs a prepared dataset (`make demo-data` makes the default one).
"""

import argparse
import contextlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from sora_jax import process as sora_process

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(workdir: pathlib.Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sora_jax.train.cli",
        "--config",
        "configs/demo.py:runlocal",
        "--workdir",
        str(workdir),
        f"--config.data.dir={args.data_dir}",
        f"--config.data.name={args.name}",
        "--config.data.workers=2",  # decoding processes that must die with the trainer
        f"--config.total_steps={args.steps}",
        "--config.log_every=2",
        "--config.checkpoint.every_steps=5",
    ]


def _losses(workdir: pathlib.Path) -> tuple[dict[int, float], list[int]]:
    """(step -> loss, every step in the order logged) from metrics.jsonl."""
    path = workdir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a kill
            rows.append(json.loads(line))
    return {r["step"]: r["loss"] for r in rows}, [r["step"] for r in rows]


def _start(command: list[str], env: dict, log: pathlib.Path) -> subprocess.Popen:
    """The run, its output appended to `log` (a pipe nobody reads would fill and stall it)."""
    with log.open("a") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out)
    process.log = log
    return process


def _wait(done, process: subprocess.Popen, watch=lambda: None, timeout: float = 600) -> bool:
    """Poll until `done()` (True), or the process ends first (False)."""
    deadline = time.time() + timeout
    while not done():
        if process.poll() is not None:
            if process.returncode != 0:
                sys.exit(f"a run failed:\n{process.log.read_text()[-3000:]}")
            return False
        if time.time() > deadline:
            sys.exit("timed out waiting for the run")
        watch()
        time.sleep(0.05)
    return True


def _children(pid: int) -> set[int]:
    found = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stale(workdir: pathlib.Path) -> list[str]:
    """Leftovers: temporaries, partial files, checkpoints set aside as corrupt. (A kill
    between orbax finishing a checkpoint and its digests leaves it unverified: set aside
    under unverified_checkpoints/ on resume, which the result counts apart.)"""
    names = [str(p.relative_to(workdir)) for p in workdir.rglob("*")]
    return sorted(
        n
        for n in names
        if ("tmp" in n or n.endswith(".partial") or "corrupt_checkpoints" in n)
        and not n.startswith("unverified_checkpoints")
    )


def _flip_bytes(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _digestless_corruption(workdir, args, env, expected) -> dict:
    """The newest checkpoint's digests deleted and its bytes flipped, then the same command
    again: it must resume from the sealed checkpoint before it, set the unverified one
    aside untouched (never sealing it), and give the same losses."""
    from sora_jax.train import checkpoint

    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    last = workdir / "checkpoints" / str(steps[-1])
    (last / checkpoint.DIGESTS).unlink()
    largest = max((p for p in last.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    _flip_bytes(largest)
    flipped = largest.read_bytes()
    # The same command again: the finished run's last checkpoint passed over, it trains the
    # steps after the sealed one before it again (with the same schedule: a longer
    # total_steps would stretch the learning rate's, and change those steps' losses).
    done = subprocess.run(
        _command(workdir, args), cwd=ROOT, env=env, capture_output=True, text=True
    )
    aside = workdir / "unverified_checkpoints" / str(steps[-1])
    got, _ = _losses(workdir)
    return {
        "corrupted_step": steps[-1],
        "rerun_ok": done.returncode == 0,
        "resumed_from_before_it": f"resumed from step {steps[-2]}" in done.stderr,
        "set_aside_untouched": (aside / largest.relative_to(last)).read_bytes() == flipped,
        "never_sealed": not (aside / checkpoint.DIGESTS).exists(),
        "same_losses": all(abs(got[s] - expected[s]) <= 1e-6 * abs(expected[s]) for s in expected),
    }


def _run_and_kill(
    command: list[str], env: dict, workdir: pathlib.Path, rng: random.Random, startup_s: float
) -> dict | None:
    """Start the run, SIGKILL it at a random moment, and count the processes it leaves
    (None: the run finished before its moment came)."""
    reached = max(_losses(workdir)[0], default=0)
    process = _start(command, env, workdir.parent / "log.txt")
    children: set[int] = set()
    watch = lambda: children.update(_children(process.pid))
    begun = time.time()
    if rng.random() < 0.3:  # a time within the start-up of a fresh run
        after = rng.uniform(0.3, startup_s)
        running = _wait(lambda: time.time() >= begun + after, process, watch)
        moment = f"{after:.1f} s after its start"
    else:  # a few steps further on: stepping, logging or writing a checkpoint
        target = reached + rng.randint(1, 4)
        running = _wait(lambda: max(_losses(workdir)[0], default=0) >= target, process, watch)
        time.sleep(rng.uniform(0.0, 0.3))
        moment = f"step {target} + {time.time() - begun:.1f} s"
    if not running:
        return None  # it finished first
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2.0)  # a worker notices its parent's death within half a second
    left = [pid for pid in children if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    logged = max(_losses(workdir)[0], default=0)
    return {"moment": moment, "logged_step": logged, "orphans": len(left)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=12)
    p.add_argument("--steps", type=int, default=300, help="total_steps of the run")
    p.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    p.add_argument("--data-dir", default=str(ROOT / "data/prepared"))
    p.add_argument("--name", default="sora_demo")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)
    sora_process.configure()  # this process only reads checkpoints at the end: quietly, on the CPU
    rng = random.Random(args.seed)
    start = time.time()
    root = pathlib.Path(tempfile.mkdtemp(prefix="sora_kill_drill_"))
    # One compilation cache for all the runs: each restart then costs seconds, not a
    # compile (the cache changes no result, see tests/conftest.py).
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"))
    # The uninterrupted run, timed to its first logged step: its start-up (imports, data
    # checks, compiles from the cache, decoding workers) is one window for kills.
    begun = time.time()
    reference = _start(_command(root / "reference", args), env, root / "reference_log.txt")
    if not _wait(lambda: _losses(root / "reference")[0], reference):
        sys.exit("the uninterrupted run logged nothing")
    startup_s = time.time() - begun
    if reference.wait() != 0:
        sys.exit(f"the uninterrupted run failed:\n{(root / 'reference_log.txt').read_text()}")
    expected, _ = _losses(root / "reference")

    workdir, kills = root / "drilled", []
    while len(kills) < args.kills:
        kill = _run_and_kill(_command(workdir, args), env, workdir, rng, startup_s)
        if kill is None:
            break  # too few steps for --kills: the result says how many there were
        kills.append(kill)
    final = subprocess.run(
        _command(workdir, args), cwd=ROOT, env=env, capture_output=True, text=True
    )
    if final.returncode != 0:
        sys.exit(f"the last rerun failed:\n{final.stderr[-3000:]}")

    import common  # after the runs too: it imports jax
    import orbax.checkpoint as ocp  # after the runs: only this process's checks need it

    from sora_jax.train import checkpoint

    got, logged = _losses(workdir)
    steps = sorted(expected)
    difference = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in steps)
    manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
    problems = {s: checkpoint.problem_with(manager, s) for s in manager.all_steps()}
    result = {
        "benchmark": "kill_drill",
        "machine": common.machine(),
        "kills": len(kills),
        "kill_moments": kills,
        "steps": args.steps,
        "same_steps_logged_once": logged == steps,
        "max_relative_loss_difference": difference,
        "same_losses": difference <= 1e-6,
        "orphan_processes": sum(k["orphans"] for k in kills),
        "stale_files": _stale(workdir),
        "checkpoints_intact": all(v is None for v in problems.values()),
        "checkpoints": sorted(problems),
        "seconds": round(time.time() - start, 1),
    }
    result["unverified_set_aside"] = sorted(
        p.name for p in (workdir / "unverified_checkpoints").glob("*")
    )
    result["digestless_corruption"] = _digestless_corruption(workdir, args, env, expected)
    result["ok"] = bool(
        result["same_steps_logged_once"]
        and result["same_losses"]
        and not result["orphan_processes"]
        and not result["stale_files"]
        and result["checkpoints_intact"]
        and all(v for k, v in result["digestless_corruption"].items() if k != "corrupted_step")
    )
    for kill in kills:
        print(f"killed at {kill['moment']} (logged step {kill['logged_step']})")
    if result["ok"]:
        shutil.rmtree(root)  # kept when something failed, to look at
    line = json.dumps(result)
    print(line)
    if args.out:
        pathlib.Path(args.out).write_text(line + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
