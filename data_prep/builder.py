"""The tfds dataset builder: decoded clips -> ArrayRecord shards with class names,
splits, counts and the preparation settings in the dataset's metadata."""

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import multiprocessing
import pathlib
import re
import shutil
import types

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from data_prep.layouts import Entry
from data_prep.worker import PrepSettings, prepare_entry

VERSION = "1.0.0"


def features(class_names: list[str]) -> tfds.features.FeaturesDict:
    """The stored example. Frames stay JPEG bytes so the input pipeline decodes only the
    frames a training window uses; audio is the 16 kHz waveform (log-mel is the model's)."""
    return tfds.features.FeaturesDict(
        {
            "frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
            "label": tfds.features.ClassLabel(names=class_names),
            "labels": tfds.features.Sequence(tfds.features.ClassLabel(names=class_names)),
            "has_audio": np.bool_,
            "num_frames": np.int32,
            "path": tfds.features.Text(),
        }
    )


class SoraVideoBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds any prepared video dataset; `make_builder` names a subclass per dataset."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(
        self,
        *,
        entries: list[Entry],
        settings: PrepSettings,
        workers: int = 0,
        fingerprint: str = "",
        **kwargs,
    ):
        self._entries = entries
        self._settings = settings
        self._workers = workers
        self._fingerprint = fingerprint
        self._pool = None
        self.report: list[dict] = []
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        class_names = sorted({label for e in self._entries for label in e.labels})
        return tfds.core.DatasetInfo(
            builder=self,
            description="Video clips prepared by sora-prep (sora_jax).",
            features=features(class_names),
            metadata=tfds.core.MetadataDict(
                prep=dataclasses.asdict(self._settings),
                sample_rate=16_000,
                fingerprint=self._fingerprint,
            ),
        )

    def _split_generators(self, dl_manager):
        generators = {}
        for split in sorted({e.split for e in self._entries}):
            entries = [e for e in self._entries if e.split == split]
            # tfds cannot write an empty split, so decode (in this process) up to the
            # split's first usable file; a split with none is left out, and reported.
            head = []
            for entry in entries:
                head.append(prepare_entry(entry, self._settings))
                if head[-1][1] is not None:
                    break
            if head[-1][1] is None:
                self.report.extend(row for row, _ in head)
                continue
            generators[split] = self._generate_examples(split, head, entries[len(head) :])
        return generators

    def _generate_examples(self, split: str, head: list, rest: list[Entry]):
        work = functools.partial(prepare_entry, settings=self._settings)
        results = self._pool.imap(work, rest) if self._pool else map(work, rest)
        for row, example in tqdm.tqdm(
            itertools.chain(head, results),
            total=len(head) + len(rest),
            desc=f"decoding {split}",
            unit="file",
            dynamic_ncols=True,
        ):
            self.report.append(row)
            if example is not None:
                yield example["path"], example

    def build(self) -> None:
        """download_and_prepare with `workers` decoding processes."""
        tfds.disable_progress_bar()  # ours shows files decoded, with an ETA
        with contextlib.ExitStack() as stack:
            if self._workers > 1:
                # spawn: workers import only PyAV/NumPy/PIL, never a forked TensorFlow.
                context = multiprocessing.get_context("spawn")
                self._pool = stack.enter_context(context.Pool(self._workers))
            self.download_and_prepare(
                download_config=tfds.download.DownloadConfig(verify_ssl=False)
            )
            self._pool = None


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


def fingerprint(entries: list[Entry], settings: PrepSettings) -> str:
    """Changes when any input file, label, split or setting does: decides re-use."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode())
    for e in entries:
        stat = e.path.stat() if e.path.exists() else None
        h.update(
            json.dumps(
                [e.key, e.labels, e.split, stat and stat.st_size, stat and stat.st_mtime_ns]
            ).encode()
        )
    return h.hexdigest()


def prepare(
    entries: list[Entry],
    data_dir: str | pathlib.Path,
    name: str,
    settings: PrepSettings,
    workers: int = 0,
) -> tuple[list[dict], bool]:
    """Build the dataset unless an identical one exists: (report rows, rebuilt?)."""
    data_dir = pathlib.Path(data_dir)
    report_path = data_dir / f"{name}_report.json"
    version_dir = data_dir / name / VERSION
    digest = fingerprint(entries, settings)
    info_path = version_dir / "metadata.json"
    up_to_date = (
        info_path.exists()
        and report_path.exists()
        and json.loads(info_path.read_text()).get("fingerprint") == digest
    )
    if up_to_date:
        return json.loads(report_path.read_text()), False
    if version_dir.exists():
        shutil.rmtree(version_dir)  # inputs or settings changed: rebuild from scratch
    builder = make_builder(
        name, str(data_dir), entries=entries, settings=settings, workers=workers, fingerprint=digest
    )
    builder.build()
    order = {e.key: i for i, e in enumerate(entries)}
    by_path = {str(e.path): e.key for e in entries}
    report = sorted(builder.report, key=lambda row: order[by_path[row["path"]]])
    return report, True
