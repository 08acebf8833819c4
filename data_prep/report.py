"""The preparation report: one row per input, as JSON and as a printed table."""

import collections
import json
import os

from sora_jax import storage


def write(rows: list[dict], path: "str | os.PathLike[str]") -> None:
    """Whole or not at all, on a local disk or in a bucket."""
    storage.write_atomic(storage.path(path), json.dumps(rows, indent=1) + "\n")


def summary_table(rows: list[dict]) -> str:
    """Counts per split and outcome, then every skipped or flagged file with its reason."""
    counts = collections.Counter((r["split"], r["status"]) for r in rows)
    splits = sorted({r["split"] for r in rows})
    lines = [f"{'split':<12}{'ok':>8}{'skipped':>9}"]
    lines += [f"{s:<12}{counts[(s, 'ok')]:>8}{counts[(s, 'skipped')]:>9}" for s in splits]
    noted = [r for r in rows if r["status"] == "skipped" or r["reason"]]
    if noted:
        lines.append("")
        lines.append(f"{'status':<9}{'reason':<48}path")
        lines += [f"{r['status']:<9}{r['reason'][:46]:<48}{r['path']}" for r in noted]
    return "\n".join(lines)


MIN_TEST_CLIPS = 3  # fewer, and a class's test accuracy moves in steps of a third or more


def thin_classes(rows: list[dict], split: str = "test") -> dict[str, int]:
    """Classes with fewer than MIN_TEST_CLIPS kept clips in `split` (when it exists):
    {class: clips}, for a warning; by first label, as the split is stratified."""
    kept = [r for r in rows if r["status"] == "ok" and r["label"]]
    if not any(r["split"] == split for r in kept):
        return {}
    counts = collections.Counter(r["label"].split(";")[0] for r in kept if r["split"] == split)
    classes = sorted({r["label"].split(";")[0] for r in kept})
    return {c: counts[c] for c in classes if counts[c] < MIN_TEST_CLIPS}
