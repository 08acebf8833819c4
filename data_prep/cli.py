"""sora-prep: turn a folder or CSV of videos (or DMVR TFRecords) into a tfds ArrayRecord
dataset that sora-train reads with --config.data.dir=DATA_DIR --config.data.name=NAME.

  sora-prep SOURCE --out DATA_DIR [--name NAME] [--fps F] [--short-side S] [--workers N]
  sora-prep demo OUT [--set small]   # write a built-in demo dataset (then prepare it)

Exit code: 0 when every input was kept, 3 when some were skipped, 1 or 2 on failure.
"""

import argparse
import os
import pathlib
import sys
import time

from sora_jax import process

EXIT_SKIPPED = 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sora-prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source", help="a folder of videos, a CSV of them, or a folder of DMVR TFRecords"
    )
    p.add_argument("--out", required=True, help="DATA_DIR: where the dataset and report go")
    p.add_argument(
        "--name", default="", help="dataset name (snake_case); default: the source's name"
    )
    p.add_argument(
        "--layout",
        default="auto",
        choices=("auto", "split_folders", "class_folders", "csv", "kinetics", "unlabeled", "dmvr"),
        help="unlabeled: any folder tree of media files, or a CSV with only a `path` column "
        "(for pretraining); the held-out split by a seeded hash (--test-fraction)",
    )
    p.add_argument("--fps", type=float, default=8.0, help="frames per second stored (default 8)")
    p.add_argument(
        "--short-side", type=int, default=128, help="resize the short side to this (0: keep)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=600.0,
        help="keep at most this much of each input, noted in the report (0: all)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the train/test split, where one is made"
    )
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--videos", default=None, help="kinetics: the folder holding the files")
    p.add_argument(
        "--dmvr-fps", type=float, default=25.0, help="dmvr: the frame rate of the records"
    )
    p.add_argument("--dmvr-sample-rate", type=int, default=48_000, help="dmvr: the audio rate")
    p.add_argument(
        "--min-frames", type=int, default=8, help="flag (but keep) clips shorter than this"
    )
    p.add_argument(
        "--min-complete",
        type=float,
        default=0.9,
        help="skip, as truncated, a file that decodes to less than this fraction of the "
        "duration its container claims (0 keeps every file that decodes at all)",
    )
    p.add_argument(
        "--beam",
        nargs="?",
        const="",
        default=None,
        metavar="OPTIONS",
        help="run on Apache Beam (pip install '.[beam]'); OPTIONS are Beam pipeline flags, "
        'e.g. "--runner=DataflowRunner --project=P --region=R"; none: the DirectRunner',
    )
    return p


def _bad_arguments(args: argparse.Namespace) -> list[str]:
    checks = (
        (args.fps > 0, f"--fps {args.fps}: must be positive"),
        (args.short_side >= 0, f"--short-side {args.short_side}: must be >= 0 (0 keeps the size)"),
        (args.max_seconds >= 0, f"--max-seconds {args.max_seconds}: must be >= 0 (0: all)"),
        (args.workers >= 0, f"--workers {args.workers}: must be >= 0 (0, 1: in this process)"),
        (args.min_frames >= 0, f"--min-frames {args.min_frames}: must be >= 0"),
        (0 <= args.min_complete <= 1, f"--min-complete {args.min_complete}: must be in [0, 1]"),
        (0 <= args.test_fraction < 1, f"--test-fraction {args.test_fraction}: must be in [0, 1)"),
        (args.dmvr_fps > 0, f"--dmvr-fps {args.dmvr_fps}: must be positive"),
        (
            args.dmvr_sample_rate > 0,
            f"--dmvr-sample-rate {args.dmvr_sample_rate}: must be positive",
        ),
    )
    return [message for ok, message in checks if not ok]


