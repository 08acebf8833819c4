"""sora-curate: find the clips of a prepared dataset that would hurt a pretraining run, and
write the dataset without them.

  sora-curate --data-dir D --name N [--split S ...] [--workdir W ...] [--export E ...] \
      --out R.parquet
  sora-curate apply R.parquet --data-dir D --name N --drop silent,duplicate,av_mismatch \\
      --out-name N2 [--out-dir D2]

The first reads every clip of the splits (all by default), streaming, and writes one row
per clip to R.parquet: `id` (SPLIT/KEY, as sora-embed's), `path`, `split`, each signal's
score and its flag at a threshold (--threshold NAME=VALUE; sora_jax/curate/signals.py):

  silent       audio_db < silent_db         the louder moments' level (dBFS); no sound: -120
  static       motion < static_motion       mean change between consecutive frames (0-255)
  blank        blank_fraction >= blank_fraction   share of frames black, flat or frozen
  duplicate    duplicate_of != ""           the id of the copy kept: the same content hash,
                                            or fingerprints at >= duplicate_similarity
  av_mismatch  av_score < av_score          with --workdir or --export of runs trained
                                            with the contrastive objective: how far the
                                            clip's own sound beats other clips' for its
                                            picture, and the other way (curate/av.py);
                                            never on a silent or blank clip. Each clip is
                                            scored by the first run that did not train on
                                            it (av_run; av_seen if every run did)

Without a run, av_score is left out (NaN, never flagged) and the last line says so. The
last stdout line is one JSON object: clips read, counts per flag, thresholds, what was left
out, and the time taken.

`apply` writes a new prepared dataset without the clips flagged by any of --drop (in the
splits the report covers; other splits are copied whole). The source dataset is never
changed. Why a new dataset rather than a filter sora-train applies: every reader (training,
evaluation, the evaluators, sora-embed) then sees the curated corpus with its true clip
counts and its own fingerprint in the work dir, nothing has to remember to filter, and the
records are copied as stored (no decoding), which costs disk, not compute.

Several processes (launch/local.py, launch/tpu_vm_pod.sh; the flags
--config.distributed.{coordinator,num_processes,process_id} as sora-train's) each read
their share of every split; process 0 then builds one duplicate index over every clip, so
a copy is found across shards, and writes the report.

Exit code 0; 2 on bad input (a dataset, split, run or report that does not fit), with one
line saying which.
"""

import argparse
import json
import os
import pathlib
import resource
import sys
import time

import numpy as np

from sora_jax import process
from sora_jax.curate import CurateError

CHUNK = 256  # clips read, scored and written at a time: memory stays bounded


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sora-curate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-dir", required=True, help="where the prepared dataset lies")
    p.add_argument("--name", required=True, help="the prepared dataset's name")
    p.add_argument("--split", action="append", help="a split to read (repeat; default: all)")
    p.add_argument(
        "--workdir",
        action="append",
        default=[],
        help="a run trained with the contrastive objective (repeat: each clip is scored by "
        "the first run that did not train on it, e.g. runs with data.folds=4 and "
        "data.holdout_fold=0 to 3)",
    )
    p.add_argument("--export", action="append", default=[], help="an export of such a run")
    p.add_argument("--checkpoint", default=None, help="--workdir: a step, best or latest")
    p.add_argument("--out", required=True, help="the report to write (.parquet)")
    p.add_argument(
        "--threshold", action="append", default=[], metavar="NAME=VALUE", help="e.g. silent_db=-60"
    )
    p.add_argument("--config.distributed.coordinator", dest="coordinator", default="")
    p.add_argument("--config.distributed.num_processes", dest="num_processes", type=int, default=0)
    p.add_argument("--config.distributed.process_id", dest="process_id", type=int, default=-1)
    return p


