"""Find the input videos and their labels and splits, whatever the source's layout.

Layouts:
  split_folders  DIR/<split>/<class>/<file>
  class_folders  DIR/<class>/<file>, split into train/test per class (stratified, seeded)
  csv            CSV with columns path,label[,split]; paths relative to the CSV (rows
                 without a split: per class, as class_folders);
                 several labels (multi-label) separated by ';'; any other column
                 (e.g. group, source, device) is kept as the clip's metadata
  kinetics       CSV with youtube_id,time_start,time_end,label[,split] over files named
                 <youtube_id>_<start:06d>_<end:06d>.<ext> beside the CSV (or in --videos)
  unlabeled      any folder tree of media files, or a CSV with a `path` column: no
                 labels (for pretraining); the held-out split by a seeded hash of the path
"""

import csv
import dataclasses
import hashlib
import os
import pathlib

LAYOUTS = ("split_folders", "class_folders", "csv", "kinetics", "unlabeled")
SPLIT_NAMES = ("train", "test", "validation", "val", "valid", "eval")
VIDEO_EXTENSIONS = {
    ".mp4",
    ".mkv",
    ".webm",
    ".avi",
    ".mov",
    ".m4v",
    ".mpg",
    ".mpeg",
    ".flv",
    ".ts",
    ".3gp",
    ".ogv",
    ".wmv",
}


@dataclasses.dataclass(frozen=True)
class Entry:
    path: pathlib.Path  # absolute path of the file (may not exist: reported as missing)
    key: str  # unique, stable id within the dataset (the path relative to the source)
    labels: tuple[str, ...]
    split: str
    skip: str = ""  # why it is reported as skipped without being opened (a stray file)
    # A CSV's other columns ((column, value), ...): kept with the clip, so that evaluation
    # can report any metric per value (the `slices` evaluator).
    metadata: tuple[tuple[str, str], ...] = ()


# The columns the CSV layouts read; any other column is kept as clip metadata.
CSV_COLUMNS = {"path", "label", "split", "youtube_id", "time_start", "time_end"}


def detect_layout(source: pathlib.Path) -> str:
    if source.is_file():
        with source.open(newline="") as f:
            header = next(csv.reader(f), [])
        return "kinetics" if "youtube_id" in header else "csv"
    subdirs = [p for p in source.iterdir() if p.is_dir()]
    if subdirs and all(p.name in SPLIT_NAMES for p in subdirs):
        return "split_folders"
    return "class_folders"


def _files(root: pathlib.Path) -> list[pathlib.Path]:
    """Everything but folders under `root`, in a stable order: a stray picture, a broken
    file, a FIFO or a dangling link must show up in the report (decode says why it is
    skipped), not vanish. Linked folders are followed (a source assembled from links is
    common), each real folder once, so a link back up the tree cannot loop. Hidden files
    and folders (.DS_Store, .git and friends) are the one exception."""
    seen, found = set(), []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # stable
        found += [pathlib.Path(folder) / n for n in names if not n.startswith(".")]
    return sorted(found)


def _rank(key: str, seed: int) -> float:
    """A seeded pseudo-random number in [0, 1) for each key."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def _seeded_split(key: str, seed: int, test_fraction: float) -> str:
    return "test" if _rank(key, seed) < test_fraction else "train"


def _stratified(entries: list[Entry], seed: int, test_fraction: float) -> list[Entry]:
    """Entries without a split (split "") split per class (by the first label): each
    class gives round(n * test_fraction) of its clips, at least one and never all when
    it has two or more, chosen by seeded rank. A split by hash per file can leave a small
    dataset's test split with one class (15 files once gave 2 test clips of one class)."""
    by_class: dict[str, list[Entry]] = {}
    for e in entries:
        if not e.split and not e.skip:
            by_class.setdefault(e.labels[0] if e.labels else "", []).append(e)
    test: set[str] = set()
    for members in by_class.values():
        n = len(members)
        count = round(n * test_fraction)
        if test_fraction > 0 and n >= 2:
            count = min(max(count, 1), n - 1)
        test |= {e.key for e in sorted(members, key=lambda e: _rank(e.key, seed))[:count]}
    return [
        e if e.split else dataclasses.replace(e, split="test" if e.key in test else "train")
        for e in entries
    ]


