"""The curation report: one Parquet row per clip, and what it was made from in the file's
own metadata (the dataset, its fingerprint, the splits, the thresholds, the run), so that
`sora-curate apply` can refuse a report of another dataset, and a report read a year later
still says what its flags meant.

Why Parquet: a team filters a corpus of millions of clips with pandas, DuckDB or BigQuery
(`pd.read_parquet(REPORT)`), which read its typed columns directly.
"""

import dataclasses
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sora_jax import storage

KEY = b"sora_curate"
FLAGS = ("silent", "static", "blank", "duplicate", "av_mismatch")

# The per-clip columns every process writes for its share of the clips, before the merge.
PART_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("split", pa.string()),
        ("index", pa.int64()),
        ("audio_db", pa.float32()),
        ("motion", pa.float32()),
        ("blank_fraction", pa.float32()),
        ("av_score", pa.float32()),
        ("av_run", pa.int32()),  # which of the runs scored it (-1: none)
        ("av_seen", pa.bool_()),  # that run trained on the clip (see curate/av.py)
        ("content_hash", pa.string()),
        ("num_frames", pa.int32()),
        ("height", pa.int32()),
        ("has_audio", pa.bool_()),
        ("fingerprint", pa.list_(pa.float16())),
    ]
)


@dataclasses.dataclass(frozen=True)
class About:
    """What a report was made from."""

    dataset: str
    data_dir: str
    dataset_fingerprint: str
    splits: tuple[str, ...]
    thresholds: dict
    models: tuple[str, ...]  # the work dirs and exports that scored av_score (av_run)
    left_out: tuple[str, ...]  # the signals not computed, and why

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()


def write(location: str, table: pa.Table, about: About) -> None:
    """The report, whole or not at all (storage.write_atomic: a temporary file renamed
    over it, or one object upload)."""
    table = table.replace_schema_metadata({KEY: about.to_json()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    storage.write_atomic(storage.path(location), buffer.getvalue())


def read(location: str) -> tuple[pa.Table, About]:
    """A report and what it was made from; a Parquet file sora-curate did not write is
    named as such."""
    path = storage.path(location)
    if not path.exists():
        raise FileNotFoundError(f"report {location} does not exist")
    with path.open("rb") as f:
        table = pq.read_table(io.BytesIO(f.read()))
    meta = (table.schema.metadata or {}).get(KEY)
    if meta is None:
        raise ValueError(f"{location} is not a sora-curate report (no {KEY.decode()} metadata)")
    about = json.loads(meta)
    for key in ("splits", "left_out", "models"):
        about[key] = tuple(about[key])
    return table, About(**about)


def counts(table: pa.Table) -> dict[str, int]:
    return {flag: int(np.sum(table.column(flag).to_numpy())) for flag in FLAGS}
