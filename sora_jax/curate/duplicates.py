"""Which clips are the same content: exact duplicates by their content hash (the same
stored frames and sound: a file copied, or re-muxed without re-encoding), near duplicates
(re-encoded, resized, trimmed a little) by their fingerprints' cosine similarity, found
with an approximate-nearest-neighbour index (usearch's HNSW graph, in float16: at faiss's
recall 40% smaller, faiss being 1.4x faster; bench/ann.py, BENCHMARKS.md section 13).

The index is built once over every clip read, from all processes' fingerprints, so a copy
is found wherever its original lies: in another split, another process's share of the
clips or another host's. Clips that are the same content form a group; one of them is
kept (the longest, then the tallest picture, then the first id: a trimmed or shrunken
re-upload gives way to its source) and the others name it as `duplicate_of`.
"""

import os

import numpy as np

NEIGHBOURS = 10  # asked of the index per clip; a group larger than this still joins up
CHUNK = 1 << 20  # fingerprints added or searched at a time


class _Groups:
    """Union-find over clip indices."""

    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return int(i)

    def join(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def similar_pairs(
    fingerprints: np.ndarray, threshold: float, neighbours: int = NEIGHBOURS
) -> tuple[np.ndarray, np.ndarray]:
    """fingerprints [N, D] unit vectors (zero rows take no part) -> the pairs (a < b) whose
    cosine similarity is at least `threshold` among each clip's `neighbours` nearest,
    and those similarities. The index holds float16 vectors: half the memory, and
    fingerprints are coarse to begin with."""
    from usearch.index import Index

    usable = np.flatnonzero(np.abs(fingerprints).max(axis=1) > 0) if len(fingerprints) else []
    if len(usable) < 2:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    threads, k = os.cpu_count() or 1, min(neighbours + 1, len(usable))
    index = Index(ndim=fingerprints.shape[1], metric="cos", dtype="f16")
    chunks = [usable[i : i + CHUNK] for i in range(0, len(usable), CHUNK)]
    vectors = lambda rows: np.ascontiguousarray(fingerprints[rows], np.float32)
    for rows in chunks:  # float32 copies of a chunk at a time, not of every fingerprint
        index.add(rows, vectors(rows), threads=threads)
    keys, sims = [], []
    for rows in chunks:
        found = index.search(vectors(rows), k, threads=threads)
        keys.append(np.asarray(found.keys).reshape(len(rows), -1))  # [M, k] clip indices
        sims.append(1.0 - np.asarray(found.distances).reshape(len(rows), -1))  # cosine
    keys, sims = np.concatenate(keys), np.concatenate(sims)
    a = np.repeat(usable, keys.shape[1])
    b, s = keys.ravel().astype(np.int64), sims.ravel()
    keep = (s >= threshold) & (a != b) & (b >= 0) & (b < len(fingerprints))
    pairs = np.sort(np.stack([a[keep], b[keep]], axis=1), axis=1)
    pairs, first = np.unique(pairs, axis=0, return_index=True)
    return pairs, s[keep][first].astype(np.float32)


def duplicate_of(
    ids: np.ndarray,
    content_hashes: np.ndarray,
    fingerprints: np.ndarray,
    num_frames: np.ndarray,
    heights: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """[N] str: the id of the clip each clip duplicates, or "" for a clip kept."""
    n = len(ids)
    groups = _Groups(n)
    first_with: dict[str, int] = {}
    for i, h in enumerate(content_hashes):  # exact: the same content hash
        if h in first_with:
            groups.join(i, first_with[h])
        else:
            first_with[h] = i
    pairs, _ = similar_pairs(fingerprints, threshold)
    for a, b in pairs:
        groups.join(int(a), int(b))
    root = np.array([groups.find(i) for i in range(n)])
    # Within each group the clip kept: most frames, then tallest, then the smallest id.
    order = np.lexsort((ids, -heights, -num_frames))  # last key first
    kept: dict[int, int] = {}
    for i in order:
        kept.setdefault(int(root[i]), int(i))
    out = np.array([ids[kept[int(r)]] for r in root], dtype=object)
    out[np.array([kept[int(r)] == i for i, r in enumerate(root)], bool)] = ""
    return out.astype(str)
