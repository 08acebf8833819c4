"""Does curation pay? Pretrain on a corpus with planted faults as it is, and on the same
corpus after `sora-curate apply`, with the same steps and seed, and measure both on the
same clean held-out clips: cross-modal retrieval recall@1 and a linear probe's top-1.

For each seed:
  1. `sora-prep demo --set faulty`: the paired set (10 classes) with faults planted in its
     train split (20% swapped soundtracks, 12% re-encoded copies, 8% silent, 6% frozen and
     4% black pictures); its test split clean. A clean labelled copy of the set (another
     seed) for the probe.
  2. Round 1, no model: `sora-curate --split train`, then `apply --drop
     silent,static,blank,duplicate`.
  3. Round 2: K bootstrap pretraining runs on round 1's corpus (--folds, 4), each holding
     out a K-th of it (data.folds=K, holdout_fold 0..K-1); `sora-curate --workdir FOLD0
     ... --workdir FOLDK-1` scores each clip with the run that never saw it (a run that
     trained on a swapped pair learns it: its av_score would vouch for it), then `apply
     --drop av_mismatch`. Precision and recall of each flag against what was planted,
     and for av_mismatch the same at other thresholds (how a threshold was chosen).
  4. `configs/pretrain_av.py:small` on the faulty corpus and on the curated one, the same
     steps and seed; retrieval on the (identical, clean) test split and a linear probe on
     the clean labelled set.

  python bench/curate.py [--seeds 0 1] [--steps 300] [--bootstrap-steps 1000] [--folds 4]
                         [--out F]
"""

import argparse
import csv
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import common
import jax
import numpy as np
import pandas as pd

from configs import pretrain_av
from data_prep import builder, layouts
from data_prep.synthetic import FLAG_FINDS, make_faulty_set, make_paired_set
from data_prep.worker import PrepSettings
from sora_jax.train import trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETTINGS = PrepSettings(fps=8.0, short_side=128)
MODEL_FREE = "silent,static,blank,duplicate"
AV_THRESHOLDS = (0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95)  # the curve reported


def _cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sora_jax.curate.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return done.stdout


def _pretrain(
    data: pathlib.Path, name: str, workdir: pathlib.Path, steps: int, seed: int, **data_keys
) -> dict:
    config = pretrain_av.get_config("small")
    config.seed, config.total_steps = seed, steps
    config.data.update(dir=str(data), name=name, **data_keys)
    config.evals = {"probe": {"type": "linear_probe", "dataset": "clean", "data_dir": str(data)}}
    result = trainer.train(config, workdir, jax.devices()[:1])
    r = result["retrieval"]
    return {
        "v2a_r1": r["v2a_r1"],
        "a2v_r1": r["a2v_r1"],
        "retrieval_r1": (r["v2a_r1"] + r["a2v_r1"]) / 2,
        "probe_top1": result["evals"]["probe"]["top1"],
        "held_out_clips": r["num_examples"],
    }


def _flags(report: pathlib.Path, truth: dict, flags: list[str]) -> dict:
    """Precision and recall of each flag against the faults planted."""
    table = pd.read_parquet(report)
    found = {}
    for flag in flags:
        planted = np.array([truth[p] in FLAG_FINDS[flag] for p in table["path"]])
        flagged = table[flag].to_numpy()
        found[flag] = {"planted": int(planted.sum()), **_precision_recall(planted, flagged)}
        if flag == "av_mismatch":  # how the scores separate, whatever the threshold
            score = table["av_score"].to_numpy()
            bad, good = score[planted], score[~planted & ~np.isnan(score)]
            found[flag] |= {
                "roc_auc": round(float(np.mean(bad[:, None] < good[None, :])), 3),
                "swapped_median_p90": [round(float(np.quantile(bad, q)), 3) for q in (0.5, 0.9)],
                "others_p10_median": [round(float(np.quantile(good, q)), 3) for q in (0.1, 0.5)],
                "at_threshold": {
                    str(t): _precision_recall(planted, np.nan_to_num(score, nan=np.inf) < t)
                    for t in AV_THRESHOLDS
                },
            }
    return found


def _precision_recall(planted: np.ndarray, flagged: np.ndarray) -> dict:
    hits = int(np.sum(planted & flagged))
    return {
        "flagged": int(flagged.sum()),
        "precision": round(hits / max(flagged.sum(), 1), 3),
        "recall": round(hits / max(planted.sum(), 1), 3),
    }


