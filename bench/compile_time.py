"""Compile time of the train step against audio length (log-mel frames) and clip length
(video frames). Audio should be flat: the recurrent cell is a scan, not an unrolled loop.

  python bench/compile_time.py [--audio-frames 100 400 1600] [--video-frames 8 32]
"""

import sys
import time

import common
import jax
from train_step import random_batch

from sora_jax.data.pipeline import to_global
from sora_jax.train import setup
from sora_jax.train.step import make_train_step


def compile_seconds(config) -> float:
    jax.clear_caches()
    run = setup.build(config)
    batch = to_global(random_batch(config, config.batch_size), run.batch_sharding)
    step = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    start = time.perf_counter()
    step.lower(run.abstract_state, batch).compile()
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--audio-frames", type=int, nargs="+", default=[100, 400, 1600])
    p.add_argument("--video-frames", type=int, nargs="*", default=[8, 32])
    args = p.parse_args(argv)
    audio, video = {}, {}
    for frames in args.audio_frames:
        config = common.load_config(
            args.config, [*args.set, f"data.audio_samples={400 + (frames - 1) * 160}"]
        )
        audio[str(frames)] = compile_seconds(config)
    for frames in args.video_frames:
        config = common.load_config(args.config, [*args.set, f"data.num_frames={frames}"])
        video[str(frames)] = compile_seconds(config)
    a = list(audio.values())
    result = {
        "benchmark": "compile_time",
        "config": args.config,
        "overrides": args.set,
        "audio_frames_s": audio,
        "video_frames_s": video,
        "audio_max_over_min": max(a) / min(a),
        **common.machine(),
    }
    table = [(f"audio {k} frames", f"{v:.2f} s") for k, v in audio.items()]
    table += [(f"video {k} frames", f"{v:.2f} s") for k, v in video.items()]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