def _demo(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sora-prep demo",
        description="Write a built-in demo dataset as OUT/<split>/<class>/<file>.mp4.",
    )
    p.add_argument("out")
    p.add_argument(
        "--set",
        choices=("fusion", "small", "paired", "timing", "faulty"),
        default="fusion",
        help="fusion: 4 classes that need both senses (make demo); small: 10 classes, each "
        "with a look and a sound of its own, the shape of a first small labelled set; "
        "paired: the small set with picture and sound also varying together within a class "
        "(hue with pitch, size with loudness), to pretrain on without its labels; timing: "
        "flashes and clicks at random moments, where only timing pairs a picture with its "
        "sound (configs/av_sync.py); faulty: the paired set with faults planted in its train "
        "split (swapped soundtracks, re-encoded copies, silence, frozen and black pictures; "
        "OUT/clips.csv names them), to curate (sora-curate); prepare OUT/clips.csv",
    )
    p.add_argument("--train-per-class", type=int, help="default: 48 (fusion), 24 (others)")
    p.add_argument("--test-per-class", type=int, help="default: 16 (fusion), 8 (others)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--timeline",
        metavar="FILE",
        help="also write one long Matroska file of the fusion set's classes one after another "
        "(4 s each, twice), for sora-predict --timeline and --stream",
    )
    args = p.parse_args(argv)
    from data_prep import synthetic

    if args.timeline:
        segments = synthetic.write_demo_timeline(args.timeline, seed=args.seed)
        shown = ", ".join(f"{name} {start:g}-{end:g}s" for name, start, end in segments)
        print(f"wrote {args.timeline}: {shown}")

    make, train, test = {
        "fusion": (synthetic.make_demo_dataset, 48, 16),
        "small": (synthetic.make_small_set, 24, 8),
        "paired": (synthetic.make_paired_set, 24, 8),
        "timing": (synthetic.make_timing_set, 160, 40),
        "faulty": (synthetic.make_faulty_set, 24, 8),
    }[args.set]
    start = time.time()
    train = train if args.train_per_class is None else args.train_per_class
    test = test if args.test_per_class is None else args.test_per_class
    out = make(args.out, train, test, args.seed)
    print(f"wrote the {args.set} demo videos to {out} in {time.time() - start:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    process.quiet_tensorflow()  # sora-prep computes nothing with JAX: no CPU settings
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "demo":
        return _demo(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    for problem in _bad_arguments(args):  # before any file is read
        parser.error(problem)
    from data_prep import builder, layouts, report
    from data_prep.worker import PrepSettings
    from sora_jax import storage

    try:
        out, source = storage.absolute(args.out), storage.path(args.source)
    except storage.StorageError as e:
        print(f"sora-prep: {e}", file=sys.stderr)
        return 2
    name = args.name or source.stem.lower().replace("-", "_").replace(" ", "_")
    if storage.is_remote(source):  # PyAV and the layouts read local files
        print(f"sora-prep: copying {source} to this machine", file=sys.stderr)
        source = storage.download(source)
    source = pathlib.Path(source)
    if not storage.is_remote(out):
        if out.exists() and not out.is_dir():
            print(f"sora-prep: --out {out} is a file, not a folder", file=sys.stderr)
            return 2
        inside = pathlib.Path(out).resolve()
        if source.is_dir() and source.resolve() in (inside, *inside.parents):
            print(
                f"sora-prep: --out {out} is inside SOURCE {source}: a second run would read its "
                "own output as clips; choose a folder outside it",
                file=sys.stderr,
            )
            return 2
        out.mkdir(parents=True, exist_ok=True)
    elif args.beam and "--runner" in args.beam and "DirectRunner" not in args.beam:
        print(
            f"sora-prep: --out {out} with --beam on a remote runner: ArrayRecord's writer "
            "opens local files only, so remote workers cannot write the shards into a bucket. "
            "Prepare with the DirectRunner (or without --beam), which builds here and uploads.",
            file=sys.stderr,
        )
        return 2
    settings = PrepSettings(
        fps=args.fps,
        short_side=args.short_side,
        max_seconds=args.max_seconds,
        min_frames=args.min_frames,
        min_complete=args.min_complete,
    )
    start = time.time()
    try:
        if args.layout == "dmvr":
            from data_prep import dmvr

            rows, rebuilt = dmvr.prepare(
                source, out, name, settings, args.dmvr_fps, args.dmvr_sample_rate, args.workers
            )
        else:
            entries = layouts.discover(
                source, args.layout, args.seed, args.test_fraction, args.videos
            )
            if not entries:
                print(f"sora-prep: no input files found in {source}", file=sys.stderr)
                return 2
            rows, rebuilt = builder.prepare(
                entries, out, name, settings, args.workers, beam_options=args.beam
            )
    except (FileNotFoundError, ValueError) as e:
        print(f"sora-prep: {e}", file=sys.stderr)
        return 2
    report_path = out / f"{name}_report.json"
    report.write(rows, report_path)
    print(report.summary_table(rows))
    for label, count in report.thin_classes(rows).items():
        print(
            f"sora-prep: warning: class {label!r} has {count} clip(s) in the test split: its "
            f"test metrics say little (add clips, or raise --test-fraction)",
            file=sys.stderr,
        )
    skipped = sum(r["status"] == "skipped" for r in rows)
    state = "prepared" if rebuilt else "already up to date (same inputs and settings)"
    print(
        f"\n{name}: {len(rows) - skipped} kept, {skipped} skipped; {state} in "
        f"{time.time() - start:.1f}s\ndataset: {out / name}\nreport:  {report_path}"
    )
    return EXIT_SKIPPED if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
