"""Timelines against the clock: real-time factor, throughput and window latency of
sora-predict --timeline / --stream on a 720p source, with decoding timed apart from the
model.

  python bench/timeline.py [--export runs/demo/export] [--seconds 30] [--out FILE]

1. The demo model end to end (`Predictor.timeline`, as sora-predict runs it) on a file,
   and on the same bytes through a pipe as a live stream (windows scored one by one as
   they arrive: the latency a live feed sees).
2. A realistic config (configs/kinetics_sounds.py: 16 frames every 2 at 12.5 fps, crop
   112, short side 128; random parameters, the cost is the same): its windows decoded
   and cut from the same source, and its model on batches of 8 windows, timed apart.
FFmpeg's own decoding of the source (every frame, no conversion) is timed too: the floor
no preprocessing can go under.
"""

import os
import pathlib
import tempfile
import threading
import time

import common
import jax
import numpy as np

from data_prep.synthetic import write_video
from sora_jax.inputs import InputSpec
from sora_jax.media.decode import decode_incrementally, open_file
from sora_jax.media.predictor import Predictor
from sora_jax.media.sampling import ClipSpec
from sora_jax.media.timeline import StreamReader, sliding_windows
from sora_jax.models import build_model


def write_720p(path: pathlib.Path, seconds: float, fps: float = 25.0) -> None:
    """A 1280x720 h264 + AAC file: textured background panning, a disc crossing it, its
    colour and tone changing every quarter (the demo's red/blue, low/high)."""
    rng = np.random.default_rng(0)
    h, w, n = 720, 1280, round(seconds * fps)
    texture = rng.integers(60, 190, (h // 8, w // 8 + n, 3), np.uint8).repeat(8, 0).repeat(8, 1)
    yy, xx = np.mgrid[:h, :w]

    class Frames:  # made one at a time as the encoder takes them (2 GB at once for 30 s)
        shape = (n, h, w, 3)

        def __iter__(self):
            for i in range(n):
                frame = texture[:, i : i + w].copy()
                cx, cy = 200 + (w - 400) * (i % 100) / 100, h / 2
                frame[(yy - cy) ** 2 + (xx - cx) ** 2 <= 90**2] = ((220, 40, 40), (40, 70, 220))[
                    (4 * i // n) % 2
                ]
                yield frame

    rate = 22_050
    t = np.arange(int(seconds * rate)) / rate
    pitch = np.where((4 * t / seconds).astype(int) < 2, 270.0, 1700.0)
    audio = 0.4 * np.sin(2 * np.pi * pitch * t) + rng.normal(0, 0.05, t.shape)
    write_video(path, Frames(), fps, np.clip(audio, -1, 1).astype(np.float32), rate)


def ffmpeg_decode_seconds(path: pathlib.Path) -> tuple[float, int]:
    """Every video frame decoded by FFmpeg, nothing converted: (seconds, frames)."""
    start, count = time.perf_counter(), 0
    with open_file(path) as container:
        container.streams.video[0].thread_type = "AUTO"
        for _ in container.decode(video=0):
            count += 1
    return time.perf_counter() - start, count


def demo_timeline(predictor: Predictor, path: pathlib.Path) -> dict:
    rows = list(predictor.timeline(path))
    return rows[-1]["summary"] | {"top": [max(r["scores"], key=r["scores"].get) for r in rows[:-1]]}


def demo_stream(predictor: Predictor, path: pathlib.Path) -> dict:
    """The file's bytes through a pipe, as fast as it takes them."""
    read, write = os.pipe()
    data = path.read_bytes()

    def feed():
        with os.fdopen(write, "wb") as out:
            out.write(data)

    threading.Thread(target=feed, daemon=True).start()
    rows = list(predictor.timeline(StreamReader(read, "-")))
    if "summary" not in rows[-1]:
        raise SystemExit(f"the stream failed: {rows[-1]}")
    return rows[-1]["summary"]


def realistic(path: pathlib.Path, seconds: float, config_path: str, batch: int = 8) -> dict:
    config = common.load_config(config_path, ["model.dtype=float32"])  # as on a CPU
    d = config.data
    spec = ClipSpec(
        d.num_frames,
        d.frame_stride,
        d.crop_size,
        d.fps,
        InputSpec.from_config(config).audio_samples,
        1,
    )
    span = (spec.num_frames - 1) * spec.frame_stride + 1
    start = time.perf_counter()
    with open_file(path) as container:
        events = decode_incrementally(container, d.fps, 128)  # sora-prep --short-side 128
        windows = [w.inputs for w in sliding_windows(events, spec, span // 2, True, True)]
    decode = time.perf_counter() - start
    model = build_model(config.model)
    zeros = InputSpec.from_config(config).zeros(1)
    params = jax.jit(lambda: model.init(jax.random.key(0), zeros)["params"])()
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x)["logits"])
    stacked = {k: np.stack([w[k] for w in windows[:batch]]) for k in windows[0]}
    jax.block_until_ready(apply(params, stacked))  # compiled
    per_batch = common.median_time(lambda: jax.block_until_ready(apply(params, stacked)), 5)
    model_seconds = per_batch * len(windows) / batch
    return {
        "config": config_path,
        "windows": len(windows),
        "window_s": span / d.fps,
        "decode_s": round(decode, 3),
        "model_s": round(model_seconds, 3),
        "model_ms_per_window": round(1000 * per_batch / batch, 3),
        "real_time_factor": round(seconds / (decode + model_seconds), 3),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--export", default="runs/demo/export", help="the demo's sora-export")
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--realistic", default="configs/kinetics_sounds.py")
    args = p.parse_args(argv)
    if not (pathlib.Path(args.export) / "model.jax").exists():
        p.error(f"{args.export} is not a sora-export: run `make demo` first")
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "720p.mkv"  # streamable, as a live feed is
        write_720p(source, args.seconds)
        ffmpeg_s, source_frames = ffmpeg_decode_seconds(source)
        predictor = Predictor(args.export)
        demo_timeline(predictor, source)  # page cache and first-call costs
        file_run = demo_timeline(predictor, source)
        stream_run = demo_stream(predictor, source)
        big = realistic(source, args.seconds, args.realistic)
    result = {
        "benchmark": "timeline",
        "machine": common.machine(),
        "source": {"size": "1280x720", "fps": 25.0, "seconds": args.seconds, "codec": "h264+aac"},
        "ffmpeg_decode_s": round(ffmpeg_s, 3),
        "ffmpeg_decode_fps": round(source_frames / ffmpeg_s, 1),
        "demo_file": {k: v for k, v in file_run.items() if k not in ("top",)},
        "demo_stream": stream_run,
        "realistic": big,
    }
    f, s = file_run["timing"], stream_run["timing"]
    table = [
        ("source", f"1280x720 h264, {args.seconds:.0f} s at 25 fps"),
        ("FFmpeg decode alone", f"{ffmpeg_s:.2f} s ({source_frames / ffmpeg_s:.0f} frames/s)"),
        (
            "demo, file",
            f"{f['real_time_factor']:.1f}x real time, decode {f['decode_s']:.2f} s + model "
            f"{f['model_s']:.2f} s, {f['windows_per_s']:.1f} windows/s, latency p50 "
            f"{f['latency_ms']['p50']:.0f} ms p99 {f['latency_ms']['p99']:.0f} ms",
        ),
        (
            "demo, stream",
            f"{s['real_time_factor']:.1f}x real time, latency p50 {s['latency_ms']['p50']:.1f} ms "
            f"p99 {s['latency_ms']['p99']:.1f} ms",
        ),
        (
            "kinetics_sounds",
            f"{big['real_time_factor']:.2f}x real time, decode {big['decode_s']:.2f} s + model "
            f"{big['model_s']:.2f} s ({big['model_ms_per_window']:.0f} ms/window)",
        ),
    ]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
