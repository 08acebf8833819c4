"""grain input pipelines over prepared (tfds ArrayRecord) datasets.

Training reads an endless, globally shuffled stream, each process its own shard, in an
order fixed by the seed alone (never by worker timing); its iterator state goes into
checkpoints so a resumed run sees exactly the batches it would have seen. Evaluation
reads every example exactly once over all processes, padding the tail with masked
examples so that every process runs the same number of steps.
"""

import collections
import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Sequence

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from sora_jax import config as config_lib
from sora_jax import process, storage
from sora_jax.media import sampling

log = logging.getLogger("sora_jax")


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    class_names: tuple[str, ...]  # () for an unlabeled dataset (sora-prep --layout unlabeled)
    splits: dict[str, int]
    fps: float
    short_side: int
    jpeg_quality: int
    max_labels_per_clip: int | None = None  # None: not recorded (older or DMVR datasets)
    fingerprint: str = ""  # sora-prep's digest of its inputs and settings ("" for others)
    location: str = ""  # the version folder holding the shards
    metadata_columns: tuple[str, ...] = ()  # a CSV's other columns, kept per clip

    def facts(self) -> dict:
        """What identifies the data a run learned from (kept in WORKDIR/dataset.json)."""
        return {
            "class_names": list(self.class_names),
            "splits": dict(self.splits),
            "fps": self.fps,
            "short_side": self.short_side,
            "jpeg_quality": self.jpeg_quality,
            "fingerprint": self.fingerprint,
        }


def dataset_summary(data_dir: str, name: str) -> DatasetSummary:
    """Class names, split sizes and preparation settings of a prepared dataset."""
    missing = FileNotFoundError(
        f"no prepared dataset {name!r} under {data_dir!r}: run "
        f"`sora-prep SOURCE --out {data_dir} --name {name}` first"
    )
    if not any((storage.path(data_dir) / name).glob("*/dataset_info.json")):
        raise missing  # (tfds's own error lists its whole catalogue of datasets)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # tfds raises several types for "not there"
        raise missing from e
    prep = builder.info.metadata.get("prep", {})
    columns = tuple(builder.info.metadata.get("metadata_columns", ()))
    features = builder.info.features
    return DatasetSummary(
        class_names=tuple(features["label"].names) if "label" in features else (),
        splits={k: v.num_examples for k, v in builder.info.splits.items()},
        fps=float(prep.get("fps", 0.0)),
        short_side=int(prep.get("short_side", 0)),
        metadata_columns=columns,
        jpeg_quality=int(prep.get("jpeg_quality", 90)),
        max_labels_per_clip=builder.info.metadata.get("max_labels_per_clip"),
        fingerprint=str(builder.info.metadata.get("fingerprint", "")),
        location=os.fspath(builder.data_dir),
    )


def shard_problems(summary: DatasetSummary, name: str, splits: Sequence[str]) -> list[str]:
    """Each split's clip count in the dataset's metadata against the records its shards
    hold (an ArrayRecord file's footer says how many): an edited metadata file or a
    replaced shard would otherwise be read silently, part of the split or past its end."""
    from concurrent.futures import ThreadPoolExecutor

    from array_record.python import array_record_module

    def records(path) -> int:
        reader = array_record_module.ArrayRecordReader(os.fspath(path))
        try:
            return reader.num_records()
        finally:
            reader.close()

    problems = []
    for split in splits:
        if split not in summary.splits:
            continue
        shards = sorted(storage.path(summary.location).glob(f"{name}-{split}.array_record-*"))
        try:
            with ThreadPoolExecutor(16) as pool:
                held = sum(pool.map(records, shards))
        except (OSError, RuntimeError, ValueError) as e:
            problems.append(f"dataset {name}, split {split}: a shard cannot be read ({e})")
            continue
        if held != summary.splits[split]:
            problems.append(
                f"dataset {name}, split {split}: its metadata lists {summary.splits[split]} "
                f"clips, its {len(shards)} shards hold {held} (metadata edited, or shards "
                f"replaced or missing under {summary.location}): prepare it again"
            )
    return problems


