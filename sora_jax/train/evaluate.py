"""Evaluation of one split from one set of parameters: full, audio-only and video-only
class scores (supervised runs); cross-modal retrieval and k-nearest-neighbour top-1
(contrastive runs). It imports nothing of the trainer: both build on train/setup.py, and an
`Evaluator` is made once per run (its step compiled once, its data workers kept) and
called at every evaluation.
"""

import collections
import logging
import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sora_jax import config as config_lib
from sora_jax import evaluators
from sora_jax.data import pipeline
from sora_jax.train import fit, representation
from sora_jax.train import metrics as metrics_lib
from sora_jax.train.setup import Setup
from sora_jax.train.step import abstract_batch, make_eval_step
from sora_jax.workdir import Workdir

log = logging.getLogger("sora_jax")

MODES = ("full", "audio_only", "video_only")
_PER_PROCESS = ("label", "valid", "index")  # host-side keys, never sent to the devices


def compile_eval_step(run: Setup, config: ml_collections.ConfigDict) -> jax.stages.Compiled:
    """The eval step compiled for data.eval_batch_size clips x their views before anything
    is allocated, and checked against the devices' memory (fit.py): ConfigError if it
    cannot fit. Runs with the parameters' shardings and the inputs _SplitReader sends."""
    d = config.data
    views = d.eval_temporal_views * d.eval_spatial_views
    batch = abstract_batch(config, run.inputs, d.eval_batch_size, run.batch_sharding, views)
    inputs = {k: v for k, v in batch.items() if k not in _PER_PROCESS}
    step = make_eval_step(run.model, config, run.mesh)
    devices = list(run.mesh.devices.flat)
    options = fit.compiler_options(devices, config.cpu_fast_compile)
    compiled, report = fit.compile_step(step, run.abstract_state.params, inputs, options=options)
    fit.check_fits("eval step", report, devices, config, *fit.EVAL_KEYS)
    return compiled


class _SplitReader:
    """One split's multi-view batches over all processes, every example exactly once per
    pass; its workers live as long as the reader."""

    def __init__(self, config: ml_collections.ConfigDict, split: str, run: Setup, limit=None):
        local_batch = config.data.eval_batch_size // jax.process_count()
        size = len(pipeline.data_source(config, split))
        self.size = size if limit is None else min(size, limit)
        self.batches = pipeline.eval_batches_per_process(self.size, local_batch)
        self._sharding = run.batch_sharding
        self._iterator = iter(
            pipeline.eval_dataset(config, split, local_batch, repeat=True, limit=self.size)
        )

    def run(self, step, params) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """`step`'s per-clip outputs for every example once, in the split's order:
        ({key: [N, ...]}, labels [N, ...])."""
        outputs, local = collections.defaultdict(list), {k: [] for k in _PER_PROCESS}
        for _ in range(self.batches):
            batch = next(self._iterator)
            for k in _PER_PROCESS:
                local[k].append(batch[k])
            inputs = {k: v for k, v in batch.items() if k not in _PER_PROCESS}
            out = jax.device_get(step(params, pipeline.to_global(inputs, self._sharding)))
            for k, v in out.items():
                outputs[k].append(v)  # [global batch, ...], process 0's rows first
        # Labels live with the process that read them: gather all of them once, then
        # lay them out as the outputs are, batch by batch and process by process.
        gathered = multihost_utils.process_allgather({k: np.stack(v) for k, v in local.items()})
        extra = {
            k: np.swapaxes(np.asarray(v), 0, 1).reshape(-1, *np.shape(v)[3:])
            for k, v in gathered.items()
        }  # [processes, batches, local batch, ...] -> [batches * processes * local batch, ...]
        keep = extra["valid"]
        order = np.argsort(extra["index"][keep], kind="stable")
        result = {k: np.concatenate(v)[keep][order] for k, v in outputs.items()}
        return result, extra["label"][keep][order]

    def close(self) -> None:
        self._iterator.close()


