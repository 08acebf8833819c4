"""Which approximate-nearest-neighbour library finds sora-curate's near-duplicates: usearch
and faiss (HNSW graphs), against exact search (faiss's flat index: one matrix product).

The vectors are what sora-curate indexes: unit fingerprints (sora_jax/curate/signals.py,
150 dims), here drawn around cluster centres as real clips crowd around common looks, with
`--pairs` planted near-duplicate pairs (a copy a small step from its original). For each
library: the time to build the index over all N and to ask each vector's 10 nearest, the
recall@10 against exact search on 2,000 queries, and the share of planted pairs whose
copy finds its original among its 10 nearest (what sora-curate needs).

  python bench/ann.py [--n 200000] [--threads 2]
"""

import argparse
import json
import time

import common
import numpy as np

DIMS = 150
K = 10


def corpus(n: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, DIMS] unit float32 vectors, and [pairs, 2] indices of planted near-duplicates."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(1, n // 500), DIMS))
    x = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, DIMS))
    originals = rng.choice(n - pairs, pairs, replace=False)
    copies = np.arange(n - pairs, n)
    x[copies] = x[originals] + 0.05 * rng.normal(size=(pairs, DIMS))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), np.stack([copies, originals], axis=1)


def exact_neighbours(x: np.ndarray, queries: np.ndarray) -> np.ndarray:
    sims = x[queries] @ x.T  # [Q, N]
    return np.argsort(-sims, axis=1)[:, :K]


def _usearch(x: np.ndarray, threads: int, dtype: str):
    from usearch.index import Index

    start = time.perf_counter()
    index = Index(ndim=x.shape[1], metric="cos", dtype=dtype)
    index.add(np.arange(len(x)), x, threads=threads)
    built = time.perf_counter() - start
    start = time.perf_counter()
    found = index.search(x, K, threads=threads).keys
    return built, time.perf_counter() - start, np.asarray(found), index.serialized_length


def _faiss(x: np.ndarray, threads: int, kind: str):
    import faiss

    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    if kind == "flat":
        index = faiss.IndexFlatIP(x.shape[1])
    elif kind == "hnsw matched":  # usearch's defaults: 16 links, 128 and 64 candidates
        index = faiss.IndexHNSWFlat(x.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 128
    else:  # faiss's own defaults: 32 links, 40 and 16 candidates
        index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    built = time.perf_counter() - start
    if kind == "hnsw matched":
        index.hnsw.efSearch = 64
    start = time.perf_counter()
    _, found = index.search(x, K)
    memory = len(faiss.serialize_index(index))
    return built, time.perf_counter() - start, found, memory


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--pairs", type=int, default=2_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write the JSON result here")
    args = p.parse_args()
    x, pairs = corpus(args.n, args.pairs)
    queries = np.random.default_rng(1).choice(len(x), 2000, replace=False)
    truth = exact_neighbours(x, queries)
    candidates = {
        "usearch hnsw f32": lambda: _usearch(x, args.threads, "f32"),
        "usearch hnsw f16": lambda: _usearch(x, args.threads, "f16"),
        "faiss hnsw, its defaults (M=32, efSearch=16)": lambda: _faiss(x, args.threads, "hnsw"),
        "faiss hnsw, usearch's settings (M=16, efSearch=64)": lambda: _faiss(
            x, args.threads, "hnsw matched"
        ),
        "faiss flat (exact)": lambda: _faiss(x, args.threads, "flat"),
    }
    results = []
    for name, run in candidates.items():
        built, searched, found, memory = run()
        hits = [len(set(f) & set(t)) for f, t in zip(found[queries], truth, strict=True)]
        recall = np.mean(hits) / K
        pair_recall = np.mean([o in found[c] for c, o in pairs])
        row = {
            "library": name,
            "build_s": round(built, 2),
            "search_all_s": round(searched, 2),
            "recall_at_10": round(float(recall), 4),
            "planted_pairs_found": round(float(pair_recall), 4),
            "index_mib": round(memory / 2**20, 1),  # the index serialized
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    import faiss
    import usearch

    result = {
        "benchmark": "ann",
        "machine": common.machine(),
        "n": args.n,
        "dims": DIMS,
        "k": K,
        "threads": args.threads,
        "versions": {"usearch": usearch.__version__, "faiss": faiss.__version__},
        "results": results,
    }
    table = [
        (
            r["library"],
            f"build {r['build_s']} s, search {r['search_all_s']} s, "
            f"recall@10 {r['recall_at_10']}, pairs {r['planted_pairs_found']}",
        )
        for r in results
    ]
    common.emit(result, args.out, table)


if __name__ == "__main__":
    main()