def dataset_changes(recorded: dict, summary: DatasetSummary) -> list[str]:
    """How the dataset a run reads now differs from the one it was trained on
    (WORKDIR/dataset.json), each difference named; [] when it is the same data."""
    now = summary.facts()
    return [
        f"{key}: {recorded[key]!r} when the run trained, {now[key]!r} now"
        for key in sorted(recorded)
        if key in now and now[key] != recorded[key]
    ]


def _labelled_objectives(config: ml_collections.ConfigDict) -> list[str]:
    from sora_jax import objectives

    return [name for name, (o, _) in objectives.chosen(config).items() if o.uses_labels]


def check_dataset(config: ml_collections.ConfigDict) -> DatasetSummary:
    """Fail before compiling when config and dataset disagree: every disagreement at once,
    each naming its key, so one attempt finds them all."""
    summary = dataset_summary(config.data.dir, config.data.name)
    name, problems = config.data.name, []
    supervised = config_lib.trains_classifier(config)
    if supervised and not summary.class_names:
        problems.append(
            f"config.objectives: {', '.join(_labelled_objectives(config))} read labels, but "
            f"dataset {name} has none (prepared with --layout unlabeled); pretrain on it "
            f"with objectives.supervised.weight=0 (configs/pretrain_av.py)"
        )
    if supervised and summary.class_names and len(summary.class_names) != config.model.num_classes:
        problems.append(
            f"config.model.num_classes: {config.model.num_classes}, but dataset {name} has "
            f"{len(summary.class_names)} classes"
        )
    if abs(summary.fps - config.data.fps) > 1e-6:
        problems.append(
            f"config.data.fps: {config.data.fps}, but dataset {name} was prepared at "
            f"{summary.fps} fps (sora-prep --fps)"
        )
    if summary.short_side and config.data.crop_size > summary.short_side:
        problems.append(
            f"config.data.crop_size: {config.data.crop_size}, but dataset {name} was prepared "
            f"with a short side of {summary.short_side} px: every frame would be upscaled; "
            f"lower crop_size, or prepare again with --short-side >= {config.data.crop_size}"
        )
    for key in ("train_split", "eval_split"):
        if config.data[key] not in summary.splits:
            problems.append(
                f"config.data.{key}: no split {config.data[key]!r} in {name} "
                f"(has {sorted(summary.splits)})"
            )
    from sora_jax import evaluators  # they build on the pipeline

    evaluated = {}
    for key, section in config.get("evals", {}).items():
        if section.get("dataset"):  # another dataset: its evaluator checks it
            continue
        evaluated[f"evals.{key}.split"] = split = section.get("split", "test")
        if split not in summary.splits:
            problems.append(
                f"config.evals.{key}.split: no split {split!r} in {name} "
                f"(has {sorted(summary.splits)})"
            )
    problems += evaluators.data_problems(config)
    problems += _mixture_problems(config, summary)
    if not problems:
        read = dict.fromkeys((config.data.train_split, config.data.eval_split, *evaluated.values()))
        problems += shard_problems(summary, name, tuple(read))
    if problems:
        raise config_lib.ConfigError("\n".join(problems))
    labels, multi = summary.max_labels_per_clip, config.model.multi_label
    if supervised and labels is not None and multi != (labels > 1):
        log.warning(
            "config.model.multi_label=%s, but dataset %s has %s per clip: %s",
            multi,
            name,
            "one label" if labels == 1 else f"up to {labels} labels",
            "a softmax over the classes fits it (multi_label=False)"
            if multi
            else "only each clip's first label is learned; set multi_label=True for all",
        )
    return summary