def _join_processes(args: argparse.Namespace) -> None:
    """As sora-train joins its processes (the same flags, setup.py's code)."""
    import ml_collections

    from configs import base
    from sora_jax.train import setup

    distributed = base.get_config().distributed
    distributed.update(
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    setup.maybe_initialize_distributed(ml_collections.ConfigDict({"distributed": distributed}))


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _embedders(args: argparse.Namespace, summary) -> list:
    """The runs that score av_score, each checked against the dataset before any clip is
    read."""
    from sora_jax.export.embed import PROJECTIONS, Embedder
    from sora_jax.train.checkpoint import CorruptCheckpointError
    from sora_jax.workdir import checkpoint_choice

    embedders = []
    runs = [(w, None) for w in args.workdir] + [(None, e) for e in args.export]
    for workdir, export in runs:
        run = workdir or export
        try:
            step = checkpoint_choice(args.checkpoint) if args.checkpoint and workdir else None
            embedder = Embedder(workdir, export, step)
        except (FileNotFoundError, ValueError, CorruptCheckpointError) as e:
            raise CurateError(f"{run}: {e}") from None
        if not set(PROJECTIONS) <= set(embedder.outputs):
            raise CurateError(
                f"{run}: its model has no space where picture and sound are aligned (train "
                "it with the contrastive objective, configs/pretrain_av.py): av_score needs one"
            )
        if abs(embedder.config.data.fps - summary.fps) > 1e-6:
            raise CurateError(
                f"{run} reads clips at {embedder.config.data.fps:g} fps, dataset {args.name} "
                f"was prepared at {summary.fps:g} fps: the model does not match the dataset "
                "(prepare it at the run's fps, or curate with a run trained on such clips)"
            )
        embedder.name = run
        embedders.append(embedder)
    return embedders


def _projections(embedder, examples: list[dict], ids: list[str]) -> tuple[np.ndarray, ...]:
    from sora_jax.export.embed import embed_clips

    out = embed_clips(embedder, iter(zip(examples, ids, strict=True)), str)
    return out["video_projection"], out["audio_projection"]


def _bank(embedder, sources: dict) -> tuple[np.ndarray, ...]:
    """The bank's clips under one run: (video [M, P], audio [M, P], ids [M]), those with
    both senses. The same clips in every process: scores do not depend on the shards."""
    from sora_jax.curate import av

    positions = av.bank_positions({split: len(source) for split, source in sources.items()})
    examples = [sources[split][i] for split, i in positions]
    ids = np.array([_clip_id(s, e) for (s, _), e in zip(positions, examples, strict=True)])
    video, audio = _projections(embedder, examples, list(ids))
    both = ~(np.isnan(video).any(axis=1) | np.isnan(audio).any(axis=1))
    return video[both], audio[both], ids[both]


def _score(rows: list[dict], examples: dict, embedder, bank: tuple) -> None:
    """Sets each row's av_score under `embedder` (examples: id -> stored example)."""
    from sora_jax.curate import av

    if not rows:
        return
    ids = [row["id"] for row in rows]
    video, audio = _projections(embedder, [examples[i] for i in ids], ids)
    for row, score in zip(rows, av.av_scores(video, audio, np.array(ids), *bank), strict=True):
        row["av_score"] = score


def _scan(args, summary, splits, embedders: list, part: str) -> tuple[int, int]:
    """This process's share of every split -> its part file: (clips read, unreadable)."""
    import jax
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sora_jax import storage
    from sora_jax.curate import report, signals
    from sora_jax.data import pipeline

    sources = {s: pipeline.data_source(None, s, where=(args.data_dir, args.name)) for s in splits}
    banks = [_bank(embedder, sources) for embedder in embedders]

    def scorer(split: str, index: int) -> tuple[int, bool]:
        """The run that scores a clip: the first that did not train on it (it may have
        memorised the clip's pair), else the first, marked as seen."""
        for r, embedder in enumerate(embedders):
            if not embedder.trained_on_clip(args.name, summary.fingerprint, split, index):
                return r, False
        return 0, True

    read = unreadable = 0
    with storage.path(part).open("wb") as f, pq.ParquetWriter(f, report.PART_SCHEMA) as writer:
        for split in splits:
            n, p, count = len(sources[split]), jax.process_index(), jax.process_count()
            share = range(n * p // count, n * (p + 1) // count)
            for start in range(share.start, share.stop, CHUNK):
                rows, examples = [], {}
                for i in range(start, min(start + CHUNK, share.stop)):
                    try:
                        example = sources[split][i]
                    except pipeline.CorruptDataError as e:
                        print(f"sora-curate: skipped: {e}", file=sys.stderr)
                        unreadable += 1
                        continue
                    row = signals.clip_signals(example)
                    row.update(id=_clip_id(split, example), path=_key(example), split=split)
                    row.update(index=i, av_score=np.nan, av_run=-1, av_seen=False)
                    if embedders:
                        row["av_run"], row["av_seen"] = scorer(split, i)
                    rows.append(row)
                    examples[row["id"]] = example
                for r, (embedder, bank) in enumerate(zip(embedders, banks, strict=True)):
                    _score([row for row in rows if row["av_run"] == r], examples, embedder, bank)
                if not rows:
                    continue
                for row in rows:
                    row["fingerprint"] = row["fingerprint"].astype(np.float16)
                columns = {name: [r[name] for r in rows] for name in report.PART_SCHEMA.names}
                writer.write_table(pa.table(columns, schema=report.PART_SCHEMA))
                read += len(rows)
    return read, unreadable


def _key(example: dict) -> str:
    key = example["path"]
    return key.decode() if isinstance(key, bytes) else str(key)


def _clip_id(split: str, example: dict) -> str:
    return f"{split}/{_key(example)}"


def _merge(parts: list[str], thresholds, splits: tuple[str, ...]):
    """Every process's rows -> the report's table, with duplicates found over all of them."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sora_jax import storage
    from sora_jax.curate import duplicates

    tables = []
    for part in parts:
        with storage.path(part).open("rb") as f:
            tables.append(pq.read_table(io.BytesIO(f.read())))
    table = pa.concat_tables(tables)
    split_order = {s: k for k, s in enumerate(splits)}
    order = np.lexsort(
        (table["index"].to_numpy(), [split_order[s] for s in table["split"].to_pylist()])
    )
    table = table.take(order)
    n = table.num_rows
    flat = table["fingerprint"].combine_chunks().flatten().to_numpy()  # float16, no copies
    fingerprints = flat.reshape(n, -1) if n else np.zeros((0, 0), np.float16)  # [N, D]
    ids = np.array(table["id"].to_pylist(), dtype=str)
    copy_of = duplicates.duplicate_of(
        ids,
        np.array(table["content_hash"].to_pylist(), dtype=str),
        fingerprints,
        table["num_frames"].to_numpy(),
        table["height"].to_numpy(),
        thresholds.duplicate_similarity,
    )
    t = thresholds
    audio_db = table["audio_db"].to_numpy()
    motion = table["motion"].to_numpy()
    blank = table["blank_fraction"].to_numpy()
    score = table["av_score"].to_numpy()
    return pa.table(
        {
            "id": table["id"],
            "path": table["path"],
            "split": table["split"],
            "index": table["index"],  # the clip's record in its split
            "audio_db": table["audio_db"],
            "silent": audio_db < t.silent_db,
            "motion": table["motion"],
            "static": np.nan_to_num(motion, nan=np.inf) < t.static_motion,
            "blank_fraction": table["blank_fraction"],
            "blank": blank >= t.blank_fraction,
            "duplicate_of": pa.array(copy_of, pa.string()),
            "duplicate": copy_of != "",
            "av_score": table["av_score"],
            # Only where there is a sound and a picture to pair: a silent or a blank clip
            # scores low against every clip, and is flagged as what it is.
            "av_mismatch": (np.nan_to_num(score, nan=np.inf) < t.av_score)
            & (audio_db >= t.silent_db)
            & (blank < t.blank_fraction),
            "av_run": table["av_run"],
            "av_seen": table["av_seen"],
            "has_audio": table["has_audio"],
            "num_frames": table["num_frames"],
            "content_hash": table["content_hash"],
        }
    )


def _curate(args: argparse.Namespace) -> int:
    import dataclasses

    from sora_jax import storage
    from sora_jax.curate import report
    from sora_jax.curate.signals import Thresholds
    from sora_jax.data import pipeline

    start = time.time()
    if not args.out.endswith(".parquet"):
        raise CurateError(f"--out {args.out}: the report is a .parquet file")
    try:
        thresholds = Thresholds.parse(args.threshold)
        summary = pipeline.dataset_summary(args.data_dir, args.name)
    except (FileNotFoundError, ValueError) as e:
        raise CurateError(str(e)) from None
    splits = tuple(args.split or sorted(summary.splits))
    for split in splits:
        if split not in summary.splits:
            raise CurateError(
                f"dataset {args.name} has no split {split!r} (it has {sorted(summary.splits)})"
            )
    problems = pipeline.shard_problems(summary, args.name, splits)
    if problems:
        raise CurateError(problems[0])
    embedders = _embedders(args, summary)
    left_out = (
        ()
        if embedders
        else (
            "av_score: give --workdir or --export of a run trained with the contrastive objective",
        )
    )
    _join_processes(args)
    import jax

    index, count = jax.process_index(), jax.process_count()
    parts_dir = storage.path(args.out + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    part = os.fspath(parts_dir / f"part-{index:05d}-of-{count:05d}.parquet")
    read, unreadable = _scan(args, summary, splits, embedders, part)
    scanned = time.time() - start
    _barrier("sora-curate: every part written")
    if index == 0:
        parts = [
            os.fspath(parts_dir / f"part-{i:05d}-of-{count:05d}.parquet") for i in range(count)
        ]
        table = _merge(parts, thresholds, splits)
        about = report.About(
            dataset=args.name,
            data_dir=str(args.data_dir),
            dataset_fingerprint=summary.fingerprint,
            splits=splits,
            thresholds=dataclasses.asdict(thresholds),
            models=tuple(e.name for e in embedders),
            left_out=left_out,
        )
        report.write(args.out, table, about)
        storage.remove_tree(parts_dir)
        for reason in left_out:
            print(f"sora-curate: left out {reason}", file=sys.stderr)
        seen = int(np.sum(table["av_seen"].to_numpy()))
        if seen:
            print(
                f"sora-curate: warning: {seen} clips' av_score comes from a run that trained "
                "on them, which may have learned their pairs, wrong ones included: score each "
                "clip with a run that held it out (data.folds, README 'Curate a corpus')",
                file=sys.stderr,
            )
        seconds = time.time() - start
        print(
            json.dumps(
                {
                    "clips": table.num_rows,
                    "unreadable": unreadable,
                    "flags": report.counts(table),
                    "thresholds": dataclasses.asdict(thresholds),
                    "left_out": list(left_out),
                    "av_scored_by_a_run_that_trained_on_them": seen,
                    "report": str(args.out),
                    "processes": count,
                    "seconds": round(seconds, 2),
                    "clips_per_s": round(read / max(scanned, 1e-9), 1),  # process 0's
                    "cores": os.cpu_count(),
                    "peak_rss_mib": round(_peak_rss() / 2**20, 1),
                }
            )
        )
    _barrier("sora-curate: report written")
    return 0


def _peak_rss() -> int:
    """Bytes: this process's peak resident memory. VmHWM, not getrusage's ru_maxrss, which
    survives exec and so reports a large parent's size for a small child."""
    try:
        status = pathlib.Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    process.configure()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "apply":
            from sora_jax.curate import apply

            return apply.main(argv[1:])
        return _curate(_parser().parse_args(argv))
    except CurateError as e:
        print(f"sora-curate: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
