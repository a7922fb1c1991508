"""The packed-key sort, threads, huge-N weights, mixed KL and the mergeable statistics."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from bon_tracker.core import (
    CurveAccumulator,
    bon_curve,
    bon_estimate,
    curve_stats,
    curve_stats_compute,
    empty_curve_stats,
    kl_bon,
    kl_bon_discrete,
    kl_bon_empirical,
    merge_curve_stats,
)
from bon_tracker.core.curve import SCAN_MIN_N
from bon_tracker.core.threads import thread_count
from tests import brute_force


def reference_estimate(proxy: np.ndarray, score: np.ndarray, n: int) -> float:
    """Independent: exact integer binomials over a stable argsort, tie groups averaged."""
    order = np.argsort(proxy, kind="stable")
    p, s = proxy[order], score[order].astype(object)
    N = len(p)
    values = [Fraction(float(v)) for v in s]
    i = 0
    while i < N:  # replace each tie group by its mean
        j = i
        while j + 1 < N and p[j + 1] == p[i]:
            j += 1
        mean = sum(values[i : j + 1], Fraction(0)) / (j - i + 1)
        values[i : j + 1] = [mean] * (j - i + 1)
        i = j + 1
    total = math.comb(N, n)
    return float(sum(Fraction(math.comb(k - 1, n - 1), total) * values[k - 1] for k in range(n, N + 1)))


# ---- the packed-key sort -------------------------------------------------------------------
def test_keys_that_collide_in_their_low_bits_still_sort_exactly(rng):
    """Proxies a few ulps apart share a packed key's high bits: the order must still be exact."""
    P, N = 40, 256
    ulps = rng.integers(0, 300, size=(P, N))  # 8 index bits: many collisions, many ties
    base = np.where(rng.random((P, 1)) < 0.5, 1.0, -3.0)
    proxy = base + ulps * np.spacing(base)
    score = rng.normal(size=(P, N))
    got = bon_estimate(proxy, score, [1, 2, 7, 64, 256])
    for i in range(0, P, 8):
        want = [reference_estimate(proxy[i], score[i], n) for n in (1, 2, 7, 64, 256)]
        np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-12)


def test_signed_zeros_subnormals_and_extremes_sort_exactly(rng):
    specials = np.array([0.0, -0.0, 5e-324, -5e-324, 1e-310, -1e-310, 1.7e308, -1.7e308, 1.0, -1.0])
    proxy = rng.choice(specials, size=(6, 50))
    score = rng.normal(size=proxy.shape)
    got = bon_estimate(proxy, score, [1, 3, 50])
    for i in range(6):
        want = [reference_estimate(proxy[i], score[i], n) for n in (1, 3, 50)]
        np.testing.assert_allclose(got[i], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(-2, 2), st.integers(0, 4), st.integers(-5, 5)), min_size=2, max_size=7),
)
def test_brute_force_with_near_ties(data):
    """Proxies equal or one ulp apart: exact enumeration is the reference."""
    proxy = [float(np.float64(a) + b * np.spacing(np.float64(a or 1.0))) for a, b, _ in data]
    score = [s for _, _, s in data]
    ns = list(range(1, len(data) + 1))
    got = bon_estimate(np.array(proxy), np.array(score, float), ns)
    want = [float(brute_force.bon_expected(proxy, score, n)) for n in ns]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_non_finite_input_is_still_a_clear_error():
    proxy, true = np.zeros((3, 300)), np.zeros((3, 300))
    proxy[1, 7] = np.inf
    with pytest.raises(ValueError, match=r"proxy has 1 non-finite value\(s\).*\(1, 7\)"):
        bon_curve(proxy, true)
    proxy[1, 7] = 0.0
    true[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"true has 1 non-finite value\(s\).*\(2, 3\)"):
        bon_curve(proxy, true)
    omitted = bon_curve(proxy, true, nan_policy="omit")
    assert omitted.n_prompts[-1] == 2  # the prompt that lost a sample no longer reaches n = 300


# ---- threads --------------------------------------------------------------------------------
def test_results_are_bit_identical_for_any_thread_count(rng):
    proxy = rng.normal(size=(3000, 64))
    proxy[::7, :5] = 0.25  # ties in some prompts
    true = rng.normal(size=proxy.shape)
    big = rng.normal(size=(1, SCAN_MIN_N + 5000))
    for p, t in ((proxy, true), (big, big * 0.5)):
        curves = [bon_curve(p, t, threads=k) for k in (1, 2, 3)]
        for field in ("kl", "true_mean", "true_se", "proxy_mean", "proxy_se"):
            np.testing.assert_array_equal(getattr(curves[0], field), getattr(curves[1], field))
            np.testing.assert_array_equal(getattr(curves[0], field), getattr(curves[2], field))