def _mixture_problems(config: ml_collections.ConfigDict, summary: DatasetSummary) -> list[str]:
    """data.mixture's datasets against the run: each must exist with a train split, at the
    run's fps and a short side its crops fit; a labelled one must have the run's dataset's
    class names (a clip's label is an index into them)."""
    if not config.data.get("mixture", ()):
        return []
    problems = []
    for i, (data_dir, name, weight) in enumerate(mixture(config)):
        key = f"config.data.mixture[{i}]"
        try:
            part = dataset_summary(data_dir, name)
        except FileNotFoundError as e:
            problems.append(f"{key}: {e}")
            continue
        if weight <= 0:
            problems.append(f"{key}: weight {weight} must be positive")
        if abs(part.fps - config.data.fps) > 1e-6:
            problems.append(
                f"{key}: {name} was prepared at {part.fps} fps, the run reads {config.data.fps}"
            )
        if part.short_side and config.data.crop_size > part.short_side:
            problems.append(
                f"{key}: {name} has a short side of {part.short_side} px, below "
                f"config.data.crop_size {config.data.crop_size}"
            )
        if config.data.train_split not in part.splits:
            problems.append(f"{key}: no split {config.data.train_split!r} in {name}")
        if part.class_names and part.class_names != summary.class_names:
            problems.append(
                f"{key}: {name}'s classes {list(part.class_names)[:5]}... are not those of "
                f"{config.data.name}, which the run evaluates on; prepare it with the same "
                "classes, or as unlabeled (--layout unlabeled)"
            )
    return problems


def clip_spec(config: ml_collections.ConfigDict) -> sampling.ClipSpec:
    d = config.data
    return sampling.ClipSpec(
        num_frames=d.num_frames,
        frame_stride=d.frame_stride,
        crop_size=d.crop_size,
        fps=d.fps,
        audio_samples=config_lib.audio_samples(config),
        num_classes=config.model.num_classes,
        multi_label=config.model.multi_label,
    )


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside `absl.app` nobody parsed them."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def data_source(
    config: ml_collections.ConfigDict, split: str, where: tuple[str, str] | None = None
) -> Sequence[dict]:
    """The tfds ArrayRecord data source of a prepared split (random access): of the run's
    dataset, or of `where` (data dir, name)."""
    _ensure_flags_parsed()
    data_dir, name = where or (config.data.dir, config.data.name)
    return _Checked(tfds.data_source(name, split=split, data_dir=data_dir), name, split)


def clip_metadata(data_dir: str, name: str, split: str) -> list[dict[str, str]]:
    """Each clip's metadata (a CSV's other columns) in the split's order, the order
    evaluation reports clips in; {} per clip for a dataset without any."""
    source = tfds.data_source(name, split=split, data_dir=data_dir)
    if not dataset_summary(data_dir, name).metadata_columns:
        return [{} for _ in range(len(source))]
    decode = lambda x: json.loads(x.decode() if isinstance(x, bytes) else x)
    return [decode(source[i]["metadata"]) for i in range(len(source))]


class CorruptDataError(ValueError):
    """A prepared record that does not read back as written (its shard's bytes changed)."""


class _Checked:
    """A data source whose damaged records are named: ArrayRecord checks each chunk's
    hash (Riegeli's), and its error alone says neither which dataset nor what to do."""

    def __init__(self, source, name: str, split: str):
        self.source, self.name, self.split = source, name, split

    def __len__(self) -> int:
        return len(self.source)

    def _damaged(self, what, error: RuntimeError) -> CorruptDataError:
        return CorruptDataError(
            f"dataset {self.name}, split {self.split}, {what}: damaged on disk "
            f"({str(error).splitlines()[0][:160]}); prepare the dataset again"
        )

    def __getitem__(self, i: int):
        try:
            return self.source[i]
        except RuntimeError as e:
            raise self._damaged(f"record {i}", e) from None

    def __getitems__(self, keys):
        try:
            return self.source.__getitems__(keys)
        except RuntimeError as e:
            raise self._damaged(f"records {list(keys)[:4]}...", e) from None


