"""Rank agreement among the top samples by proxy, against scipy's Spearman per prompt."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import spearmanr

from bon_tracker.core.agreement import topq_agreement


def brute_force(proxy, true, m):
    rhos = []
    for p, t in zip(proxy, true):
        top = np.argsort(-p, kind="stable")[:m]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a constant prompt: NaN, left out below
            rho = spearmanr(p[top], t[top]).statistic
        if np.isfinite(rho):
            rhos.append(rho)
    return np.mean(rhos), np.std(rhos, ddof=1) / math.sqrt(len(rhos)), len(rhos)


@pytest.mark.parametrize("discrete", [False, True, "one tie"])
def test_against_scipy_spearman_per_prompt(discrete):
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(40, 32))
    true = proxy - 0.4 * proxy**2 + rng.normal(size=proxy.shape)
    if discrete is True:  # ties in both (average ranks), and a prompt with a constant true reward
        proxy, true = np.round(proxy * 2) / 2, np.round(true)
        true[3] = 1.0
    if discrete == "one tie":  # one prompt's two best samples by proxy tie in true: the top ranks it averages
        best = np.argsort(-proxy[5])[:2]
        true[5, best] = 2.5
    got = topq_agreement(proxy, true)
    assert got.q == (1.0, 0.5, 0.25, 0.125) and got.n_top == (32, 16, 8, 4)
    for i, m in enumerate(got.n_top):
        mean, se, count = brute_force(proxy, true, m)
        assert got.mean[i] == pytest.approx(mean, rel=1e-10)
        assert got.se[i] == pytest.approx(se, rel=1e-10)
        assert got.n_prompts[i] == count
    if discrete is True:
        assert got.n_prompts[0] == 39


def test_known_values_and_metrics():
    proxy = np.tile(np.arange(8.0), (3, 1))
    assert topq_agreement(proxy, proxy * 2 + 1).mean == (1.0, 1.0)
    flipped = topq_agreement(proxy, -proxy)
    assert flipped.mean == (-1.0, -1.0) and flipped.n_top == (8, 4)
    assert set(flipped.metrics("x")) == {"x/8_agreement/top1", "x/8_agreement/top0_5"}


def test_agreement_falls_in_the_tail_under_goodhart():
    rng = np.random.default_rng(1)
    proxy = rng.normal(size=(300, 64))
    true = proxy - 0.5 * proxy**2 + 0.3 * rng.normal(size=proxy.shape)  # extreme proxy is bad
    got = topq_agreement(proxy, true)
    assert got.mean[0] > 0.3 and got.mean[-1] < 0  # agrees overall, disagrees where selection looks


def test_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        topq_agreement(np.zeros((2, 4)), np.zeros((2, 5)))
    with pytest.raises(ValueError, match="finite"):
        topq_agreement([[0.0, np.nan, 1.0, 2.0]], [[0.0, 1.0, 2.0, 3.0]])
    with pytest.raises(ValueError, match="min_samples"):
        topq_agreement(np.zeros((2, 4)), np.zeros((2, 4)), min_samples=1)


def test_the_best_first_order_is_the_stable_one_with_ties_and_signed_zeros():
    """Rows without a tie are sorted once (any sort finds their one order), rows with one again,
    stably: the order is always that of a stable sort, ties (0.0 and -0.0 among them) kept in place."""
    from bon_tracker.core.agreement import _best_first

    rng = np.random.default_rng(3)
    for trial in range(60):
        P, N = int(rng.integers(1, 30)), int(rng.integers(2, 70))
        proxy = rng.normal(size=(P, N)) if trial % 3 == 0 else rng.integers(0, 4, size=(P, N)).astype(float)
        if trial % 3 == 2:
            proxy[rng.random(proxy.shape) < 0.3] = 0.0
            proxy[rng.random(proxy.shape) < 0.3] = -0.0
        proxy[0] = rng.permutation(N)  # one tie-free row in every block
        sorted_proxy, order = _best_first(proxy)
        want = np.argsort(-proxy, axis=1, kind="stable")
        np.testing.assert_array_equal(order, want)
        np.testing.assert_array_equal(sorted_proxy, np.take_along_axis(proxy, want, axis=1))