def test_thread_count_from_argument_and_environment(monkeypatch):
    monkeypatch.setenv("BON_TRACKER_THREADS", "3")
    assert thread_count() == 3 and thread_count(1) == 1
    monkeypatch.setenv("BON_TRACKER_THREADS", "many")
    with pytest.raises(ValueError, match="BON_TRACKER_THREADS must be a positive integer, got 'many'"):
        thread_count()
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        thread_count(0)


# ---- huge N ---------------------------------------------------------------------------------
def exact_all_subsets_estimate(sorted_score: np.ndarray, n: int) -> float:
    """Independent: sum_k C(k-1, n-1) s_(k) / C(N, n) in exact integer arithmetic, rounded once.

    Every float times 2^1100 is an integer, so the whole sum is one exact integer; the binomials
    come from C(k, n-1) = C(k-1, n-1) k / (k-n+1), an exact integer division at each rank.
    """
    N = len(sorted_score)
    scale = 1100
    total, binomial = 0, 1  # binomial: C(k-1, n-1), from k = n
    for k in range(n, N + 1):
        numerator, denominator = float(sorted_score[k - 1]).as_integer_ratio()  # denominator: a power of 2
        total += binomial * numerator * ((1 << scale) // denominator)
        binomial = binomial * k // (k - n + 1)
    return total / (math.comb(N, n) << scale)  # int / int: correctly rounded


def test_exact_reference_equals_fractions_at_small_n(rng):
    """The fast exact reference against Fractions of math.comb (the slow, obvious form)."""
    scores = np.sort(rng.normal(size=40)) * 3.0
    for n in (1, 2, 7, 39, 40):
        want = sum(
            Fraction(math.comb(k - 1, n - 1), math.comb(40, n)) * Fraction(float(scores[k - 1])) for k in range(n, 41)
        )
        assert exact_all_subsets_estimate(scores, n) == float(want)


def test_huge_n_weights_against_exact_binomials(rng):
    """Block-by-block weights (no serial product) against exact integer arithmetic at every rank."""
    N = SCAN_MIN_N + 3001
    proxy = rng.normal(size=N)
    score = rng.normal(size=N) * 3.0
    ns = [1, 2, 3, 100, 5000, N - 1, N]
    got = bon_curve(proxy, score, ns)
    per_prompt = bon_estimate(proxy, score, ns)
    sorted_score = score[np.argsort(proxy)]
    for n, value, estimate in zip(ns, got.true_mean, per_prompt):
        exact = exact_all_subsets_estimate(sorted_score, n)
        assert abs(value - exact) <= 1e-12 * 3.0, n
        assert abs(estimate - exact) <= 1e-12 * 3.0, n


# ---- KL: atoms and continuous mass ---------------------------------------------------------------
def mixed_kl_by_integration(levels: list[int], N: int, n: int) -> float:
    """Independent: atoms (tied levels) exactly, continuous stretches by numerical quadrature."""
    total, below = 0.0, 0
    for size in levels:
        a, b = Fraction(below, N), Fraction(below + size, N)
        if size >= 2:
            mass = float(b**n - a**n)
            if mass > 0:
                total += mass * math.log(mass / float(b - a))
        else:
            value, _ = integrate.quad(
                lambda u: n * u ** (n - 1) * math.log(n * u ** (n - 1)) if u > 0 else 0.0,
                float(a),
                float(b),
                epsabs=1e-14,
                epsrel=1e-12,
            )
            total += value
        below += size
    return total


@settings(max_examples=40, deadline=None)
@given(levels=st.lists(st.integers(1, 3), min_size=1, max_size=8), n=st.integers(1, 12))
def test_mixed_kl_equals_integration(levels, n):
    proxy = np.repeat(np.arange(len(levels), dtype=float), levels)
    got = kl_bon_empirical(np.random.default_rng(0).permutation(proxy), n)
    assert got == pytest.approx(mixed_kl_by_integration(levels, len(proxy), n), rel=1e-9, abs=1e-11)


def test_mixed_kl_tie_free_is_the_formula_and_all_tied_is_beirami(rng):
    ns = np.array([1, 2, 8, 100, 4096])
    assert np.array_equal(kl_bon_empirical(rng.normal(size=5000), ns), kl_bon(ns))
    tied = np.repeat(rng.normal(size=40), rng.integers(2, 6, size=40))
    np.testing.assert_allclose(kl_bon_empirical(tied, ns), kl_bon_discrete(tied, ns), rtol=1e-14)
    # binary verifier, both levels tied: Beirami et al.'s exact value (2.30 for q(1) = 0.1 at n = 1024)
    verifier = np.array([1.0] * 10 + [0.0] * 90)
    assert kl_bon_empirical(verifier, 1024) == pytest.approx(2.30, abs=0.005)
    assert kl_bon_empirical(np.array([1.0] + [0.0] * 9), 1024, kl_mode="discrete") == pytest.approx(2.30, abs=0.005)


def test_one_duplicate_barely_moves_kl(rng):
    """Issue 12: one duplicated score among 12,600 moves KL at n = 12,500 by < 1e-3."""
    proxy = rng.normal(size=12_600)
    clean = kl_bon_empirical(proxy, [4096, 12_500])
    order = np.argsort(proxy)
    for rank in (10, 6_300, 12_000):  # a duplicate of the sample at this rank
        dup = proxy.copy()
        dup[order[rank - 1]] = proxy[order[rank]]
        np.testing.assert_array_less(np.abs(kl_bon_empirical(dup, [4096, 12_500]) - clean), 1e-3)
        assert abs(kl_bon_discrete(dup, 12_500) - clean[1]) > 0.03  # the old rule jumped


def test_mixed_kl_converges_to_discrete_kl_of_refined_singletons():
    """Split every single sample into m atoms of equal mass: the exact discrete KL tends to the mixed value."""
    levels = [1, 3, 1, 1, 2, 1]
    n = 6
    want = kl_bon_empirical(np.repeat(np.arange(len(levels), dtype=float), levels), n)
    gaps = []
    for m in (10, 100, 1000):
        refined = np.concatenate(
            [np.full(size * m, float(i)) if size >= 2 else i + np.arange(m) / (10 * m) for i, size in enumerate(levels)]
        )
        gaps.append(abs(kl_bon_discrete(refined, n) - want))
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 2e-3


def test_curve_kl_modes(rng):
    proxy = rng.normal(size=(4, 300))
    proxy[0, :2] = proxy[0, 2]  # one tie in one prompt
    true = rng.normal(size=proxy.shape)
    auto = bon_curve(proxy, true)
    assert auto.has_ties
    np.testing.assert_array_less(np.abs(auto.kl - kl_bon(auto.n)), 1e-5)  # one tie: a small change
    discrete = bon_curve(proxy, true, kl_mode="discrete")  # every level an atom, in every prompt
    want = np.mean([kl_bon_discrete(row, auto.n) for row in proxy], axis=0)
    np.testing.assert_allclose(discrete.kl, want, rtol=1e-12)
    assert np.all(discrete.kl[1:] < kl_bon(auto.n)[1:])  # atoms: below the continuous formula
    assert np.array_equal(bon_curve(proxy, true, kl_mode="continuous").kl, kl_bon(auto.n))
    with pytest.raises(ValueError, match="kl_mode must be one of 'auto', 'discrete', 'continuous'"):
        bon_curve(proxy, true, kl_mode="exact")


# ---- mergeable statistics -------------------------------------------------------------------------
def test_statistics_merge_associatively_and_match_one_call(rng):
    proxy = rng.normal(size=(90, 32))
    proxy[5:20, :4] = 1.0
    true = rng.normal(size=proxy.shape)
    whole = bon_curve(proxy, true)
    parts = [curve_stats(proxy[a:b], true[a:b]) for a, b in ((0, 10), (10, 55), (55, 90))]
    left = merge_curve_stats(merge_curve_stats(parts[0], parts[1]), parts[2])
    right = merge_curve_stats(parts[0], merge_curve_stats(parts[1], parts[2]))
    for merged in (left, right, merge_curve_stats(empty_curve_stats(), left)):
        got = curve_stats_compute(merged, whole.n)
        for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
            np.testing.assert_allclose(getattr(got, field), getattr(whole, field), rtol=1e-12)
        assert got.n_prompts.tolist() == whole.n_prompts.tolist() and got.has_ties


def test_accumulator_of_ragged_prompts_equals_bon_curve(rng):
    rows_p = [rng.normal(size=k) for k in rng.integers(1, 40, size=60)]
    rows_t = [rng.normal(size=len(r)) for r in rows_p]
    acc = CurveAccumulator(chunk_samples=50)
    for p, t in zip(rows_p, rows_t):
        acc.add_prompt(p, t)
    got, want = acc.curve(), bon_curve(rows_p, rows_t)
    assert got.n.tolist() == want.n.tolist() and got.n_prompts.tolist() == want.n_prompts.tolist()
    for field in ("true_mean", "true_se", "proxy_mean", "proxy_se", "kl"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, equal_nan=True)
    # two workers' statistics merge into the same curve
    other = CurveAccumulator(chunk_samples=50)
    for p, t in zip(rows_p[:30], rows_t[:30]):
        other.add_prompt(p, t)
    rest = CurveAccumulator(chunk_samples=50)
    for p, t in zip(rows_p[30:], rows_t[30:]):
        rest.add_prompt(p, t)
    other.merge(rest.stats)
    np.testing.assert_allclose(other.curve().true_se, want.true_se, rtol=1e-12, equal_nan=True)
    assert other.n_prompts == 60 and other.n_samples == sum(len(r) for r in rows_p)
