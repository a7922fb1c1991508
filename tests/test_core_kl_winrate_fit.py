"""KL, win rate, curves and fits against published numbers and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_tracker import (
    BonCurve,
    bon_curve,
    bon_estimate,
    bon_win_rate,
    default_ns,
    fit_overoptimization,
    fit_rl_overoptimization,
    kl_bon,
    kl_bon_discrete,
)
from tests import brute_force


# ---- KL -----------------------------------------------------------------------------------
def test_kl_formula_values():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5)
    np.testing.assert_allclose(kl_bon(np.array([8, 1024])), [1.2044415, 5.9324484], atol=1e-7)
    with pytest.raises(ValueError):
        kl_bon(0)


def test_beirami_binary_example():
    """Beirami et al. 2024: base 1/2-1/2 binary; exact 0.131 (n=2), 0.668 (n=8); formula 0.193, 1.204."""
    proxy = np.array([0.0, 1.0])
    assert kl_bon_discrete(proxy, 2) == pytest.approx(0.131, abs=5e-4)
    assert kl_bon_discrete(proxy, 8) == pytest.approx(0.668, abs=5e-4)
    assert kl_bon(2) == pytest.approx(0.193, abs=5e-4)
    assert kl_bon(8) == pytest.approx(1.204, abs=5e-4)
    # closed form: best-of-n is 1 with probability 1 - 2^-n
    for n in (2, 8, 50):
        p1 = 1 - 0.5**n
        exact = (1 - p1) * math.log((1 - p1) / 0.5) + p1 * math.log(p1 / 0.5)
        assert kl_bon_discrete(proxy, n) == pytest.approx(exact, rel=1e-12)


def test_design_example_binary_q_one_tenth_at_1024():
    proxy = np.array([1.0] + [0.0] * 9)
    assert kl_bon_discrete(proxy, 1024) == pytest.approx(2.30, abs=0.005)
    assert kl_bon(1024) == pytest.approx(5.93, abs=0.005)


@settings(max_examples=40, deadline=None)
@given(proxy=st.lists(st.integers(0, 4), min_size=1, max_size=5), n=st.integers(1, 4))
def test_discrete_kl_equals_enumeration(proxy, n):
    assert kl_bon_discrete(np.array(proxy, float), n) == pytest.approx(
        brute_force.discrete_kl(proxy, n), rel=1e-9, abs=1e-12
    )


def test_discrete_kl_never_exceeds_formula_and_is_stable_for_huge_n(rng):
    proxy = rng.integers(0, 5, size=40).astype(float)
    ns = np.array([1, 2, 10, 1000, 10**6])
    kl = kl_bon_discrete(proxy, ns)
    assert np.all(np.isfinite(kl)) and np.all(kl <= kl_bon(ns) + 1e-12) and kl[0] == 0.0
    # for huge n best-of-n always picks the top level: KL -> -log q_top
    assert kl[-1] == pytest.approx(-math.log(np.mean(proxy == proxy.max())), rel=1e-6)


def test_curve_kl_mixes_formula_and_exact_per_prompt(rng):
    continuous = rng.normal(size=(3, 8))
    binary = rng.integers(0, 2, size=(2, 8)).astype(float)
    binary[:, 0], binary[:, 1] = 0.0, 1.0  # both levels present
    proxy = np.vstack([continuous, binary])
    curve = bon_curve(proxy, rng.normal(size=proxy.shape), ns=[1, 2, 8])
    want = (3 * kl_bon(np.array([1, 2, 8])) + sum(kl_bon_discrete(row, np.array([1, 2, 8])) for row in binary)) / 5
    np.testing.assert_allclose(curve.kl, want, rtol=1e-12)
    assert curve.has_ties
    np.testing.assert_allclose(curve.kl_bound, kl_bon(np.array([1, 2, 8])))


# ---- win rate -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 3)), min_size=2, max_size=6))
def test_win_rate_equals_enumeration(data):
    proxy = [p for p, _ in data]
    true = [t for _, t in data]
    ns = list(range(1, len(data)))
    got = bon_win_rate(np.array(proxy, float), np.array(true, float), ns)
    np.testing.assert_allclose(got.true, [float(brute_force.win_rate(proxy, true, n)) for n in ns], rtol=1e-12)
    np.testing.assert_allclose(got.proxy, [float(brute_force.win_rate(proxy, proxy, n)) for n in ns], rtol=1e-12)


def test_win_rate_under_tie_free_proxy_is_n_over_n_plus_one(rng):
    result = bon_win_rate(rng.normal(size=(4, 20)), rng.normal(size=(4, 20)), [1, 2, 5, 19])
    np.testing.assert_allclose(result.proxy, [1 / 2, 2 / 3, 5 / 6, 19 / 20], rtol=1e-12)


# ---- curves -----------------------------------------------------------------------------------
def test_default_grid():
    assert default_ns(1).tolist() == [1]
    assert default_ns(16).tolist() == [1, 2, 4, 8, 16]
    assert default_ns(100).tolist() == [1, 2, 4, 8, 16, 32, 64, 100]


def test_curve_means_and_standard_errors(goodhart_scores):
    proxy, true = goodhart_scores
    curve = bon_curve(proxy, true)
    per_prompt = bon_estimate(proxy, true, curve.n)
    np.testing.assert_allclose(curve.true_mean, per_prompt.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(curve.true_se, per_prompt.std(axis=0, ddof=1) / math.sqrt(64), rtol=1e-12)
    np.testing.assert_allclose(curve.proxy_mean, bon_estimate(proxy, proxy, curve.n).mean(axis=0), rtol=1e-13)
    assert curve.N == 32 and curve.n_prompts.tolist() == [64] * len(curve.n)
    np.testing.assert_allclose(curve.kl, kl_bon(curve.n))
    assert BonCurve.from_dict(curve.to_dict()).to_dict() == curve.to_dict()


def test_ragged_curve_counts_prompts_per_n(rng):
    proxy = [rng.normal(size=k) for k in (4, 8, 8, 2)]
    true = [rng.normal(size=k) for k in (4, 8, 8, 2)]
    curve = bon_curve(proxy, true)
    assert curve.n.tolist() == [1, 2, 4, 8]
    assert curve.n_prompts.tolist() == [4, 4, 3, 2]
    per = np.array(
        [[bon_estimate(p, t, n) if n <= len(p) else np.nan for n in (1, 2, 4, 8)] for p, t in zip(proxy, true)]
    )
    np.testing.assert_allclose(curve.true_mean, np.nanmean(per, axis=0), rtol=1e-13)
    np.testing.assert_allclose(curve.true_se[3], np.nanstd(per[:, 3], ddof=1) / math.sqrt(2), rtol=1e-12)


def test_single_prompt_has_nan_standard_error(rng):
    curve = bon_curve(rng.normal(size=(1, 4)), rng.normal(size=(1, 4)))
    assert np.all(np.isnan(curve.true_se))


# ---- fits -------------------------------------------------------------------------------------
def _synthetic_curve(alpha: float, beta: float) -> BonCurve:
    n = default_ns(1024)
    kl = kl_bon(n)
    d = np.sqrt(kl)
    return BonCurve(
        n=n,
        kl=kl,
        kl_bound=kl,
        true_mean=0.3 + d * (alpha - beta * d),
        true_se=np.zeros(len(n)),
        proxy_mean=0.3 + 1.5 * d,
        proxy_se=np.zeros(len(n)),
        n_prompts=np.full(len(n), 8),
        N=1024,
        has_ties=False,
    )


def test_bon_fit_recovers_parameters_and_goodhart_point():
    fit = fit_overoptimization(_synthetic_curve(alpha=1.2, beta=0.4))
    assert fit.true.alpha == pytest.approx(1.2, rel=1e-10)
    assert fit.true.beta == pytest.approx(0.4, rel=1e-10)
    assert fit.true.r2 == pytest.approx(1.0)
    assert fit.goodhart_kl == pytest.approx(1.5**2, rel=1e-10)  # d* = alpha / (2 beta) = 1.5
    assert kl_bon(fit.goodhart_n) == pytest.approx(2.25, rel=1e-10)  # the formula inverted exactly
    assert fit.peak_within_range and fit.proxy.beta == pytest.approx(0.0, abs=1e-10)


def test_bon_fit_without_peak_has_no_goodhart_point():
    fit = fit_overoptimization(_synthetic_curve(alpha=1.0, beta=-0.1))
    assert not fit.has_goodhart_point and math.isnan(fit.goodhart_n)


def test_goodhart_point_beyond_measured_range_is_marked_extrapolated():
    fit = fit_overoptimization(_synthetic_curve(alpha=1.0, beta=0.1))  # peak at d* = 5, KL 25
    assert not fit.peak_within_range
    assert kl_bon(fit.goodhart_n) == pytest.approx(25.0, rel=1e-9)


def test_goodhart_n_with_ties_interpolates_on_the_curve():
    curve = _synthetic_curve(alpha=1.2, beta=0.4)
    tied = BonCurve(**{**curve.__dict__, "has_ties": True})
    n_star = fit_overoptimization(tied).goodhart_n
    i = np.searchsorted(curve.kl, 2.25)
    assert curve.n[i - 1] < n_star < curve.n[i]
    frac = (2.25 - curve.kl[i - 1]) / (curve.kl[i] - curve.kl[i - 1])
    assert math.log(n_star) == pytest.approx(math.log(curve.n[i - 1]) + frac * math.log(curve.n[i] / curve.n[i - 1]))


def test_rl_fit_recovers_parameters():
    d = np.linspace(0.2, 4, 12)
    fit = fit_rl_overoptimization(d**2, 0.5 + d * (0.9 - 0.3 * np.log(d)), baseline=0.5)
    assert (fit.alpha, fit.beta) == (pytest.approx(0.9), pytest.approx(0.3))
    assert fit.peak_d == pytest.approx(math.exp(0.9 / 0.3 - 1))
    with pytest.raises(ValueError, match="same length"):
        fit_rl_overoptimization([1.0, 2.0], [1.0])


def test_edge_cases_found_in_review():
    # a prompt whose samples are all NaN, omitted: the mean is over the other prompts
    assert kl_bon_discrete(np.array([[np.nan, np.nan], [1.0, 0.0]]), 2, nan_policy="omit") == pytest.approx(
        kl_bon_discrete([1.0, 0.0], 2)
    )
    # a nearly linear true curve: the fitted peak is absurdly far, not an overflow
    curve = _synthetic_curve(alpha=1.0, beta=0.0001)
    fit = fit_overoptimization(curve)
    assert fit.goodhart_n == math.inf and not fit.peak_within_range
    # the RL form peaks for any alpha once beta > 0 (slope +inf at d -> 0)
    d = np.linspace(0.05, 0.3, 8)
    rl = fit_rl_overoptimization(d**2, d * (-0.5 - 0.4 * np.log(d)))
    assert rl.has_peak and rl.peak_d == pytest.approx(math.exp(-0.5 / 0.4 - 1))


def test_an_rl_fit_whose_peak_lies_past_float_range_says_infinity_not_overflow():
    from bon_tracker.core.fit import FunctionalFit

    far = FunctionalFit(form="rl", alpha=800.0, beta=1.0, r2=1.0, rmse=0.0, n_points=5)  # peak at sqrt(KL) = e^799
    assert far.has_peak and far.peak_d == math.inf and far.peak_kl == math.inf
    big = FunctionalFit(form="rl", alpha=400.0, beta=1.0, r2=1.0, rmse=0.0, n_points=5)  # e^399 squared overflows
    assert big.peak_d == math.exp(399.0) and big.peak_kl == math.inf
    near = FunctionalFit(form="rl", alpha=3.0, beta=1.0, r2=1.0, rmse=0.0, n_points=5)
    assert near.peak_kl == pytest.approx(math.exp(2.0) ** 2)
