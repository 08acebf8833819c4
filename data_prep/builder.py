"""The tfds dataset builder: decoded clips -> ArrayRecord shards with class names,
splits, counts and the preparation settings in the dataset's metadata."""

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import tempfile
import types
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_prep.layouts import Entry
from data_prep.worker import PrepSettings, prepare_entry
from sora_jax import process, storage
from sora_jax.lease import LEASE_S, BucketLease

VERSION = "1.0.0"

# One unit of work (a file, a record) -> (report row, example or None if skipped).
Work = Callable[[object], tuple[dict, dict | None]]


def features(
    class_names: list[str], metadata_columns: Sequence[str] = ()
) -> tfds.features.FeaturesDict:
    """The stored example. Frames stay JPEG bytes so the input pipeline decodes only the
    frames a training window uses; audio is the 16 kHz waveform (log-mel is the model's),
    stored as raw bytes: as a list of integers (tfds's default) parsing it took 70% of
    the input pipeline's time per clip (BENCHMARKS.md). An unlabeled dataset (no class
    names: `--layout unlabeled`, for pretraining) has no label features at all. A CSV's
    other columns are kept per clip as one JSON object, `metadata` (only in datasets that
    have such columns)."""
    labels = {}
    if class_names:
        labels = {
            "label": tfds.features.ClassLabel(names=class_names),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
        }
    return tfds.features.FeaturesDict(
        {
            "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "audio": tfds.features.Tensor(
                shape=(None,), dtype=np.int16, encoding=tfds.features.Encoding.BYTES
            ),
            **labels,
            "has_audio": np.bool_,
            "num_frames": np.int32,
            "path": tfds.features.Text(),
            **({"metadata": tfds.features.Text()} if metadata_columns else {}),
        }
    )


class SoraVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds any prepared video dataset; `make_builder` names a subclass per dataset.

    `split_items` gives, per split, a function returning that split's work items (files,
    or records of a TFRecord), and `work` turns one item into (report row, example).
    """

    VERSION = tfds.core.Version(VERSION)

    def __init__(
        self,
        *,
        split_items: dict[str, Callable[[], Iterable]],
        class_names: list[str],
        work: Work,
        settings: PrepSettings,
        workers: int = 0,
        fingerprint: str = "",
        beam_options: str | None = None,
        max_labels_per_clip: int | None = None,
        metadata_columns: Sequence[str] = (),
        **kwargs,
    ):
        self._max_labels_per_clip = max_labels_per_clip
        self._metadata_columns = tuple(metadata_columns)
        self._beam_options = beam_options
        self._split_items = split_items
        self._class_names = class_names
        self._work = work
        self._settings = settings
        self._workers = workers
        self._fingerprint = fingerprint
        self._pool = None
        self.report: list[dict] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Video clips prepared by sora-prep (sora_jax).",
            features=features(self._class_names, self._metadata_columns),
            metadata=tfds.core.MetadataDict(
                prep=dataclasses.asdict(self._settings),
                sample_rate=16_000,
                fingerprint=self._fingerprint,
                # 1: single-label data (what model.multi_label is checked against); None:
                # not known before reading the records (DMVR)
                max_labels_per_clip=self._max_labels_per_clip,
                metadata_columns=list(self._metadata_columns),
            ),
        )

    def _split_generators(self, dl_manager):
        generators = {}
        for split in sorted(self._split_items):
            all_items = self._split_items[split]()
            items = iter(all_items)
            # tfds cannot write an empty split, so work (in this process) up to the
            # split's first usable item; a split with none is left out, and reported.
            head, head_items = [], []
            for item in items:
                head_items.append(item)
                head.append(self._work(item))
                if head[-1][1] is not None:
                    break
            if not head or head[-1][1] is None:
                self.report.extend(row for row, _ in head)
                continue
            if self._beam_options is None:
                total = len(all_items) if isinstance(all_items, list) else None  # for the ETA
                generators[split] = self._generate_examples(split, head, items, total)
            else:
                generators[split] = _BeamSplit(
                    [*head_items, *items], self._work, self._beam_report_dir / split
                )
        return generators

    def _generate_examples(self, split: str, head: list, rest: Iterable, total: int | None):
        results = (
            self._pool.imap(self._work, rest, chunksize=4) if self._pool else map(self._work, rest)
        )
        for row, example in tqdm.tqdm(
            itertools.chain(head, results),
            total=total,
            desc=f"decoding {split}",
            unit="clip",
            dynamic_ncols=True,
        ):
            self.report.append(row)
            if example is not None:
                yield example["path"], example

    @property
    def _beam_report_dir(self) -> pathlib.Path:
        # data_dir is a local staging folder, also when the dataset goes to a bucket
        return pathlib.Path(self.data_dir).parent / ".beam_report"

    def build(self) -> None:
        """download_and_prepare with `workers` decoding processes, or on Apache Beam."""
        tfds.disable_progress_bar()  # ours shows clips decoded and the rate
        if self._beam_options is not None:
            self._build_on_beam()
            return
        with contextlib.ExitStack() as stack:
            if self._workers > 1:
                # spawn: workers import only PyAV/NumPy/PIL, never a forked TensorFlow.
                context = multiprocessing.get_context("spawn")
                # Each worker exits if sora-prep is killed (process.exit_with_parent).
                pool = context.Pool(self._workers, process.exit_with_parent, (os.getpid(),))
                self._pool = stack.enter_context(pool)
            # Nothing is downloaded; a scratch download dir keeps DATA_DIR free of tfds's
            # otherwise empty `downloads/` folder.
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="sora_prep_"))
            self.download_and_prepare(download_dir=scratch)
            self._pool = None

    def _build_on_beam(self) -> None:
        import shlex  # late imports: Beam is an optional extra

        from apache_beam.options.pipeline_options import PipelineOptions

        shutil.rmtree(self._beam_report_dir, ignore_errors=True)
        options = PipelineOptions(shlex.split(self._beam_options))
        with tempfile.TemporaryDirectory(prefix="sora_prep_") as scratch:
            self.download_and_prepare(
                download_dir=scratch,
                download_config=tfds.download.DownloadConfig(beam_options=options),
            )
        for path in sorted(self._beam_report_dir.rglob("rows*")):
            self.report.extend(json.loads(line) for line in path.read_text().splitlines())
        shutil.rmtree(self._beam_report_dir, ignore_errors=True)


def _BeamSplit(items: list, work: Work, report_dir: pathlib.Path):  # noqa: N802 (a transform)
    """The Beam version of _generate_examples: work on every item in parallel, write the
    report rows as a side output, and hand tfds the (key, example) pairs."""
    import apache_beam as beam

    class BuildSplit(beam.PTransform):
        def expand(self, pipeline):
            results = pipeline | "items" >> beam.Create(items) | "work" >> beam.Map(work)
            _ = (
                results
                | "rows" >> beam.Map(lambda result: json.dumps(result[0]))
                | "report" >> beam.io.WriteToText(str(report_dir / "rows"))
            )
            return (
                results
                | "kept" >> beam.Filter(lambda result: result[1] is not None)
                | "keyed" >> beam.Map(lambda result: (result[1]["path"], result[1]))
            )

    return BuildSplit()


def make_builder(name: str, data_dir: str, **kwargs) -> SoraVideoBuilder:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset name {name!r} must be snake_case ([a-z][a-z0-9_]*)")
    cls = types.new_class(
        "Sora_" + name,
        (SoraVideoBuilder,),
        {"skip_registration": True},
        lambda ns: ns.update(name=name, __module__=__name__),
    )
    return cls(data_dir=data_dir, file_format="array_record", **kwargs)


def fingerprint(facts: Iterable, settings: PrepSettings) -> str:
    """Changes when any input, label, split or setting does: decides re-use."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for fact in facts:
        h.update(json.dumps(fact, default=str).encode())
    return h.hexdigest()


def file_facts(path: pathlib.Path) -> list:
    stat = path.stat() if path.exists() else None
    return [str(path), stat and stat.st_size, stat and stat.st_mtime_ns]


# What tfds writes beside the shards, in the order a bucket gets them last: a reader finds
# a dataset by its dataset_info.json, so that goes up after everything it describes.
INFO_FILES = ("features.json", "metadata.json", "dataset_info.json")


def build_if_changed(
    data_dir: "str | os.PathLike[str]", name: str, digest: str, **builder_kwargs
) -> tuple[list[dict], bool]:
    """Build unless a dataset with the same fingerprint exists: (report rows, rebuilt?).
    `data_dir` is a local path or a gs:// URL."""
    out = storage.absolute(data_dir)
    report_path = out / f"{name}_report.json"
    info_path = out / name / VERSION / "metadata.json"
    up_to_date = (
        info_path.exists()
        and report_path.exists()
        and json.loads(info_path.read_text()).get("fingerprint") == digest
    )
    if up_to_date:
        return json.loads(report_path.read_text()), False
    if storage.is_remote(out):
        with _one_bucket_builder(out, name) as lease:
            return _build_to_bucket(out, name, digest, lease, **builder_kwargs), True
    data_dir = pathlib.Path(out)  # local: a bucket went to _build_to_bucket above
    with _one_builder(data_dir, name):
        return _build_here(data_dir, name, digest, **builder_kwargs), True


def _busy(dataset: object, holder: str) -> ValueError:
    return ValueError(
        f"{dataset} is being prepared by another sora-prep ({holder}): wait for it, or give "
        "this one another --name"
    )


