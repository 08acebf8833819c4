"""sora-compile's batch search (analysis.search_largest): pure Python over a memory curve,
so it runs without libtpu (tests/test_aot.py, which compiles for TPU slices, needs it)."""

import time

import pytest

from sora_jax.aot import analysis


@pytest.mark.parametrize("largest", [0, 1, 3, 4, 5, 8, 13, 100])
@pytest.mark.parametrize("start", [1, 4, 6])
def test_the_batch_search_finds_the_largest_that_fits(largest, start):
    bytes_at = lambda n: 10 * n  # the limit, 10 * largest, fits exactly
    found = analysis.search_largest(bytes_at, start, bytes_at(start), 10 * largest, 20)
    assert found[:2] == (largest, True)
    found = analysis.search_largest(bytes_at, start, bytes_at(start), 10 * largest, 1)
    assert found.trials <= 1 and found.largest <= largest


def test_the_batch_search_starts_no_compile_after_its_deadline():
    calls = []
    bytes_at = lambda n: calls.append(n) or 10 * n
    found = analysis.search_largest(bytes_at, 4, 40, 1000, 20, deadline=time.monotonic() - 1)
    assert found == (4, False, 0) and calls == []  # the known batch, not exact, no compile
    found = analysis.search_largest(bytes_at, 4, 40, 1000, 20, deadline=time.monotonic() + 60)
    assert found[:2] == (100, True)


# A train step's bytes against its batch, as XLA might give them: affine; convex (a
# quadratic term); concave; with a jump where XLA changes plan; flat, then steep; in
# stairs (a padded batch dimension).
MEMORY_CURVES = {
    "affine": lambda n: 300 + 7 * n,
    "convex": lambda n: 300 + 2 * n + n * n // 40,
    "concave": lambda n: 300 + int(80 * n**0.5),
    "a jump": lambda n: 300 + 5 * n + (900 if n > 150 else 0),
    "flat, then steep": lambda n: 1000 if n < 120 else 1000 + 60 * (n - 120),
    "stairs": lambda n: 300 + 64 * ((7 * n) // 64),
}


@pytest.mark.parametrize("curve", MEMORY_CURVES)
@pytest.mark.parametrize("start", [1, 16, 32, 500])
@pytest.mark.parametrize("limit", [700, 2500, 9000])
def test_the_batch_search_is_exact_in_few_compiles(curve, start, limit):
    bytes_at = MEMORY_CURVES[curve]
    largest = max((n for n in range(1, 20_000) if bytes_at(n) <= limit), default=0)
    found = analysis.search_largest(bytes_at, start, bytes_at(start), limit, 40)
    assert found[:2] == (largest, True)
    # Each trial is a production compile (9-21 minutes here). Doubling from 32, then
    # bisecting, takes 14 to find the affine curve's 1242.
    if curve == "affine":
        assert found.trials <= 4, found
    if curve == "convex":
        assert found.trials <= 10, found
