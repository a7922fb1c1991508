"""ScanWeights (one huge prompt, N > SCAN_MIN_N): its weights and estimates against exact integer arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from bon_tracker.core.curve import SCAN_MIN_N
from bon_tracker.core.threads import map_in_order
from bon_tracker.core.weights import ScanWeights

U = 2.0**-53  # unit roundoff


def exact_estimate(sorted_score: np.ndarray, n: int) -> float:
    """sum_k C(k-1, n-1) s_(k) / C(N, n) as one exact integer (every float times 2^1100 is one), rounded once."""
    N, scale = len(sorted_score), 1100
    total, binomial = 0, 1  # binomial: C(k-1, n-1), from k = n
    for k in range(n, N + 1):
        numerator, denominator = float(sorted_score[k - 1]).as_integer_ratio()
        total += binomial * numerator * ((1 << scale) // denominator)
        binomial = binomial * k // (k - n + 1)
    return total / (math.comb(N, n) << scale)


@pytest.mark.parametrize("N", [10**6 + 3, 2**20 + 5])  # segments of 32, and of 16 (2^L > 2^20 + 6)
def test_weights_at_single_ranks_equal_exact_binomials(N):
    """The weight of rank k (the estimate of a score that is 1 at k, 0 elsewhere) against the exact
    C(k-1, n-1) / C(N, n): within (3g + 8) roundings at position g = N - k, the bound of the serial
    product of the ratios (a division and a product per rank)."""
    ns = [2, 7, 32, 100, 1000, 5000, N - 1]
    scan = ScanWeights(N, np.array(ns))
    assert (32 if N < 2**20 else 16) == scan.R
    for j, n in enumerate(ns):
        total = math.comb(N, n)
        ranks = {N, N - 1, N - 37, N - 1000, N - 123_457, n + 3, n}
        for k in sorted(r for r in ranks if n <= r <= N):
            exact = Fraction(math.comb(k - 1, n - 1), total)
            if exact < 1e-290:
                continue  # past the tail's normal floats: today's weights there are subnormal too
            unit = np.zeros((1, N))
            unit[0, k - 1] = 1.0
            got = scan.apply(unit, [j])[0, j]
            g = N - k
            assert abs(Fraction(got) - exact) <= exact * Fraction((3 * g + 8) * U), (n, k)


def test_estimates_against_exact_sums_and_thread_count(rng):
    N = SCAN_MIN_N + 4097
    score = np.sort(rng.normal(size=N)) * 3.0 + rng.normal(size=N)  # rank-sorted proxy, noisy score
    stacked = np.stack([score, np.sort(score)])
    ns = [1, 2, 3, 33, 100, 999, 5000, N // 2, N - 1, N]  # shifts with and without a remainder
    scan = ScanWeights(N, np.array(ns))
    got = scan.apply(stacked)
    for j, n in enumerate(ns):
        for row in range(2):
            exact = exact_estimate(stacked[row], n)
            assert abs(got[row, j] - exact) <= 1e-13 * np.abs(stacked[row]).max(), (n, row)
    threaded = scan.apply(stacked, mapper=lambda fn, items: map_in_order(fn, items, 3))
    np.testing.assert_array_equal(threaded, got)
    some = scan.apply(stacked, [4, 1])  # a subset: the others NaN, the picked ones as before
    np.testing.assert_array_equal(some[:, [1, 4]], got[:, [1, 4]])
    assert np.isnan(np.delete(some, [1, 4], axis=1)).all()


def test_absurdly_large_scores_are_estimated_scaled():
    """Scores past 2^450 overflow the scaled products: they are estimated again at an exact 2^-600."""
    N = SCAN_MIN_N + 999
    rng = np.random.default_rng(5)
    stacked = np.sort(rng.normal(size=(1, N)))
    scan = ScanWeights(N, np.array([2, 64, 300]))
    plain = scan.apply(stacked)
    huge = scan.apply(stacked * 2.0**700)
    assert np.isfinite(huge).all()
    np.testing.assert_array_equal(huge, plain * 2.0**700)


def test_tables_kept_or_not_give_the_same_estimates(rng, monkeypatch):
    """Past KEEP_N the tables and carries are built for the call alone: the same arithmetic, the same bits."""
    N = SCAN_MIN_N + 321
    stacked = np.sort(rng.normal(size=(2, N)))
    ns = np.array([2, 5, 40, 700, N])
    kept = ScanWeights(N, ns).apply(stacked)
    monkeypatch.setattr(ScanWeights, "KEEP_N", 0)
    np.testing.assert_array_equal(ScanWeights(N, ns).apply(stacked), kept)
