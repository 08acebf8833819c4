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
    metrics.jsonl           every step's loss and metrics
    throughput.jsonl        clips/s and input wait per log window
    tensorboard/            event files (and profiler traces)
    eval_SPLIT.json         the last evaluation of SPLIT; confusion_SPLIT_MODE.png
    .lock                   who trains here now (train/ownership.py)
"""

import os

from etils import epath

from sora_jax import storage


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

    @property
    def config(self) -> epath.Path:
        return self.root / "config.json"

    @property
    def dataset(self) -> epath.Path:
        return self.root / "dataset.json"

    @property
    def checkpoints(self) -> epath.Path:
        return self.root / "checkpoints"

    @property
    def corrupt_checkpoints(self) -> epath.Path:
        return self.root / "corrupt_checkpoints"

    @property
    def unverified_checkpoints(self) -> epath.Path:
        return self.root / "unverified_checkpoints"

    @property
    def metrics(self) -> epath.Path:
        return self.root / "metrics.jsonl"

    @property
    def throughput(self) -> epath.Path:
        return self.root / "throughput.jsonl"

    @property
    def tensorboard(self) -> epath.Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> epath.Path:
        return self.root / ".lock"

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
