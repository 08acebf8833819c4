"""Evaluation: full, audio-only and video-only scores of one split from one set of
parameters. It imports nothing of the trainer: both build on train/setup.py, and an
`Evaluator` is made once per run (its step compiled once, its data workers kept) and
called at every evaluation.
"""

import pathlib
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from sora_jax.data import pipeline
from sora_jax.train import metrics as metrics_lib
from sora_jax.train.setup import Setup
from sora_jax.train.step import make_eval_step

MODES = ("full", "audio_only", "video_only")
_PER_PROCESS = ("label", "valid", "index")  # host-side keys, never sent to the devices


class Evaluator:
    """Metrics of one split for any parameters of this run's model."""

    def __init__(
        self,
        run: Setup,
        config: ml_collections.ConfigDict,
        split: str,
        class_names: Sequence[str],
    ):
        self.config, self.split, self.class_names = config, split, tuple(class_names)
        d = config.data
        local_batch = d.eval_batch_size // jax.process_count()
        self.batches = pipeline.eval_batches_per_process(
            len(pipeline.data_source(config, split)), local_batch
        )
        self._sharding = run.batch_sharding
        # One jitted step for the evaluator's life: compiled at the first evaluation only.
        self._step = make_eval_step(run.model, config.model.multi_label, run.mesh)
        self._batches = iter(pipeline.eval_dataset(config, split, local_batch, repeat=True))

    def scores(self, params: dict) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Clip scores for every example of the split exactly once: {mode: [N, C]}, labels."""
        scores = {m: [] for m in MODES}
        local = {k: [] for k in _PER_PROCESS}
        for _ in range(self.batches):
            batch = next(self._batches)
            for k in _PER_PROCESS:
                local[k].append(batch[k])
            inputs = {k: v for k, v in batch.items() if k not in _PER_PROCESS}
            out = jax.device_get(self._step(params, pipeline.to_global(inputs, self._sharding)))
            for m in MODES:
                scores[m].append(out[m])  # [global batch, C], process 0's rows first
        # Labels live with the process that read them: gather all of them once, then
        # lay them out as the scores are, batch by batch and process by process.
        gathered = multihost_utils.process_allgather({k: np.stack(v) for k, v in local.items()})
        extra = {
            k: np.swapaxes(np.asarray(v), 0, 1).reshape(-1, *np.shape(v)[3:])
            for k, v in gathered.items()
        }  # [processes, batches, local batch, ...] -> [batches * processes * local batch, ...]
        keep = extra["valid"]
        order = np.argsort(extra["index"][keep], kind="stable")
        result = {m: np.concatenate(scores[m])[keep][order] for m in MODES}
        return result, extra["label"][keep][order]

    def __call__(
        self, params: dict, out_dir: str | pathlib.Path | None = None, step: int | None = None
    ) -> dict:
        """Metrics for all three input modes; PNG confusion matrices if `out_dir` is given."""
        scores, labels = self.scores(params)
        results = {}
        for mode in MODES:
            report = metrics_lib.classification_report(
                scores[mode], labels, self.class_names, self.config.model.multi_label
            )
            if out_dir is not None and "confusion_matrix" in report and jax.process_index() == 0:
                metrics_lib.save_confusion_png(
                    report["confusion_matrix"],
                    self.class_names,
                    pathlib.Path(out_dir) / f"confusion_{self.split}_{mode}.png",
                    f"{self.config.data.name} {self.split} ({mode.replace('_', '-')}), step {step}",
                )
            results[mode] = report
        summary = dict(results["full"])
        summary.update(
            split=self.split,
            step=step,
            audio_only=results["audio_only"],
            video_only=results["video_only"],
        )
        return summary

    def close(self) -> None:
        """Stop the data workers."""
        self._batches.close()


def brief(result: dict) -> dict:
    """The headline numbers of a report."""
    keep = ("top1", "top5", "map", "num_examples")
    return {k: result[k] for k in keep if k in result}
