"""Input pipeline throughput: clips/s per core from the prepared dataset (read, JPEG
decode, crop, flip, audio window) against decoding the raw video files with PyAV for the
same clips; and, with --train-steps, the data-wait fraction of a real training run.

  python bench/input_pipeline.py --data-dir data/prepared --name sora_demo \
      --raw-dir data/demo_raw [--train-steps 300]
"""

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import common
import numpy as np

from sora_jax.data import pipeline
from sora_jax.media import sampling
from sora_jax.media.decode import decode_video

ROOT = pathlib.Path(__file__).resolve().parents[1]


def prepared_clips_per_s(config, examples: int) -> float:
    """One core: records already in the dataset -> training clips."""
    source = pipeline.data_source(config, config.data.train_split)
    spec = pipeline.clip_spec(config)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for i in range(examples):
        sampling.train_clip(source[i % len(source)], spec, rng, config.data.min_crop_scale, True)
    return examples / (time.perf_counter() - start)


def raw_clips_per_s(config, files: list[pathlib.Path], short_side: int) -> float:
    """One core: decoding each raw file with PyAV at training time, then the same sampling
    (the frames skip the JPEG round trip, which only flatters this path)."""
    spec = pipeline.clip_spec(config)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for path in files:
        video = decode_video(path, config.data.fps, short_side)
        example = {
            "frames": video.frames,
            "audio": video.audio,
            "has_audio": video.has_audio,
            "num_frames": len(video.frames),
            "label": 0,
        }
        sampling.train_clip(example, spec, rng, config.data.min_crop_scale, True)
    return len(files) / (time.perf_counter() - start)


def grain_clips_per_s(config, workers: int, batches: int) -> float:
    config.data.workers = workers
    iterator = iter(pipeline.train_dataset(config, config.batch_size))
    next(iterator)  # start-up (worker processes) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * config.batch_size / (time.perf_counter() - start)


def training_data_wait(args, steps: int) -> dict:
    """Train the demo config for `steps` and read the trainer's own data-wait figures."""
    with tempfile.TemporaryDirectory() as workdir:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "sora_jax.train.cli",
                "--config",
                args.config,
                "--workdir",
                workdir,
                f"--config.data.dir={args.data_dir}",
                f"--config.data.name={args.name}",
                f"--config.total_steps={steps}",
                *(f"--config.{s}" for s in args.set),
            ],
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        windows = [
            json.loads(x)
            for x in (pathlib.Path(workdir) / "throughput.jsonl").read_text().splitlines()
        ]
    steady = windows[1:] or windows  # the first window includes compilation
    total = sum(w["steps"] * w["step_time_s"] for w in steady)
    wait = sum(w["steps"] * w["step_time_s"] * w["data_wait"] for w in steady)
    fetch = sum(w["steps"] * w["step_time_s"] * w["input_fetch"] for w in steady)
    return {
        "train_steps": steps,
        "data_wait_fraction": wait / total,
        "input_fetch_fraction": fetch / total,
        "train_clips_per_s": float(np.mean([w["clips_per_s"] for w in steady])),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.set_defaults(config="configs/demo.py")
    p.add_argument("--data-dir", default="data/prepared")
    p.add_argument("--name", default="sora_demo")
    p.add_argument("--raw-dir", default="data/demo_raw")
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--grain-batches", type=int, default=12, help="timed per worker count")
    p.add_argument("--train-steps", type=int, default=0, help="0: skip the training run")
    args = p.parse_args(argv)
    config = common.load_config(
        args.config, [f"data.dir={args.data_dir}", f"data.name={args.name}", *args.set]
    )
    summary = pipeline.check_dataset(config)
    raw = sorted(pathlib.Path(args.raw_dir).rglob("*.mp4"))[: args.examples]
    result = {
        "benchmark": "input_pipeline",
        "prepared_clips_per_s_per_core": prepared_clips_per_s(config, args.examples),
        "raw_pyav_clips_per_s_per_core": raw_clips_per_s(config, raw, summary.short_side),
        "grain_clips_per_s": {
            str(w): grain_clips_per_s(config.copy_and_resolve_references(), w, args.grain_batches)
            for w in (0, 1, 2)
        },
        "clip": {
            "frames": config.data.num_frames,
            "crop": config.data.crop_size,
            "stored_short_side": summary.short_side,
        },
    }
    result["speedup_vs_raw"] = (
        result["prepared_clips_per_s_per_core"] / result["raw_pyav_clips_per_s_per_core"]
    )
    if args.train_steps:
        result.update(training_data_wait(args, args.train_steps))
    result.update(common.machine())
    table = [
        ("prepared, 1 core", f"{result['prepared_clips_per_s_per_core']:.0f} clips/s"),
        ("raw PyAV, 1 core", f"{result['raw_pyav_clips_per_s_per_core']:.0f} clips/s"),
        ("prepared / raw", f"{result['speedup_vs_raw']:.1f}x"),
    ]
    table += [
        (f"grain, {w} workers", f"{v:.0f} clips/s") for w, v in result["grain_clips_per_s"].items()
    ]
    if args.train_steps:
        table.append(("training data wait", f"{result['data_wait_fraction']:.1%}"))
        table.append(("host time fetching", f"{result['input_fetch_fraction']:.1%}"))
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