def mixture(config: ml_collections.ConfigDict) -> list[tuple[str, str, float]]:
    """The datasets training reads, as (data dir, name, weight): data.mixture, or the
    run's one dataset."""
    parts = config.data.get("mixture", ())
    if not parts:
        return [(config.data.dir, config.data.name, 1.0)]
    return [(p["dir"], p["name"], float(p["weight"])) for p in parts]


class _TrainClip(grain.transforms.RandomMap):
    """One random window of a clip, or `views` of them stacked on a view axis [V, ...]
    (the label once)."""

    def __init__(self, spec: sampling.ClipSpec, min_scale: float, flip: bool, views: int = 1):
        self.spec, self.min_scale, self.flip, self.views = spec, min_scale, flip, views

    def random_map(self, example, rng: np.random.Generator):
        clips = [
            sampling.train_clip(example, self.spec, rng, self.min_scale, self.flip)
            for _ in range(self.views)
        ]
        if self.views == 1:
            return clips[0]
        stacked = {k: np.stack([c[k] for c in clips]) for k in clips[0] if k != "label"}
        return stacked | {"label": clips[0]["label"]}


def _workers_exit_with_us():
    """grain's worker_init_fn: each decoding worker exits if this process is killed."""
    return functools.partial(process.exit_with_parent, os.getpid())


DEVICE_READ_AHEAD = 2  # global batches DevicePrefetch puts on the devices ahead of a step


def train_dataset(config: ml_collections.ConfigDict, local_batch_size: int) -> grain.IterDataset:
    """Endless shuffled training batches for this process.

    One global stream (shuffled per epoch and augmented per element from the seed alone)
    is cut into global batches; process p reads only its slice of each (ShardByJaxProcess
    gives p and the process count). So the assembled global batch, and the loss curve,
    are the same for any number of processes and any number of worker processes.
    """
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
    global_batch = local_batch_size * shard.shard_count
    # A finite repeat lets the per-process slice below index the stream. It holds every
    # step's batch and those DevicePrefetch reads ahead of the last step, for a split of
    # any size (one smaller than a batch included), plus a spare epoch for rounding.
    needed = (config.total_steps + DEVICE_READ_AHEAD) * global_batch  # clips
    parts = mixture(config)
    total = sum(weight for _, _, weight in parts)
    streams = []
    for i, (data_dir, name, weight) in enumerate(parts):
        source = data_source(config, config.data.train_split, (data_dir, name))
        if config.data.folds:
            source = _HeldOut(source, config.data.folds, config.data.holdout_fold)
        epochs = math.ceil(needed * weight / total / len(source)) + 1
        seed = config.seed + i  # the first dataset's order is a lone dataset's
        streams.append(grain.MapDataset.source(source).shuffle(seed=seed).repeat(epochs))
    # Several datasets: interleaved in proportion to their weights, each in its own
    # shuffled order; clips of an unlabeled one have label -1 (no supervised loss).
    stream = (
        streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, [w for *_, w in parts])
    )
    ds = (
        stream.random_map(
            _TrainClip(
                clip_spec(config),
                config.data.min_crop_scale,
                config.data.flip,
                config.data.train_views,
            ),
            seed=config.seed,
        ).batch(local_batch_size, drop_remainder=True)
    )[shard.shard_index :: shard.shard_count]
    it = ds.to_iter_dataset()
    if config.data.workers > 0:
        it = it.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.workers), _workers_exit_with_us()
        )
    return it


class _HeldOut:
    """A data source without one fold: clip i is in fold i % folds (data.folds)."""

    def __init__(self, source, folds: int, holdout: int):
        self.source, self.folds, self.holdout = source, folds, holdout
        self.length = len(source) - len(range(holdout, len(source), folds))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        # the i-th clip not in the held-out fold: each run of `folds` clips gives folds - 1
        row, col = divmod(i, self.folds - 1)
        return self.source[row * self.folds + col + (col >= self.holdout)]


