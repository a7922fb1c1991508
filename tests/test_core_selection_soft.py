"""Soft best-of-n against exhaustive enumeration, a Monte Carlo of the procedure, and its limits."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bon_tracker.core.estimators import bon_estimate
from bon_tracker.core.kl import kl_bon
from bon_tracker.core.soft_bon import soft_bon_estimates
from bon_tracker.core.weights import bon_weights


def _enumerate(proxy, true, n, lam):
    """Brute force: every n-subset, the exact softmax pick within it (plain loops, no shared code)."""
    N = len(proxy)
    pi = np.zeros(N)
    subsets = list(itertools.combinations(range(N), n))
    deriv = 0.0
    for subset in subsets:
        logits = [lam * proxy[i] for i in subset]
        top = max(logits)
        weights = [math.exp(v - top) for v in logits]
        total = sum(weights)
        probs = [w / total for w in weights]
        for i, p in zip(subset, probs):
            pi[i] += p / len(subsets)
        mean_t = sum(p * true[i] for i, p in zip(subset, probs))
        mean_z = sum(p * proxy[i] for i, p in zip(subset, probs))
        deriv += sum(p * (true[i] - mean_t) * (proxy[i] - mean_z) for i, p in zip(subset, probs)) / len(subsets)
    kl = sum(p * math.log(N * p) for p in pi if p > 0)
    return float(pi @ np.asarray(true)), float(pi @ np.asarray(proxy)), kl, deriv


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_enumerated_soft_bon_matches_brute_force_with_ties(n):
    proxy = np.array([0.0, 1.0, 1.0, 2.5, -1.0, 2.5])  # tied pairs
    true = np.array([1.0, -0.5, 2.0, 0.3, 0.7, -1.2])
    scale = proxy.std()
    lambdas = [0.0, 0.3, 1.0, 4.0, np.inf]
    est = soft_bon_estimates(proxy[None, :], true[None, None, :], n, lambdas, n_subsets=math.comb(6, n))
    assert est.exact.all() and est.scale == pytest.approx(scale)
    z = proxy / scale
    for j, lam in enumerate(lambdas):
        if math.isinf(lam):
            t_ref = float(bon_estimate(proxy, true, n))
            assert est.true[0, 0, j] == pytest.approx(t_ref, abs=1e-12)
            continue
        t_ref, z_ref, kl_ref, d_ref = _enumerate(list(z), list(true), n, lam)
        assert est.true[0, 0, j] == pytest.approx(t_ref, abs=1e-12)
        assert est.proxy[0, j] == pytest.approx(z_ref * scale, abs=1e-12)
        assert est.kl[0, j] == pytest.approx(kl_ref, abs=1e-12)
        assert est.deriv[0, 0, j] == pytest.approx(d_ref, abs=1e-12)


def test_lambda_limits_base_mean_and_best_of_n():
    rng = np.random.default_rng(2)
    proxy = rng.integers(0, 5, (30, 9)).astype(float)  # ties
    true = rng.standard_normal((30, 9))
    est = soft_bon_estimates(proxy, true[None], 3, [0.0, 1e4, np.inf], n_subsets=math.comb(9, 3))
    assert np.allclose(est.true[0, :, 0], true.mean(axis=1), atol=1e-12)  # lambda = 0: the base policy
    bon = bon_estimate(proxy, true, 3)
    assert np.allclose(est.true[0, :, 2], bon, atol=1e-12)  # lambda = inf: best-of-n, ties at random
    assert np.allclose(est.true[0, :, 1], bon, atol=1e-9)  # a huge finite lambda approaches it
    assert np.all(est.kl[:, 0] == 0.0)


def test_random_subsets_are_unbiased_against_enumeration():
    proxy = np.array([0.2, 1.5, -0.3, 0.9, 0.9, 2.0, -1.1, 0.4])
    true = np.array([0.5, -1.0, 0.2, 1.1, 0.0, -0.7, 0.3, 1.4])
    P = 3000
    est = soft_bon_estimates(np.tile(proxy, (P, 1)), np.tile(true, (1, P, 1)), 3, [1.5], n_subsets=4, rng=7)
    assert not est.exact.any()
    exact = soft_bon_estimates(proxy[None], true[None, None], 3, [1.5], n_subsets=56)
    per_prompt = est.true[0, :, 0]
    se = per_prompt.std(ddof=1) / math.sqrt(P)
    assert abs(per_prompt.mean() - exact.true[0, 0, 0]) < 4 * se
    d = est.deriv[0, :, 0]
    assert abs(d.mean() - exact.deriv[0, 0, 0]) < 4 * d.std(ddof=1) / math.sqrt(P)


def test_matches_a_monte_carlo_of_a_million_picks():
    rng = np.random.default_rng(4)
    N, n, lam = 12, 4, 2.0
    proxy = rng.standard_normal(N)
    true = proxy + rng.standard_normal(N)
    est = soft_bon_estimates(proxy[None], true[None, None], n, [lam], n_subsets=math.comb(N, n))
    z = proxy / est.scale
    D = 1_000_000
    subsets = np.argpartition(rng.random((D, N)), n - 1, axis=1)[:, :n]  # uniform n-subsets
    logits = lam * z[subsets]
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    pick = (probs.cumsum(axis=1) < rng.random((D, 1))).sum(axis=1)  # sample the pick itself
    picked = true[subsets[np.arange(D), np.minimum(pick, n - 1)]]
    se = picked.std() / math.sqrt(D)
    assert abs(picked.mean() - est.true[0, 0, 0]) < 4 * se


def test_sample_kl_at_infinity_against_the_best_of_n_formula():
    N = 1000
    proxy = np.random.default_rng(0).standard_normal((1, N))
    for n in (2, 4, 16):
        est = soft_bon_estimates(proxy, proxy[None], n, [np.inf])
        w = bon_weights(N, n)
        assert est.kl[0, 0] == pytest.approx(float(np.sum(w[w > 0] * np.log(N * w[w > 0]))), rel=1e-12)
        assert est.kl[0, 0] == pytest.approx(float(kl_bon(n)), abs=0.02)  # n << N: close to log n - (n-1)/n
    est = soft_bon_estimates(proxy[:, :8], proxy[None, :, :8], 8, [np.inf])
    assert est.kl[0, 0] == pytest.approx(math.log(8))  # n = N: a point mass on the top sample


def test_derivative_is_the_derivative_of_the_enumerated_curve():
    rng = np.random.default_rng(9)
    proxy, true = rng.standard_normal(7), rng.standard_normal(7)
    h = 1e-5
    lambdas = [0.0, 0.8 - h, 0.8, 0.8 + h]
    est = soft_bon_estimates(proxy[None], true[None, None], 3, lambdas, n_subsets=35)
    t = est.true[0, 0]
    assert est.deriv[0, 0, 2] == pytest.approx((t[3] - t[1]) / (2 * h), abs=1e-7)
    t0 = soft_bon_estimates(proxy[None], true[None, None], 3, [0.0, h], n_subsets=35).true[0, 0]
    assert est.deriv[0, 0, 0] == pytest.approx((t0[1] - t0[0]) / h, abs=1e-4)  # lambda = 0: the closed form


def test_bad_parameters_are_named():
    p = np.zeros((1, 4))
    with pytest.raises(ValueError, match="1 <= n <= 4"):
        soft_bon_estimates(p, p[None], 5)
    with pytest.raises(ValueError, match="strictly increasing"):
        soft_bon_estimates(p, p[None], 2, [1.0, 0.5])
    with pytest.raises(ValueError, match="n_subsets"):
        soft_bon_estimates(p, p[None], 2, n_subsets=0)