@contextlib.contextmanager
def _one_bucket_builder(out, name: str):
    """_one_builder's lock in a bucket, which has no flock: a lease on OUT/.NAME.lock,
    renewed while the build runs (sora_jax/lease.py). A killed holder's expires after a
    minute, at once for the next sora-prep on its host."""
    lease = BucketLease(os.fspath(out / f".{name}.lock"), LEASE_S)
    holder = lease.acquire()
    if holder:
        raise _busy(out / name, holder)
    try:
        yield lease
    finally:
        lease.release()


@contextlib.contextmanager
def _one_builder(data_dir: pathlib.Path, name: str):
    """One sora-prep at a time builds a dataset (DATA_DIR/NAME): two with different inputs
    would each swap in its own version, and the later silently replace the earlier. An
    exclusive flock(2) on DATA_DIR/.NAME.lock, which the kernel drops however its holder
    exits."""
    import fcntl
    import socket

    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / f".{name}.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise _busy(data_dir / name, lock.read().strip() or "another process") from None
        lock.truncate(0)
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        yield


def _build_here(data_dir: pathlib.Path, name: str, digest: str, **builder_kwargs) -> list[dict]:
    version_dir = data_dir / name / VERSION
    _remove_leftovers(data_dir, name)
    # Inputs or settings changed: build anew beside the old version, which stays readable
    # until the new one is whole (a killed rebuild leaves the old dataset, not none).
    staging = data_dir / f".staging.{name}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # an earlier attempt of this process
    builder = make_builder(name, str(staging), fingerprint=digest, **builder_kwargs)
    builder.build()
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    old = version_dir.with_name(f".replaced.{VERSION}.{os.getpid()}")
    if version_dir.exists():
        version_dir.rename(old)
    (staging / name / VERSION).rename(version_dir)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return builder.report


def _build_to_bucket(
    out, name: str, digest: str, lease: BucketLease, **builder_kwargs
) -> list[dict]:
    """Build on the local disk, then upload. ArrayRecord's writer opens local files only
    (its reader opens gs:// itself), so the shards are written here first. A bucket has
    no rename to swap versions whole: the old version is removed first, then the new one
    uploaded with its dataset_info.json last, so a reader finds the new dataset, or none
    (a killed upload: run sora-prep again), never a mix of the two."""
    with tempfile.TemporaryDirectory(prefix="sora_prep_") as scratch:
        builder = make_builder(name, scratch, fingerprint=digest, **builder_kwargs)
        builder.build()
        if lease.lost:  # another sora-prep took the dataset over: its version stands
            raise _busy(out / name, "one that took over this one's lease while it built")
        version_dir = out / name / VERSION
        with contextlib.suppress(FileNotFoundError):
            (version_dir / "dataset_info.json").unlink()  # unseen from now on
        storage.remove_tree(version_dir)
        storage.copy_tree(
            storage.path(pathlib.Path(scratch, name, VERSION)), version_dir, INFO_FILES
        )
    return builder.report


def _remove_leftovers(data_dir: pathlib.Path, name: str) -> None:
    """What killed builds of `name` left: tfds's `incomplete.*` folders, and staging or
    replaced folders of sora-prep processes no longer alive."""
    for path in [
        *data_dir.glob(f".staging.{name}.*"),
        *(data_dir / name).glob("incomplete.*"),
        *(data_dir / name).glob(".replaced.*"),
    ]:
        pid = path.name.rsplit(".", 1)[-1]
        if pid.isdigit() and process.alive(int(pid)):
            continue  # another sora-prep building it now
        shutil.rmtree(path, ignore_errors=True)


def prepare(
    entries: list[Entry],
    data_dir: "str | os.PathLike[str]",
    name: str,
    settings: PrepSettings,
    workers: int = 0,
    beam_options: str | None = None,
) -> tuple[list[dict], bool]:
    """Prepare video files: (report rows in input order, rebuilt?). With `beam_options`
    (a string of Beam pipeline flags; "" runs Beam's DirectRunner) the work runs on Beam."""
    digest = fingerprint(
        (
            [e.key, e.labels, e.split, *file_facts(e.path), *([e.metadata] if e.metadata else [])]
            for e in entries
        ),
        settings,
    )
    splits = sorted({e.split for e in entries})
    report, rebuilt = build_if_changed(
        data_dir,
        name,
        digest,
        split_items={
            s: functools.partial(lambda s: [e for e in entries if e.split == s], s) for s in splits
        },
        class_names=sorted({label for e in entries for label in e.labels}),
        max_labels_per_clip=max((len(e.labels) for e in entries), default=0),
        metadata_columns=sorted({column for e in entries for column, _ in e.metadata}),
        work=functools.partial(prepare_entry, settings=settings),
        settings=settings,
        workers=workers,
        beam_options=beam_options,
    )
    order = {str(e.path): i for i, e in enumerate(entries)}
    return sorted(report, key=lambda row: order.get(row["path"], len(order))), rebuilt
