"""sora-curate apply: the prepared dataset without the clips a report flags, as a new
dataset beside it (sora-prep's builder, so it is swapped in whole, locked while built, and
uploaded to a bucket as sora-prep's are). Records are copied as stored: nothing is
decoded or re-encoded. The source dataset is only read.
"""

import argparse
import functools
import hashlib

import numpy as np

from sora_jax.curate import CurateError
from sora_jax.curate.report import FLAGS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sora-curate apply", description=__doc__)
    p.add_argument("report", help="a sora-curate report (.parquet)")
    p.add_argument("--data-dir", required=True, help="where the source dataset lies")
    p.add_argument("--name", required=True, help="the source dataset (the report's)")
    p.add_argument(
        "--drop", required=True, help=f"flags whose clips are left out, e.g. {','.join(FLAGS)}"
    )
    p.add_argument("--out-name", required=True, help="the new dataset's name")
    p.add_argument("--out-dir", default=None, help="where it goes (default: --data-dir)")
    return p


@functools.cache
def _source(data_dir: str, name: str, split: str):
    from sora_jax.data import pipeline

    return pipeline.data_source(None, split, where=(data_dir, name))


def copy_record(item: tuple[str, str, str, int], class_names: tuple[str, ...]):
    """(data dir, name, split, index) -> (report row, the example as stored)."""
    data_dir, name, split, index = item
    stored = _source(data_dir, name, split)[index]
    key = stored["path"].decode() if isinstance(stored["path"], bytes) else str(stored["path"])
    example = {
        "frames": list(stored["frames"]),
        "audio": np.asarray(stored["audio"], np.int16),
        "has_audio": bool(stored["has_audio"]),
        "num_frames": np.int32(stored["num_frames"]),
        "path": key,
    }
    labels = []
    if "label" in stored:
        labels = [class_names[int(i)] for i in stored["labels"]]
        example |= {"label": int(stored["label"]), "labels": [int(i) for i in stored["labels"]]}
    if "metadata" in stored:
        example["metadata"] = stored["metadata"]
    row = {
        "path": key,
        "status": "ok",
        "reason": "",
        "label": ";".join(labels),
        "split": split,
        "has_audio": example["has_audio"],
        "has_video": int(example["num_frames"]) > 0,
        "num_frames": int(example["num_frames"]),
    }
    return row, example


def main(argv: list[str]) -> int:
    import tensorflow_datasets as tfds

    from data_prep import builder
    from data_prep import report as prep_report
    from data_prep.worker import PrepSettings
    from sora_jax import storage
    from sora_jax.curate import report
    from sora_jax.data import pipeline

    args = _parser().parse_args(argv)
    drop = [flag.strip() for flag in args.drop.split(",") if flag.strip()]
    unknown = sorted(set(drop) - set(FLAGS))
    if unknown or not drop:
        raise CurateError(f"--drop {args.drop}: choose from {','.join(FLAGS)}")
    if args.out_name == args.name and (args.out_dir or args.data_dir) == args.data_dir:
        raise CurateError("--out-name is the source dataset: the source is never changed")
    try:
        table, about = report.read(args.report)
        summary = pipeline.dataset_summary(args.data_dir, args.name)
    except (FileNotFoundError, ValueError) as e:
        raise CurateError(str(e)) from None
    if about.dataset != args.name or about.dataset_fingerprint != summary.fingerprint:
        raise CurateError(
            f"{args.report} is a report of dataset {about.dataset} as prepared then "
            f"(fingerprint {about.dataset_fingerprint[:12]}), not of {args.name} as it is now "
            f"({summary.fingerprint[:12]}): curate {args.name} again"
        )
    if "av_mismatch" in drop and not about.models:
        raise CurateError(
            f"--drop av_mismatch: {args.report} was made without a run, so it has no av_score"
        )
    flagged = np.zeros(table.num_rows, bool)
    for flag in drop:
        flagged |= table[flag].to_numpy(zero_copy_only=False)
    splits = table["split"].to_numpy(zero_copy_only=False)
    indices = table["index"].to_numpy()
    dropped_ids = sorted(np.asarray(table["id"].to_pylist(), dtype=object)[flagged])
    info = tfds.builder(args.name, data_dir=args.data_dir).info
    settings = PrepSettings(**info.metadata["prep"])
    kept: dict[str, list] = {}
    for split, size in summary.splits.items():
        gone = set(indices[flagged & (splits == split)].tolist())  # splits not read: none
        kept[split] = [(args.data_dir, args.name, split, i) for i in range(size) if i not in gone]
    digest = hashlib.sha256(
        "\n".join([summary.fingerprint, *sorted(drop), *dropped_ids]).encode()
    ).hexdigest()
    out_dir = args.out_dir or args.data_dir
    rows, rebuilt = builder.build_if_changed(
        out_dir,
        args.out_name,
        digest,
        split_items={s: functools.partial(lambda s: kept[s], s) for s in kept if kept[s]},
        class_names=list(summary.class_names),
        max_labels_per_clip=summary.max_labels_per_clip,
        metadata_columns=summary.metadata_columns,
        work=functools.partial(copy_record, class_names=summary.class_names),
        settings=settings,
    )
    prep_report.write(rows, storage.path(out_dir) / f"{args.out_name}_report.json")
    counts = {s: len(kept[s]) for s in kept}
    print(
        f"{args.out_name}: {sum(counts.values())} clips kept of {sum(summary.splits.values())} "
        f"({', '.join(f'{s} {n}' for s, n in counts.items())}); dropped {len(dropped_ids)} "
        f"flagged {'/'.join(drop)}; {'written' if rebuilt else 'already up to date'}\n"
        f"dataset: {storage.path(out_dir) / args.out_name}"
    )
    return 0
