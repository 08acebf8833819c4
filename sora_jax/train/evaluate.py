"""Evaluation: full, audio-only and video-only scores from one checkpoint.

  sora-eval --workdir DIR [--split test] [--checkpoint STEP]

prints a summary, writes DIR/eval_<split>.json and confusion-matrix PNGs, and prints one
JSON object on the last line of stdout.
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sora_jax.data import pipeline
from sora_jax.models import SoraModel
from sora_jax.train import metrics as metrics_lib
from sora_jax.train.sharding import batch_sharding
from sora_jax.train.step import make_eval_step

MODES = ("full", "audio_only", "video_only")


def evaluation_scores(
    model: SoraModel, params: dict, config: ml_collections.ConfigDict, split: str, mesh: Mesh
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Clip scores for every example of `split` exactly once: {mode: [N, C]}, labels."""
    local_batch = config.data.eval_batch_size // jax.process_count()
    eval_step = make_eval_step(model, config.model.multi_label, mesh)
    sharding = batch_sharding(mesh)
    scores = {m: [] for m in MODES}
    labels, valid, index = [], [], []
    for local in pipeline.eval_dataset(config, split, local_batch):
        batch = pipeline.to_global(
            {k: v for k, v in local.items() if k not in ("label", "valid", "index")}, sharding
        )
        out = jax.device_get(eval_step(params, batch))
        for m in MODES:
            scores[m].append(out[m])
        # Labels and validity are per process; gather them to match the global scores.
        extra = multihost_utils.process_allgather(
            {"label": local["label"], "valid": local["valid"], "index": local["index"]}, tiled=True
        )
        labels.append(extra["label"])
        valid.append(extra["valid"])
        index.append(extra["index"])
    keep = np.concatenate(valid)
    order = np.argsort(np.concatenate(index)[keep], kind="stable")
    result = {m: np.concatenate(scores[m])[keep][order] for m in MODES}
    return result, np.concatenate(labels)[keep][order]


def evaluate(
    model: SoraModel,
    params: dict,
    config: ml_collections.ConfigDict,
    split: str,
    mesh: Mesh,
    class_names: Sequence[str],
    out_dir: str | pathlib.Path | None = None,
    step: int | None = None,
) -> dict:
    """Metrics for all three input modes; PNG confusion matrices if `out_dir` is given."""
    scores, labels = evaluation_scores(model, params, config, split, mesh)
    results = {}
    for mode in MODES:
        report = metrics_lib.classification_report(
            scores[mode], labels, class_names, config.model.multi_label
        )
        if out_dir is not None and "confusion_matrix" in report and jax.process_index() == 0:
            metrics_lib.save_confusion_png(
                report["confusion_matrix"],
                class_names,
                pathlib.Path(out_dir) / f"confusion_{split}_{mode}.png",
                f"{config.data.name} {split} ({mode.replace('_', '-')}), step {step}",
            )
        results[mode] = report
    summary = dict(results["full"])
    summary.update(
        split=split, step=step, audio_only=results["audio_only"], video_only=results["video_only"]
    )
    return summary


def _brief(result: dict) -> dict:
    keep = ("top1", "top5", "map", "num_examples")
    return {k: result[k] for k in keep if k in result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sora-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", required=True, help="a sora-train work dir")
    parser.add_argument("--split", default=None, help="default: the config's data.eval_split")
    parser.add_argument("--checkpoint", type=int, default=None, help="step (default: latest)")
    parser.add_argument("--data-dir", default=None, help="override config.data.dir")
    args = parser.parse_args(argv)

    from sora_jax import config as config_lib
    from sora_jax.train import trainer

    config = config_lib.load(args.workdir)
    if args.data_dir:
        config.data.dir = args.data_dir
    trainer.maybe_initialize_distributed(config)
    split = args.split or config.data.eval_split
    model, params, step, mesh, summary = trainer.load_for_inference(
        config, args.workdir, args.checkpoint
    )
    result = evaluate(model, params, config, split, mesh, summary.class_names, args.workdir, step)
    if jax.process_index() == 0:
        path = pathlib.Path(args.workdir) / f"eval_{split}.json"
        path.write_text(json.dumps(result, indent=1))
        for mode in MODES:
            r = result if mode == "full" else result[mode]
            print(
                f"{mode:<11} top1 {r['top1']:.4f}  "
                + (f"top5 {r['top5']:.4f}  " if "top5" in r else "")
                + f"mAP {r['map']:.4f}  ({r['num_examples']} clips)",
                file=sys.stderr,
            )
        brief = _brief(result) | {
            "split": split,
            "step": step,
            "audio_only": _brief(result["audio_only"]),
            "video_only": _brief(result["video_only"]),
            "details": str(path),
        }
        print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    sys.exit(main())
