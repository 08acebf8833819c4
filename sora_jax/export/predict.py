"""sora-predict --export OUT FILE... [--top-k 5] [--embeddings DIR] [--explain DIR]
sora-predict --export OUT --timeline FILE... [--hop S] [--plot OUT.png] [--explain DIR]
sora-predict --export OUT --stream - [...]     # a live stream on standard input

Classifies raw video files with an exported model, through the export's own client
(sora_jax.media.predictor, copied beside the artifact as sora_media/): the same decoding
as data preparation and the same views as evaluation, so predictions match sora-eval's
for the same clip and `python OUT/client.py FILE...`'s up to float rounding. A file without
audio is predicted from video alone; a file that cannot be decoded gets an error line and
the others go on.

stdout: one JSON object per file, the client's ({"path", "scores", "has_audio"}, and
"warning" for a file shorter than the model's window) with the top classes; exit code 0,
or 3 when some files failed.

--timeline slides the model's window over each whole file (every --hop seconds, default
half a window), decoding as it goes (memory stays bounded however long the file), and
prints one JSON line per window, {"path", "start_s", "end_s", "scores", "has_audio",
"has_video"}, then the file's {"path", "summary"}: its segments (runs of one top class)
and timing (decode and model seconds, real-time factor, window latency p50/p99).
--stream SOURCE does the same on a live input, '-' for standard input (for example
`ffmpeg -i rtsp://... -f matroska - | sora-predict --export OUT --stream -`) or a file
still being written, printing each window as soon as its frames and sound have arrived.
--plot draws the scores over time; --explain DIR writes, per prediction (or per window),
why: the scores with both senses, video only and audio only, and occlusion saliency over
the frames and the spectrogram (DIR/<name>.png, the numbers in DIR/<name>.json).
"""

import argparse
import json
import os
import pathlib
import sys

import numpy as np

from sora_jax import process, storage
from sora_jax.export import plots
from sora_jax.media.predictor import Predictor
from sora_jax.media.timeline import StreamReader

__all__ = ["Predictor", "main"]


def _write_explanation(explanation: dict, directory: pathlib.Path, name: str, title: str) -> None:
    """DIR/<name>.png (the figure) and DIR/<name>.json (the attribution), and the maps in
    DIR/<name>.npz for those who would draw their own."""
    plots.explanation_png(explanation, directory / f"{name}.png", title)
    numbers = {k: v for k, v in explanation.items() if k in ("attribution", "view")}
    (directory / f"{name}.json").write_text(json.dumps(numbers, indent=1) + "\n")
    np.savez_compressed(
        directory / f"{name}.npz",
        **{k: explanation[k] for k in ("frame_saliency", "audio_saliency", "log_mel")},
    )


def _plot_path(plot: str, source: str, several: bool) -> pathlib.Path:
    path = pathlib.Path(plot)
    return (
        path.with_name(f"{path.stem}-{pathlib.Path(source).stem}{path.suffix}") if several else path
    )


def _timelines(
    args: argparse.Namespace,
    predictor: Predictor,
    sources: list[str],
    explain_dir: pathlib.Path | None,
) -> int:
    failed = 0
    for source in sources:
        if args.stream:
            try:
                source = StreamReader.of(source, args.idle_seconds)
            except OSError as e:
                print(json.dumps({"path": source, "error": e.strerror}), flush=True)
                failed += 1
                continue
        rows = []
        windows = predictor.timeline(source, args.hop, args.batch, with_inputs=bool(explain_dir))
        for row in windows:
            if "inputs" in row:
                name = f"{pathlib.Path(row['path']).stem}_{row['start_s']:09.3f}s"
                explanation = predictor.explain(row.pop("inputs"), args.explain_grid)
                title = f"{row['path']} {row['start_s']:.2f}-{row['end_s']:.2f} s"
                _write_explanation(explanation, explain_dir, name, title)
                row["explanation"] = str(explain_dir / f"{name}.png")
            print(json.dumps(row), flush=True)
            if "error" in row:
                failed += 1
                print(f"{row['path']}: error: {row['error']}", file=sys.stderr)
            elif "summary" in row:
                segments = ", ".join(
                    f"{s['class']} {s['start_s']:.1f}-{s['end_s']:.1f}s"
                    for s in row["summary"]["segments"]
                )
                print(f"{row['path']}: {segments}", file=sys.stderr)
            else:
                rows.append(row)
        name = getattr(source, "name", source)
        if args.plot and rows:
            plot = _plot_path(args.plot, name, len(sources) > 1)
            plots.timeline_png(rows, plot, f"{name}: class scores over time")
    return failed