def discover(
    source: str | pathlib.Path,
    layout: str = "auto",
    seed: int = 0,
    test_fraction: float = 0.2,
    videos_dir: str | pathlib.Path | None = None,
) -> list[Entry]:
    """Every input the source names, in a stable order."""
    source = pathlib.Path(source).resolve()
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    layout = detect_layout(source) if layout == "auto" else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    entries: list[Entry] = []
    if layout == "unlabeled":
        return _unlabeled(source, seed, test_fraction)
    if layout in ("split_folders", "class_folders"):
        if not source.is_dir():
            raise ValueError(f"layout {layout} needs a folder, got {source}")
        expected = (
            "DIR/<split>/<class>/<file>" if layout == "split_folders" else "DIR/<class>/<file>"
        )
        for path in _files(source):
            parts = path.relative_to(source).parts
            key = "/".join(parts)
            if len(parts) != expected.count("/"):  # a README or labels.json beside the classes
                skip = f"not where the layout has clips ({expected})"
                entries.append(Entry(path, key, (), "train", skip=skip))
            elif layout == "split_folders":
                split = "validation" if parts[0] in ("val", "valid") else parts[0]
                entries.append(Entry(path, key, (parts[1],), split))
            else:
                entries.append(Entry(path, key, (parts[0],), ""))  # split below
        return _stratified(entries, seed, test_fraction)
    base = pathlib.Path(videos_dir).resolve() if videos_dir else source.parent
    files_by_stem = {}
    if layout == "kinetics":
        files_by_stem = {p.stem: p for p in _files(base) if p.suffix.lower() in VIDEO_EXTENSIONS}
    with source.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            try:
                if layout == "csv":
                    rel = row["path"].strip()
                    path = (base / rel).resolve()
                else:
                    start, end = int(float(row["time_start"])), int(float(row["time_end"]))
                    stem = f"{row['youtube_id']}_{start:06d}_{end:06d}"
                    path = files_by_stem.get(stem, base / f"{stem}.mp4")
                    rel = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
                labels = tuple(x.strip() for x in row["label"].split(";") if x.strip())
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}:{line}: bad row {row} ({e})") from e
            if not labels:
                raise ValueError(f"{source}:{line}: empty label")
            split = (row.get("split") or "").strip()  # "": stratified below
            metadata = tuple(
                (column, (value or "").strip())
                for column, value in row.items()
                if column is not None and column not in CSV_COLUMNS
            )
            entries.append(Entry(path, rel, labels, split, metadata=metadata))
    _check_unique(source, entries)
    return _stratified(entries, seed, test_fraction)


def _unlabeled(source: pathlib.Path, seed: int, test_fraction: float) -> list[Entry]:
    """Every file under a folder (any depth), or every `path` of a CSV: no labels."""
    if source.is_dir():
        paths = _files(source)
        keyed = [(p, "/".join(p.relative_to(source).parts)) for p in paths]
    else:
        with source.open(newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or ()):
                raise ValueError(f"{source}: an unlabeled CSV needs a `path` column")
            rels = [(line, (row["path"] or "").strip()) for line, row in enumerate(reader, 2)]
        for line, rel in rels:
            if not rel:
                raise ValueError(f"{source}:{line}: empty path")
        keyed = [((source.parent / rel).resolve(), rel) for _, rel in rels]
    entries = [Entry(p, key, (), _seeded_split(key, seed, test_fraction)) for p, key in keyed]
    _check_unique(source, entries)
    return entries


def _check_unique(source: pathlib.Path, entries: list[Entry]) -> None:
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        duplicates = sorted({k for k in keys if keys.count(k) > 1})[:5]
        raise ValueError(f"{source}: files listed more than once: {duplicates}")
