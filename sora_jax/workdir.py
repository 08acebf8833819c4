"""A run's work dir, on a local disk or in a bucket: the one place that knows its layout.

Every command (sora-train, sora-eval, sora-export, sora-embed, transfer's init_from) asks
a `Workdir` where a run's files are; none joins a file name to a work dir itself, so a
bucket path is handled in one place and a new file has one name.

  WORKDIR/
    config.json             the run's config (config.py)
    dataset.json            what identifies the data it trained on (classes, splits, prep)
    checkpoints/STEP/       orbax checkpoints, each with sora_sha256.json (checkpoint.py)
    corrupt_checkpoints/    checkpoints that failed their digests, set aside, never deleted
    unverified_checkpoints/ checkpoints without digests (their writer was killed before
                            sealing them), set aside on resume, never deleted
    metrics.jsonl           every step's loss and metrics (rows with "loss"), and each
                            evaluation of config.evals (rows of NAME/METRIC)
    throughput.jsonl        clips/s and input wait per log window
    tensorboard/            event files (and profiler traces)
    eval_SPLIT.json         the last evaluation of SPLIT; confusion_SPLIT_MODE.png
    .lock                   who trains here now (train/ownership.py)
"""

import os

from etils import epath

from sora_jax import storage


class _Place:
    """A fixed name below a work dir's root, read as `workdir.<attribute>`."""

    def __init__(self, name: str):
        self.name = name

    def __get__(self, workdir: "Workdir", owner: type) -> epath.Path:
        return workdir.root / self.name


class Workdir:
    def __init__(self, location: "str | os.PathLike[str] | Workdir"):
        if isinstance(location, Workdir):
            location = location.root
        self.root: epath.Path = storage.absolute(location)

    def __str__(self) -> str:
        return os.fspath(self.root)

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    @property
    def remote(self) -> bool:
        return storage.is_remote(self.root)

    # The layout, one name per place (each a Path below root).
    config = _Place("config.json")
    dataset = _Place("dataset.json")
    checkpoints = _Place("checkpoints")
    corrupt_checkpoints = _Place("corrupt_checkpoints")
    unverified_checkpoints = _Place("unverified_checkpoints")
    metrics = _Place("metrics.jsonl")
    throughput = _Place("throughput.jsonl")
    tensorboard = _Place("tensorboard")
    lock = _Place(".lock")

    def eval_result(self, split: str) -> epath.Path:
        return self.root / f"eval_{split}.json"

    def confusion_png(self, split: str, mode: str) -> epath.Path:
        return self.root / f"confusion_{split}_{mode}.png"

    def has_checkpoints(self) -> bool:
        return self.checkpoints.is_dir()


def checkpoint_choice(text: str) -> int | str:
    """A command's --checkpoint: a step, "latest" (the newest intact checkpoint) or "best"
    (by the run's config.checkpoint.best_metric); an argparse `type`."""
    if text in ("best", "latest"):
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a step, best or latest") from None