def main(argv: list[str] | None = None) -> int:
    process.configure()
    parser = argparse.ArgumentParser(
        prog="sora-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export", required=True, help="a sora-export output directory")
    parser.add_argument("files", nargs="*", help="video files")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--embeddings", default=None, help="write <DIR>/<file stem>.npy")
    parser.add_argument("--timeline", action="store_true", help="score every window of each file")
    parser.add_argument(
        "--stream", default=None, help="a live input: '-' (standard input) or a growing file"
    )
    parser.add_argument(
        "--hop", type=float, default=0.0, help="seconds between windows (0: half a window)"
    )
    parser.add_argument("--batch", type=int, default=8, help="windows per model call (files)")
    parser.add_argument(
        "--idle-seconds", type=float, default=5.0, help="a growing file has ended after this"
    )
    parser.add_argument("--plot", default=None, help="timeline figure, OUT.png")
    parser.add_argument("--explain", default=None, help="write explanations to DIR")
    parser.add_argument("--explain-grid", type=int, default=16, help="occlusion grid per side")
    args = parser.parse_args(argv)
    if args.stream not in (None, "-") and (
        os.path.isdir(args.stream) or not os.path.exists(args.stream)
    ):
        parser.error(f"--stream {args.stream}: no such file (a folder is none; '-' reads stdin)")
    if args.stream is not None and args.files:
        parser.error("--stream reads one live input: give no files with it")
    if args.stream is None and not args.files:
        parser.error("give video files, or --stream")
    if args.plot and not (args.timeline or args.stream):
        parser.error("--plot draws a timeline: add --timeline (or --stream)")
    if args.embeddings and (args.timeline or args.stream):
        parser.error("--embeddings writes one per file: not with --timeline or --stream")
    if args.hop < 0 or args.batch < 1:
        parser.error("--hop must be >= 0 and --batch >= 1")
    stems = [pathlib.Path(path).stem for path in args.files]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    for flag, value, written in (
        ("--embeddings", args.embeddings, ".npy"),
        ("--explain", args.explain, ".png"),
    ):
        if value and clashes:  # one file's output would overwrite another's
            parser.error(
                f"{flag}: several files are named {', '.join(clashes)} (DIR/<name>{written})"
            )
    try:  # Predictor (part of the exported client) reads a local folder: a bucket's is copied
        predictor = Predictor(storage.download(storage.path(args.export)))
    except (OSError, ValueError) as e:  # not an export, one written by an older version, a URL
        parser.error(str(e))
    if not predictor.is_classifier and (args.timeline or args.stream or args.explain):
        parser.error(
            f"{args.export} is an embedding model (pretrained without labels): it has no "
            "classes to follow or explain; give files to get their embeddings"
        )
    explain_dir = pathlib.Path(args.explain) if args.explain else None
    if explain_dir:
        explain_dir.mkdir(parents=True, exist_ok=True)
    if args.timeline or args.stream is not None:
        failed = _timelines(
            args, predictor, [args.stream] if args.stream else args.files, explain_dir
        )
        return 3 if failed else 0
    if args.embeddings:
        pathlib.Path(args.embeddings).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.files:
        result = predictor.predict(
            path, with_embedding=bool(args.embeddings), with_inputs=bool(explain_dir)
        )
        inputs = result.pop("inputs", None)
        if "error" in result:
            failed += 1
            print(json.dumps(result))
            print(f"{path}: error: {result['error']}", file=sys.stderr)
            continue
        if "scores" not in result:  # an embedding model: its embeddings are the answer
            vector = result.pop("embedding", None)
            if args.embeddings:
                out = pathlib.Path(args.embeddings) / f"{pathlib.Path(path).stem}.npy"
                np.save(out, vector)
                result["embedding"] = str(out)
            print(json.dumps(result))
            absent = [k for k, v in result["embeddings"].items() if v is None]
            print(
                f"{path}: embedded" + (f" (no {', '.join(absent)})" if absent else ""),
                file=sys.stderr,
            )
            continue
        scores = result["scores"]
        top = sorted(scores, key=scores.get, reverse=True)[: args.top_k]
        result["top"] = [{"class": name, "score": scores[name]} for name in top]
        if args.embeddings:
            out = pathlib.Path(args.embeddings) / f"{pathlib.Path(path).stem}.npy"
            np.save(out, result.pop("embedding"))
            result["embedding"] = str(out)
        if explain_dir:
            explanation = predictor.explain_views(inputs, args.explain_grid)  # decoded once
            name = pathlib.Path(path).stem
            _write_explanation(explanation, explain_dir, name, f"{path}: {top[0]}")
            result["explanation"] = str(explain_dir / f"{name}.png")
        print(json.dumps(result))
        best = ", ".join(f"{name} {scores[name]:.3f}" for name in top[:3])
        print(
            f"{path}: {best}" + ("" if result["has_audio"] else "  (no audio: video only)"),
            file=sys.stderr,
        )
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