def two_rounds(
    root: pathlib.Path, truth: dict, bootstrap_steps: int, seed: int, folds: int
) -> tuple:
    """The README's two rounds on ROOT/data's `faulty` (its train split) -> each flag's
    precision and recall against `truth` (clip path -> fault), and each round's summary
    (sora-curate's last line). Leaves the dataset `curated` beside it."""
    data, d = root / "data", ("--data-dir", str(root / "data"))
    # Round 1, no model: silence, stills, blank pictures and copies.
    first, second = root / "round1.parquet", root / "round2.parquet"
    round1 = _cli(*d, "--name", "faulty", "--split", "train", "--out", str(first))
    _cli("apply", str(first), *d, "--name", "faulty", "--drop", MODEL_FREE, "--out-name", "round1")
    # Round 2: K bootstrap runs on round 1's corpus, each holding out a K-th of it, score
    # each clip's picture against its sound with the run that never saw the clip.
    runs = []
    for k in range(folds):
        workdir = root / f"fold{k}"
        _pretrain(data, "round1", workdir, bootstrap_steps, seed, folds=folds, holdout_fold=k)
        runs += ["--workdir", str(workdir)]
    round2 = _cli(*d, "--name", "round1", "--split", "train", *runs, "--out", str(second))
    _cli(
        "apply",
        str(second),
        *d,
        "--name",
        "round1",
        "--drop",
        "av_mismatch",
        "--out-name",
        "curated",
    )
    found = _flags(first, truth, MODEL_FREE.split(",")) | _flags(second, truth, ["av_mismatch"])
    return found, {"round1": _last(round1), "round2": _last(round2)}


def one_seed(
    root: pathlib.Path, seed: int, steps: int, bootstrap_steps: int, folds: int, per_class: int
) -> dict:
    data = root / "data"
    source = make_faulty_set(root / "faulty", per_class, 8, seed)
    builder.prepare(layouts.discover(source, "csv"), data, "faulty", SETTINGS, workers=2)
    clean = make_paired_set(root / "clean", 24, 8, seed + 100)
    builder.prepare(layouts.discover(clean), data, "clean", SETTINGS, workers=2)
    with source.open() as f:
        truth = {row["path"]: row["fault"] for row in csv.DictReader(f)}
    start = time.time()
    found, rounds = two_rounds(root, truth, bootstrap_steps, seed, folds)
    curation_s = time.time() - start
    runs = {
        name: _pretrain(data, name, root / f"run_{name}", steps, seed)
        for name in ("faulty", "curated")
    }
    round1, round2 = rounds["round1"], rounds["round2"]
    return {
        "seed": seed,
        "train_clips": {
            "faulty": round1["clips"],
            "curated": round2["clips"] - round2["flags"]["av_mismatch"],
        },
        "flags": found,
        "av_scored_by_a_run_that_trained_on_them": round2[
            "av_scored_by_a_run_that_trained_on_them"
        ],
        "curate_throughput": {
            "model_free": {k: round1[k] for k in ("clips_per_s", "peak_rss_mib", "cores")},
            "with_runs": {k: round2[k] for k in ("clips_per_s", "peak_rss_mib", "cores")},
        },
        "bootstrap_and_curation_s": round(curation_s, 1),
        "runs": runs,
        "curated_wins": {
            metric: runs["curated"][metric] > runs["faulty"][metric]
            for metric in ("retrieval_r1", "probe_top1")
        },
    }


def _last(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=300, help="of each pretraining compared")
    p.add_argument("--bootstrap-steps", type=int, default=1000, help="of each bootstrap run")
    p.add_argument("--folds", type=int, default=4, help="bootstrap runs, each holding out 1/K")
    p.add_argument("--per-class", type=int, default=192, help="train clips per class")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args()
    results = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="sora_curate_bench_") as root:
            results.append(
                one_seed(
                    pathlib.Path(root),
                    seed,
                    args.steps,
                    args.bootstrap_steps,
                    args.folds,
                    args.per_class,
                )
            )
        print(json.dumps(results[-1]), flush=True)
    table = []
    for r in results:
        f, c = r["runs"]["faulty"], r["runs"]["curated"]
        table.append(
            (
                f"seed {r['seed']}",
                f"retrieval R@1 {f['retrieval_r1']:.3f} -> {c['retrieval_r1']:.3f}, "
                f"probe top-1 {f['probe_top1']:.3f} -> {c['probe_top1']:.3f}",
            )
        )
    result = {
        "benchmark": "curate",
        "machine": common.machine(),
        "steps": args.steps,
        "config": "configs/pretrain_av.py:small",
        "bootstrap_steps": args.bootstrap_steps,
        "bootstrap_folds": args.folds,
        "train_clips_per_class": args.per_class,
        "results": results,
    }
    common.emit(result, args.out, table)


if __name__ == "__main__":
    main()