def in_training_fold(index: int, folds: int, holdout: int) -> bool:
    """Did a run with data.folds=`folds`, data.holdout_fold=`holdout` train on clip `index`
    of its train split?"""
    return not folds or index % folds != holdout


class _Prefix:
    """The first `length` examples of a data source."""

    def __init__(self, source, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        return self.source[i]


class _PaddedShard:
    """This process's contiguous block of a split, padded to a whole number of batches;
    padding repeats a real example and is marked invalid."""

    def __init__(self, source, start: int, length: int):
        self.source, self.start, self.length = source, start, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        index = self.start + i
        valid = index < len(self.source)
        return self.source[index if valid else len(self.source) - 1], valid, index


def eval_batches_per_process(num_examples: int, local_batch_size: int) -> int:
    return max(1, math.ceil(num_examples / jax.process_count() / local_batch_size))


def eval_dataset(
    config: ml_collections.ConfigDict,
    split: str,
    local_batch_size: int,
    repeat: bool = False,
    limit: int | None = None,
) -> grain.IterDataset:
    """Multi-view evaluation batches; every example (of the first `limit`, if given)
    appears once over all processes in each pass of `eval_batches_per_process` batches.
    With `repeat` the passes go on forever, so one iterator (and its worker processes)
    serves every evaluation of a run."""
    source = data_source(config, split)
    if limit is not None and limit < len(source):
        source = _Prefix(source, limit)
    batches = eval_batches_per_process(len(source), local_batch_size)
    per_process = batches * local_batch_size
    shard = _PaddedShard(source, jax.process_index() * per_process, per_process)
    spec = clip_spec(config)
    d = config.data

    def views(item):
        example, valid, index = item
        out = sampling.eval_views(example, spec, d.eval_temporal_views, d.eval_spatial_views)
        return out | {"valid": np.bool_(valid), "index": np.int32(index)}

    ds = grain.MapDataset.source(shard).map(views).batch(local_batch_size)
    if repeat:
        ds = ds.repeat()
    # Read ahead a couple of batches, not grain's default 500: a repeated pass would
    # otherwise go on decoding the next evaluation's clips while training runs. (As many
    # reader threads as batches read ahead: more could never be busy, grain warns.)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if d.workers > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=d.workers), _workers_exit_with_us()
        )
    return ds


def to_global(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict:
    """Each process's NumPy batch -> one global jax.Array per key, split over the batch."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


class DevicePrefetch:
    """Global batches put on the devices `size` steps ahead, so the host-to-device copy of
    the next batch overlaps the step that is running (flax's `prefetch_to_device`,
    big_vision's `start_global`).

    Checkpoints see the reader as if nothing were read ahead: `get_state` is the state
    after the last batch handed out, so a resumed run starts with the batch that comes
    next. It is the interface grain's orbax handler saves and restores.
    """

    def __init__(
        self,
        iterator: grain.DatasetIterator,
        sharding: jax.sharding.Sharding,
        size: int = DEVICE_READ_AHEAD,
    ):
        self._iterator, self._sharding, self._size = iterator, sharding, size
        self._ahead: collections.deque = collections.deque()  # (global batch, state after it)
        self._state = iterator.get_state()

    def __iter__(self) -> "DevicePrefetch":
        return self

    def __next__(self) -> dict:
        while len(self._ahead) < self._size:
            batch = to_global(next(self._iterator), self._sharding)  # asynchronous copy
            self._ahead.append((batch, self._iterator.get_state()))
        batch, self._state = self._ahead.popleft()
        return batch

    def get_state(self) -> bytes:
        return json.dumps(self._state).encode()

    def set_state(self, state: bytes) -> None:
        self._ahead.clear()
        self._state = json.loads(state)
        self._iterator.set_state(self._state)

    def start_prefetch(self) -> None:
        """Called by grain's handler after a restore: start the workers reading again."""
        start = getattr(self._iterator, "start_prefetch", None)
        if start is not None:
            start()

    def close(self) -> None:
        self._ahead.clear()
        self._iterator.close()
