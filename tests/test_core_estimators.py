"""The all-subsets estimator against brute force, published formulas and simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from bon_tracker import bon_curve, bon_estimate, bon_weights, mc_bon_estimate
from tests import brute_force


# ---- weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("N,n", [(1, 1), (5, 1), (5, 3), (5, 5), (40, 7), (300, 150)])
def test_weights_equal_exact_binomial_ratio(N, n):
    exact = np.array([math.comb(k - 1, n - 1) / math.comb(N, n) for k in range(1, N + 1)])
    np.testing.assert_allclose(bon_weights(N, n), exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 1000, 500_000, 999_999, 1_000_000])
def test_weights_stable_at_a_million_samples(n):
    N = 1_000_000
    w = bon_weights(N, n)
    assert np.all(np.isfinite(w)) and np.all(w >= 0)
    assert w[-1] == pytest.approx(n / N, rel=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.all(w[: n - 1] == 0)
    # one weight in the bulk against log-gamma
    k = max(n, N - 10)
    log_w = (math.lgamma(k) - math.lgamma(n) - math.lgamma(k - n + 1)) - (
        math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)
    )
    assert w[k - 1] == pytest.approx(math.exp(log_w), rel=1e-8)


def test_weights_reject_bad_arguments():
    with pytest.raises(ValueError, match="1 <= n <= N"):
        bon_weights(4, 5)
    with pytest.raises(ValueError, match="N must be >= 1"):
        bon_weights(0, 1)
    with pytest.raises(TypeError, match="n must be an integer"):
        bon_weights(4, 2.5)


# ---- brute force -----------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 3), st.integers(-5, 5)), min_size=1, max_size=7),
)
def test_estimate_equals_brute_force_with_ties(data):
    """Small integer proxies force many ties; exact fractions are the reference."""
    proxy = [p for p, _ in data]
    score = [s for _, s in data]
    ns = list(range(1, len(data) + 1))
    got = bon_estimate(np.array(proxy, float), np.array(score, float), ns)
    want = [float(brute_force.bon_expected(proxy, score, n)) for n in ns]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_estimate_brute_force_tie_free(rng):
    proxy = rng.normal(size=9)
    score = rng.normal(size=9)
    got = bon_estimate(proxy, score, range(1, 10))
    want = [float(brute_force.bon_expected(list(proxy), list(score), n)) for n in range(1, 10)]
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("N,c", [(10, 0), (10, 1), (10, 3), (25, 7), (200, 13), (200, 200)])
def test_pass_at_k_is_exact(N, c):
    correct = np.zeros(N)
    correct[:c] = 1
    correct = np.random.default_rng(N + c).permutation(correct)
    ks = [k for k in (1, 2, 5, 10, 50, 100, 200) if k <= N]
    np.testing.assert_allclose(
        bon_estimate(correct, correct, ks), [brute_force.pass_at_k(N, c, k) for k in ks], rtol=1e-12, atol=1e-15
    )


# ---- shapes: one prompt, matrices, ragged ---------------------------------------------
def test_two_d_matches_rows_and_scalar_n_drops_axis(rng):
    proxy, score = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    full = bon_estimate(proxy, score, [1, 3, 12])
    assert full.shape == (5, 3)
    for i in range(5):
        np.testing.assert_allclose(full[i], bon_estimate(proxy[i], score[i], [1, 3, 12]), rtol=1e-14)
    np.testing.assert_allclose(bon_estimate(proxy, score, 3), full[:, 1], rtol=1e-14)


def test_ragged_prompts_nan_where_n_exceeds_their_samples(rng):
    rows_p = [rng.normal(size=k) for k in (3, 8, 5, 8)]
    rows_s = [rng.normal(size=k) for k in (3, 8, 5, 8)]
    out = bon_estimate(rows_p, rows_s, [1, 4, 8])
    assert out.shape == (4, 3)
    for i, (p, s) in enumerate(zip(rows_p, rows_s)):
        usable = [n for n in (1, 4, 8) if n <= len(p)]
        np.testing.assert_allclose(out[i, : len(usable)], bon_estimate(p, s, usable), rtol=1e-14)
        assert np.all(np.isnan(out[i, len(usable) :]))


# ---- properties -------------------------------------------------------------------------
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.tuples(st.integers(-3, 3) | finite, finite), min_size=2, max_size=30),
    seed=st.integers(0, 2**32 - 1),
    a=st.floats(-100, 100, allow_nan=False),
    b=st.floats(-100, 100, allow_nan=False),
)
def test_properties(values, seed, a, b):
    proxy = np.array([float(p) for p, _ in values])
    score = np.array([s for _, s in values])
    ns = np.arange(1, len(values) + 1)
    est = bon_estimate(proxy, score, ns)
    # invariant to the order of samples
    perm = np.random.default_rng(seed).permutation(len(values))
    scale = 1.0 + np.abs(score).max()
    np.testing.assert_allclose(bon_estimate(proxy[perm], score[perm], ns), est, rtol=1e-9, atol=1e-9 * scale)
    # affine equivariant in the score
    np.testing.assert_allclose(
        bon_estimate(proxy, a * score + b, ns), a * est + b, rtol=1e-9, atol=1e-9 * (abs(a) * scale + abs(b) + 1)
    )
    # the proxy curve never decreases with n
    proxy_curve = bon_estimate(proxy, proxy, ns)
    assert np.all(np.diff(proxy_curve) >= -1e-9 * (1 + np.abs(proxy).max()))
    # weights sum to one
    assert bon_weights(len(values), int(seed % len(values)) + 1).sum() == pytest.approx(1.0, abs=1e-12)


def test_one_prompt_with_a_million_samples(rng):
    proxy = rng.normal(size=1_000_000)
    curve = bon_curve(proxy[None, :], proxy[None, :])
    assert np.all(np.isfinite(curve.proxy_mean))
    assert curve.n[-1] == 1_000_000
    assert curve.proxy_mean[-1] == pytest.approx(proxy.max())
    assert curve.proxy_mean[0] == pytest.approx(proxy.mean())


# ---- unbiasedness by simulation ----------------------------------------------------------
def expected_max_normal(n: int) -> float:
    """E[max of n i.i.d. N(0,1)] by numerical integration."""
    value, _ = integrate.quad(lambda x: x * n * stats.norm.pdf(x) * stats.norm.cdf(x) ** (n - 1), -12, 12)
    return value


def test_unbiased_on_correlated_gaussians_and_beats_monte_carlo():
    """proxy ~ N(0,1), true = rho proxy + noise: E[true of best-of-n] = rho E[max_n]."""
    rng = np.random.default_rng(7)
    rho, N, datasets = 0.6, 16, 4000
    proxy = rng.normal(size=(datasets, N))
    true = rho * proxy + math.sqrt(1 - rho**2) * rng.normal(size=(datasets, N))
    for n in (2, 4, 16):
        truth = rho * expected_max_normal(n)
        est = bon_estimate(proxy, true, n)
        se = est.std(ddof=1) / math.sqrt(datasets)
        assert abs(est.mean() - truth) < 3 * se
        mc = mc_bon_estimate(proxy[:1000], true[:1000], n, trials=N // n, rng=1)
        mc_se = mc.std(ddof=1) / math.sqrt(len(mc))
        assert abs(mc.mean() - truth) < 3 * mc_se
        if n < N:  # at n = N both estimators see the same single subset
            assert mc.var(ddof=1) > est[:1000].var(ddof=1)


def test_monte_carlo_converges_to_all_subsets(rng):
    proxy = rng.integers(0, 3, size=10).astype(float)  # ties: MC must break them at random
    score = rng.normal(size=10)
    exact = bon_estimate(proxy, score, 4)
    mc = mc_bon_estimate(proxy, score, 4, trials=200_000, rng=3)
    assert mc == pytest.approx(exact, abs=0.01)


# ---- bad input ---------------------------------------------------------------------------
def test_nan_is_an_error_naming_count_and_place():
    proxy = np.zeros((3, 4))
    proxy[1, 2] = np.nan
    proxy[2, 0] = np.inf
    with pytest.raises(ValueError, match=r"proxy has 2 non-finite value\(s\).*\(1, 2\), \(2, 0\)"):
        bon_estimate(proxy, np.zeros((3, 4)), 2)


def test_nan_omit_drops_those_samples():
    proxy = np.array([[0.1, np.nan, 0.5, 0.9], [0.2, 0.4, 0.6, 0.8]])
    score = np.array([[1.0, 5.0, 2.0, 3.0], [1.0, 2.0, 3.0, np.nan]])
    out = bon_estimate(proxy, score, [1, 3], nan_policy="omit")
    np.testing.assert_allclose(out[0], bon_estimate([0.1, 0.5, 0.9], [1.0, 2.0, 3.0], [1, 3]))
    np.testing.assert_allclose(out[1], bon_estimate([0.2, 0.4, 0.6], [1.0, 2.0, 3.0], [1, 3]))


@pytest.mark.parametrize(
    "proxy,score,ns,error,match",
    [
        (np.zeros((2, 3)), np.zeros((3, 2)), 1, ValueError, r"same shape, got \(2, 3\) and \(3, 2\)"),
        (np.zeros((2, 3)), np.zeros((2, 3)), 0, ValueError, "every n must be >= 1"),
        (np.zeros((2, 3)), np.zeros((2, 3)), 4, ValueError, "cannot exceed .* N = 3"),
        (np.zeros((2, 0)), np.zeros((2, 0)), 1, ValueError, "empty"),
        ([], [], 1, ValueError, "empty"),
        (np.array(["a", "b"]), np.zeros(2), 1, TypeError, "proxy must be numeric"),
        (np.zeros(3), np.zeros(3), 1.5, TypeError, "whole numbers"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), 1, ValueError, "1-D .* or 2-D"),
        ([[0.0, 1.0], [2.0]], [[0.0, 1.0], [2.0, 3.0]], 1, ValueError, r"prompt 1: .*shapes \(1,\) and \(2,\)"),
        (np.zeros(3), np.zeros(3), 1, None, None),
    ],
)
def test_bad_input_is_a_clear_error(proxy, score, ns, error, match):
    if error is None:
        assert bon_estimate(proxy, score, ns) == 0.0
        return
    with pytest.raises(error, match=match):
        bon_estimate(proxy, score, ns)


def test_paired_scores_returns_clean_float64_matrices_as_given_and_checks_everything_else():
    from bon_tracker.core.validation import paired_scores

    proxy, score = np.arange(6.0).reshape(2, 3), np.ones((2, 3))
    p, s, one_prompt = paired_scores(proxy, score)
    assert p is proxy and s is score and one_prompt is False  # no copy, nothing to convert
    # the fast path never lets through what full validation refuses or converts
    bad = proxy.copy()
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"proxy has 1 non-finite value\(s\).*\(1, 2\)"):
        paired_scores(bad, score)
    huge = np.full((2, 3), 1e308)  # finite values whose sum overflows: still finite, still accepted
    assert paired_scores(huge, score)[0] is huge
    p32, _, _ = paired_scores(proxy.astype(np.float32), score)
    assert p32.dtype == np.float64
    with pytest.raises(ValueError, match="same shape"):
        paired_scores(proxy, np.ones((3, 2)))
    omitted, _, _ = paired_scores(bad, score, nan_policy="omit")
    assert [len(row) for row in omitted] == [3, 2]
