"""representation.py's retrieval and kNN against answers worked out by hand on planted
embeddings; constant and shuffled embeddings must score what chance gives them."""

import numpy as np
import pytest

from sora_jax.train import representation


def _planted(n: int = 12, wrong: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Orthogonal sounds (similarities exactly 0 or 1); the first n - wrong pictures are
    their own sound, the last `wrong` are another of those `wrong` clips' sounds (a cycle)."""
    audio = np.eye(n, dtype=np.float32)
    order = np.arange(n)
    order[n - wrong :] = np.roll(order[n - wrong :], -1)  # 9 -> 10, 10 -> 11, 11 -> 9
    return audio[order], audio


def test_retrieval_ranks_worked_out_by_hand():
    video, audio = _planted()
    report = representation.retrieval_report(video, audio, np.ones(12, bool))
    # Nine pictures find their own sound first. Each of the other three has similarity 0
    # with its own sound, tied with 10 others and below one: a tie counts against the
    # query, so its rank is 12, the worst. So recall@1 = @5 = @10 = 9/12, median rank 1.
    for direction in ("v2a", "a2v"):
        for k in (1, 5, 10):
            assert report[f"{direction}_r{k}"] == pytest.approx(0.75)
        assert report[f"{direction}_median_rank"] == 1.0
    assert report["num_examples"] == 12 and report["left_out"] == 0
    assert report["chance_r1"] == pytest.approx(1 / 12)
    assert "12 clips" in report["warning"]  # under MIN_RETRIEVAL_CLIPS: flagged


def test_retrieval_leaves_out_clips_missing_a_sense_and_drops_recall_at_k_of_every_clip():
    video, audio = _planted()
    has_both = np.ones(12, bool)
    has_both[[9, 10, 11, 0, 1, 2]] = False  # the three wrong pictures, and three right ones
    report = representation.retrieval_report(video, audio, has_both)
    assert report["num_examples"] == 6 and report["left_out"] == 6
    assert report["v2a_r1"] == report["a2v_r1"] == 1.0
    assert report["v2a_r5"] == 1.0 and "v2a_r10" not in report  # @10 of 6 clips is always 1


def test_constant_and_shuffled_embeddings_retrieve_nothing():
    rng = np.random.default_rng(0)
    audio = rng.normal(size=(64, 16)).astype(np.float32)
    audio /= np.linalg.norm(audio, axis=1, keepdims=True)
    constant = np.tile(audio[:1], (64, 1))
    report = representation.retrieval_report(constant, constant, np.ones(64, bool))
    # Every sound ties for every picture: each rank is the worst, 64.
    assert report["v2a_r1"] == 0.0 and report["v2a_median_rank"] == 64.0
    # One side constant: every picture ranks the sounds alike, so exactly one clip (the
    # one whose sound that order puts first) is found: chance, 1/64.
    report = representation.retrieval_report(constant, audio, np.ones(64, bool))
    assert report["v2a_r1"] == pytest.approx(1 / 64) == report["chance_r1"]
    shuffled = audio[np.roll(np.arange(64), 1)]  # every picture given another clip's sound
    report = representation.retrieval_report(shuffled, audio, np.ones(64, bool))
    assert report["v2a_r1"] == 0.0 and report["a2v_r1"] == 0.0
    assert "warning" not in report
    report = representation.retrieval_report(audio, audio, np.ones(64, bool))
    assert report["v2a_r1"] == 1.0 and report["v2a_median_rank"] == 1.0


def _clustered(labels: list[int], classes: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.eye(classes, 8)[labels] + noise * rng.normal(size=(len(labels), 8))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_knn_votes_worked_out_by_hand():
    bank_labels = np.array([0, 0, 1, 1, 2, 2])
    bank = _clustered(bank_labels.tolist(), 3, 0.01, seed=1)
    # Four queries on the three class directions; the last lies on class 0 but is
    # labelled 1: its two nearest bank clips vote 0, so it is wrong. Top-1 = 3/4.
    queries = _clustered([0, 1, 2, 0], 3, 0.01, seed=2)
    labels = np.array([0, 1, 2, 1])
    assert representation.knn_top1(queries, labels, bank, bank_labels, k=2, num_classes=3) == 0.75
    # k larger than the bank: every bank clip votes, and the nearest (weighted by
    # exp(similarity / 0.07)) still win.
    assert representation.knn_top1(queries, labels, bank, bank_labels, k=50, num_classes=3) == 0.75


def test_knn_of_constant_or_shuffled_embeddings_is_chance():
    labels = np.repeat(np.arange(4), 25)  # 100 clips, 4 balanced classes
    bank = _clustered(labels.tolist(), 4, 0.05, seed=3)
    queries = _clustered(labels.tolist(), 4, 0.05, seed=4)
    assert representation.knn_top1(queries, labels, bank, labels, k=5, num_classes=4) == 1.0
    # Constant embeddings: all similarities tie, so every query gets the same vote, which
    # is right for one class in four.
    constant = np.tile(queries[:1], (100, 1))
    assert representation.knn_top1(constant, labels, bank, labels, k=5, num_classes=4) == 0.25
    # Labels shuffled against the embeddings: near chance (0.25), far from 1.
    shuffled = np.random.default_rng(5).permutation(labels)
    top1 = representation.knn_top1(queries, shuffled, bank, labels, k=5, num_classes=4)
    assert top1 < 0.45
