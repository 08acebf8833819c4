"""Measures of a learned representation, on host NumPy arrays of unit vectors.

Cross-modal retrieval asks whether a clip's picture finds its own sound among every
held-out clip's sound (and the other way round); k-nearest-neighbour classification
asks whether clips of a class lie together, with no training of any classifier.
Similarities are computed a block of queries at a time, so a held-out split of tens of
thousands of clips needs no N x N matrix in memory.
"""

import numpy as np

_BLOCK = 1024  # query rows per similarity block
MIN_RETRIEVAL_CLIPS = 50  # fewer held-out clips with both senses: retrieval is flagged


def _ranks(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """1-based rank of query i's own key (keys[i]) among all keys, by cosine similarity;
    a tie counts against the query (the rank it would get in the worst order)."""
    ranks = np.empty(len(queries), np.int64)
    for start in range(0, len(queries), _BLOCK):
        sims = queries[start : start + _BLOCK] @ keys.T  # [block, N]
        rows = np.arange(sims.shape[0])
        own = sims[rows, start + rows]
        ranks[start : start + len(rows)] = np.sum(sims >= own[:, None], axis=1)
    return ranks


def retrieval_report(
    video: np.ndarray,  # [N, D] unit vectors
    audio: np.ndarray,  # [N, D]
    has_both: np.ndarray,  # [N] bool: only these clips take part
) -> dict:
    """video->audio and audio->video recall@1/5/10 and median rank over the clips with
    both senses; clips missing one are left out and counted."""
    v, a = video[has_both], audio[has_both]
    report = {"num_examples": len(v), "left_out": int(len(video) - len(v))}
    if not len(v):
        return report
    for name, ranks in (("v2a", _ranks(v, a)), ("a2v", _ranks(a, v))):
        for k in (1, 5, 10):
            if k < len(v):  # recall@k of k >= N clips is 1 whatever the model
                report[f"{name}_r{k}"] = float(np.mean(ranks <= k))
        report[f"{name}_median_rank"] = float(np.median(ranks))
    report["chance_r1"] = 1.0 / len(v)
    if len(v) < MIN_RETRIEVAL_CLIPS:
        report["warning"] = (
            f"{len(v)} clips: recall is in steps of {1 / len(v):.3f} and says little "
            f"below {MIN_RETRIEVAL_CLIPS}"
        )
    return report


def knn_top1(
    queries: np.ndarray,  # [N, D] unit vectors
    query_labels: np.ndarray,  # [N] int
    bank: np.ndarray,  # [M, D] unit vectors
    bank_labels: np.ndarray,  # [M] int
    k: int,
    num_classes: int,
    temperature: float = 0.07,
) -> float:
    """Top-1 of a k-nearest-neighbour vote (neighbours weighted by exp(similarity / T),
    as in DINO's evaluation) of each query among the bank."""
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), _BLOCK):
        sims = queries[start : start + _BLOCK] @ bank.T  # [block, M]
        nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]  # [block, k]
        weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / temperature)
        votes = np.zeros((len(sims), num_classes))
        np.add.at(votes, (np.arange(len(sims))[:, None], bank_labels[nearest]), weights)
        correct += int(np.sum(np.argmax(votes, axis=1) == query_labels[start : start + len(sims)]))
    return correct / max(len(queries), 1)