class Evaluator:
    """Metrics of one split for any parameters of this run's model: classification
    (runs with a supervised loss) and representation measures (runs with a contrastive
    loss: cross-modal retrieval, and k-nearest-neighbour top-1 when the data is labelled).
    """

    def __init__(
        self,
        run: Setup,
        config: ml_collections.ConfigDict,
        split: str,
        class_names: Sequence[str],
        step: jax.stages.Compiled | None = None,  # compile_eval_step(), if compiled already
    ):
        self.config, self.split, self.class_names = config, split, tuple(class_names)
        self.classify = config_lib.trains_classifier(config)
        self.represent = config_lib.trains_alignment(config)
        # One compiled step for the evaluator's life.
        self._step = compile_eval_step(run, config) if step is None else step
        self._reader = _SplitReader(config, split, run)
        self.batches = self._reader.batches
        # kNN needs single labels on both sides; the bank is the train split's first clips.
        self._bank = None
        if self.represent and self.class_names and not config.model.multi_label:
            self._bank = _SplitReader(
                config, config.data.train_split, run, limit=config.eval.knn_bank_size
            )

    def scores(self, params: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Clip scores for every example of the split exactly once: {mode: [N, C]}, labels."""
        outputs, labels = self._reader.run(self._step, params)
        return {m: outputs[m] for m in MODES}, labels

    def __call__(
        self, params: dict, out_dir: "str | os.PathLike[str] | None" = None, step: int | None = None
    ) -> dict:
        """Every measure that applies; PNG confusion matrices in work dir `out_dir`, if
        given."""
        outputs, labels = self._reader.run(self._step, params)
        summary = {}
        if self.classify:
            summary = self._classification(outputs, labels, out_dir, step)
        summary.update(split=self.split, step=step)
        if self.represent:
            retrieval = representation.retrieval_report(
                outputs["video_projection"],
                outputs["audio_projection"],
                outputs["has_video"] & outputs["has_audio"],
            )
            summary["retrieval"] = retrieval
            if "warning" in retrieval and jax.process_index() == 0:
                log.warning("retrieval on %s: %s", self.split, retrieval["warning"])
            summary["retrieval_r1"] = (retrieval.get("v2a_r1", 0) + retrieval.get("a2v_r1", 0)) / 2
            if self._bank is not None:
                summary["knn"] = self._knn(outputs, labels, params)
        return summary

    def _classification(self, outputs, labels, out_dir, step) -> dict:
        results = metrics_lib.classification_by_mode(
            outputs, labels, self.class_names, self.config.model.multi_label
        )
        for mode, report in results.items():
            if out_dir is not None and "confusion_matrix" in report and jax.process_index() == 0:
                metrics_lib.save_confusion_png(
                    report["confusion_matrix"],
                    self.class_names,
                    Workdir(out_dir).confusion_png(self.split, mode),
                    f"{self.config.data.name} {self.split} ({mode.replace('_', '-')}), step {step}",
                )
        return dict(results["full"]) | {
            "audio_only": results["audio_only"],
            "video_only": results["video_only"],
        }

    def _knn(self, outputs: dict, labels: np.ndarray, params: dict) -> dict:
        """Top-1 of each held-out clip's k nearest train clips, for the fused embedding
        and each sense's alone (clips missing that sense left out)."""
        bank, bank_labels = self._bank.run(self._step, params)
        k, classes = self.config.eval.knn_k, len(self.class_names)
        report = {"k": k, "bank_size": len(bank_labels), "num_examples": len(labels)}
        for name, key, has in (
            ("top1", "embedding", None),
            ("video_top1", "video_embedding", "has_video"),
            ("audio_top1", "audio_embedding", "has_audio"),
        ):
            query = np.ones(len(labels), bool) if has is None else outputs[has]
            known = np.ones(len(bank_labels), bool) if has is None else bank[has]
            report[name] = representation.knn_top1(
                outputs[key][query], labels[query], bank[key][known], bank_labels[known], k, classes
            )
        return report

    def close(self) -> None:
        """Stop the data workers."""
        self._reader.close()
        if self._bank is not None:
            self._bank.close()


def plugin_context(
    run: Setup, config: ml_collections.ConfigDict, class_names: Sequence[str]
) -> evaluators.Context:
    """What the evaluators of config.evals get: the model's apply, the mesh, and readers of
    a split's batches (every clip once per pass, workers kept for the reader's life)."""
    return evaluators.Context(
        config=config,
        apply=run.model.apply,
        mesh=run.mesh,
        batch_sharding=run.batch_sharding,
        class_names=tuple(class_names),
        reader=lambda split, dataset=None, limit=None: _SplitReader(
            with_dataset(config, dataset), split, run, limit
        ),
    )


def with_dataset(
    config: ml_collections.ConfigDict, dataset: tuple[str, str] | None
) -> ml_collections.ConfigDict:
    """`config` reading another prepared dataset (dir, name), or itself for None."""
    if dataset is None:
        return config
    other = config.copy_and_resolve_references()
    other.data.update(dir=dataset[0], name=dataset[1], mixture=())
    return other


def run_evaluators(built: dict, names: Sequence[str], params: dict) -> dict[str, dict]:
    """name -> metrics of each evaluator in `names`."""
    return {name: built[name](params) for name in names}


def scores(result: dict) -> dict[str, float]:
    """What a checkpoint is ranked by: the built-in measures (config.METRICS) and every
    evaluator's metrics as NAME/METRIC."""
    flat = {k: result[k] for k in config_lib.METRICS if k in result}
    return flat | evaluators.flatten(result.get("evals", {}))


def _top1(report: dict) -> str:
    return f"{report['top1']:.4f}" if "top1" in report else "n/a, no clip has it"


def brief(result: dict) -> dict:
    """The headline numbers of a report."""
    keep = ("top1", "top5", "map", "num_examples")
    return {k: result[k] for k in keep if k in result}


def headline(result: dict) -> str:
    """An evaluation in one line: classification top-1s, retrieval recall@1, kNN top-1."""
    parts = []
    if "top1" in result:
        parts.append(
            f"top1 {result['top1']:.4f} (audio-only {_top1(result['audio_only'])}, "
            f"video-only {_top1(result['video_only'])})"
        )
    if "retrieval" in result:
        r = result["retrieval"]
        parts.append(
            f"retrieval r@1 video->audio {r.get('v2a_r1', 0):.4f}, audio->video "
            f"{r.get('a2v_r1', 0):.4f} ({r['num_examples']} clips)"
        )
    if "knn" in result:
        k = result["knn"]
        parts.append(
            f"kNN top1 {k['top1']:.4f} (video {k['video_top1']:.4f}, audio {k['audio_top1']:.4f})"
        )
    for name, metrics in result.get("evals", {}).items():
        shown = [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
        if "worst" in metrics:  # slices: the worst slice and its gap
            worst = metrics["worst"]
            shown.append(f"worst {metrics['column']}={worst['slice']} (gap {metrics['gap']:.4g})")
        parts.append(f"{name}: {', '.join(shown) or metrics}")
    return "; ".join(parts)
