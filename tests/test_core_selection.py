"""Ensemble rules and Best-of-Poisson against brute force, Monte Carlo and direct KL computation."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import integrate, stats

from bon_tracker.core.curve import bon_curve
from bon_tracker.core.estimators import bon_estimate
from bon_tracker.core.poisson import (
    bop_kl_per_prompt,
    bop_level_kl,
    bop_rank_weights,
    kl_bop,
    poisson_n_coefficients,
)
from bon_tracker.core.selection import aggregate_members, check_rules, rule_scores, selection_input
from bon_tracker.core.selection_stats import compute_selection_statistics
from tests.brute_force import bon_expected


def _fraction_aggregate(column: list[int], rule: str, lam: Fraction) -> Fraction:
    K = len(column)
    mean = Fraction(sum(column), K)
    if rule == "mean":
        return mean
    if rule == "worst":
        return Fraction(min(column))
    variance = sum((Fraction(v) - mean) ** 2 for v in column) / K  # population variance (Coste et al.)
    return mean - lam * variance


@pytest.mark.parametrize("K", [2, 3, 5])
def test_ensemble_rules_match_brute_force_over_all_subsets_with_ties(K):
    rng = np.random.default_rng(K)
    P, N = 3, 6
    members = rng.integers(0, 3, size=(K, P, N))  # few levels: ties in every aggregate
    true = rng.integers(-2, 3, size=(P, N))
    inp = selection_input({f"rm{k}": members[k].astype(float) for k in range(K)}, true.astype(float))
    lam = Fraction(1, 2)
    for rule in ("mean", "worst", "uwo", "rm0"):
        agg = rule_scores(inp, rule, 0.5)
        curve = bon_curve(agg, true.astype(float), np.arange(1, N + 1))
        for n in range(1, N + 1):
            expected = []
            for p in range(P):
                if rule == "rm0":
                    proxy = [Fraction(int(v)) for v in members[0, p]]
                else:
                    proxy = [
                        _fraction_aggregate([int(members[k, p, i]) for k in range(K)], rule, lam) for i in range(N)
                    ]
                expected.append(bon_expected(proxy, [int(v) for v in true[p]], n))
            assert curve.true_mean[n - 1] == pytest.approx(float(sum(expected) / P), abs=1e-12)


def test_uwo_uses_population_variance():
    scores = np.array([[1.0], [3.0]])  # mean 2, population variance 1 (sample variance would be 2)
    assert aggregate_members(scores, "uwo", 0.5).tolist() == [1.5]


def test_member_forms_agree_mapping_array_list_and_ragged():
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3, 4, 5))
    true = rng.standard_normal((4, 5))
    a = selection_input(arr, true)
    b = selection_input({"member_0": arr[0], "member_1": arr[1], "member_2": arr[2]}, true)
    c = selection_input([arr[0], arr[1], arr[2]], true)
    assert a.member_names == b.member_names == c.member_names
    assert np.array_equal(a.members, b.members) and np.array_equal(a.members, c.members)
    ragged = selection_input({"a": [list(arr[0, 0]), list(arr[0, 1, :3])], "b": [list(arr[1, 0]), list(arr[1, 1, :3])]},
                             [list(true[0]), list(true[1, :3])])  # fmt: skip
    assert not ragged.dense and [r.shape for r in ragged.members] == [(2, 5), (2, 3)]
    assert np.allclose(rule_scores(ragged, "mean")[1], arr[:2, 1, :3].mean(axis=0), rtol=0, atol=1e-12)


def test_rule_names_are_checked():
    assert check_rules(None, ("a", "b")) == ("a", "b", "mean", "worst", "uwo")
    assert check_rules(None, ("only",)) == ("only",)
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        check_rules(["best"], ("a", "b"))
    with pytest.raises(ValueError, match="clash with the ensemble rules"):
        check_rules(None, ("mean", "b"))


# ---- Best-of-Poisson -----------------------------------------------------------------------


def test_poisson_coefficients_against_scipy():
    for mu in (0.0, 0.7, 3.0, 40.0):
        N = 12
        c, dc, tail = poisson_n_coefficients(mu, N)
        pmf = stats.poisson.pmf(np.arange(N - 1), mu)
        assert np.allclose(c[:-1], pmf, rtol=1e-12, atol=1e-300)
        assert c[-1] == pytest.approx(stats.poisson.sf(N - 2, mu), rel=1e-12, abs=1e-300)
        assert tail == pytest.approx(stats.poisson.sf(N - 1, mu), rel=1e-12, abs=1e-300)
        assert c.sum() == pytest.approx(1.0, abs=1e-12)
        h = 1e-6 * max(mu, 1.0)
        c_plus, _, _ = poisson_n_coefficients(mu + h, N)
        if mu > 0:
            c_minus, _, _ = poisson_n_coefficients(mu - h, N)
            assert np.allclose(dc, (c_plus - c_minus) / (2 * h), atol=1e-7)


def test_bop_weights_are_the_poisson_mixture_of_brute_force_best_of_n():
    rng = np.random.default_rng(3)
    N = 7
    proxy = rng.integers(0, 3, N).tolist()  # ties
    true = rng.integers(-1, 3, N).tolist()
    per_n = [float(bon_expected(proxy, true, n)) for n in range(1, N + 1)]
    mus = np.array([0.0, 0.5, 2.0, 9.0])
    inp = selection_input(np.array([proxy], dtype=float), np.array([true], dtype=float))
    stats_ = compute_selection_statistics(inp, mus=mus, lambdas=[0.0], n_resamples=1, soft_n=1)
    bop = stats_.get("member").curve("bop")
    for j, mu in enumerate(mus):
        pmf = stats.poisson.pmf(np.arange(N - 1), mu)  # n = 1 + K for n < N
        capped = np.append(pmf, 1.0 - pmf.sum())  # n = N takes the rest
        assert bop.true_mean[j] == pytest.approx(float(capped @ np.array(per_n)), abs=1e-12)
        assert bop.truncation_bound[j] == pytest.approx(
            stats.poisson.sf(N - 1, mu) * (max(true) - min(true)), abs=1e-12
        )
    assert bop.true_mean[0] == pytest.approx(np.mean(true), abs=1e-12)  # mu = 0 is the base policy


def test_bop_truncation_bound_holds_on_an_exact_population():
    # A discrete population whose best-of-n curve is known for every n (draws with replacement).
    q = np.array([0.05, 0.15, 0.3, 0.3, 0.2])  # proxy levels ascending
    t_of_level = np.array([0.0, 0.6, 1.0, 0.4, 0.1])  # true reward, within [0, 1]: hacking at the top
    F = np.cumsum(q)
    F_below = np.concatenate([[0.0], F[:-1]])

    def bon(n):
        return float(((F**n - F_below**n) * t_of_level).sum())

    for N in (4, 8, 16):
        for mu in (1.0, 5.0, 20.0):
            c, _, tail = poisson_n_coefficients(mu, N)
            capped = sum(c[n - 1] * bon(n) for n in range(1, N + 1))
            full = sum(stats.poisson.pmf(n - 1, mu) * bon(n) for n in range(1, 400))
            assert abs(full - capped) <= tail * (t_of_level.max() - t_of_level.min()) + 1e-12


def test_bop_matches_a_monte_carlo_of_a_million_draws():
    rng = np.random.default_rng(11)
    N = 10
    proxy = rng.integers(0, 4, N).astype(float)  # ties broken at random by the procedure
    true = rng.standard_normal(N)
    mu = 3.0
    inp = selection_input(proxy[None, :], true[None, :])
    stats_ = compute_selection_statistics(inp, mus=[mu], lambdas=[0.0], n_resamples=1, soft_n=1)
    estimate = stats_.get("member").curve("bop").true_mean[0]
    D = 1_000_000
    n = np.minimum(1 + rng.poisson(mu, D), N)  # the capped rule, what N samples measure exactly
    position = np.argsort(rng.random((D, N)), axis=1)  # a random order: the first n are the subset
    in_subset = np.empty((D, N), dtype=bool)
    np.put_along_axis(in_subset, position, np.arange(N)[None, :] < n[:, None], axis=1)
    key = np.where(in_subset, proxy[None, :] + 0.5 * rng.random((D, N)), -np.inf)  # random tie-break
    picked = true[np.argmax(key, axis=1)]
    se = picked.std() / math.sqrt(D)
    assert abs(picked.mean() - estimate) < 4 * se


def test_bop_derivative_weights_are_the_derivative_of_the_weights():
    N = 9
    mus = np.array([0.5, 2.0, 6.0])
    h = 1e-6
    _, dW, _ = bop_rank_weights(N, mus)
    W_plus, _, _ = bop_rank_weights(N, mus + h)
    W_minus, _, _ = bop_rank_weights(N, mus - h)
    assert np.allclose(dW, (W_plus - W_minus) / (2 * h), atol=1e-7)
    assert np.allclose(dW.sum(axis=0), 0.0, atol=1e-12)


# ---- KL of Best-of-Poisson -----------------------------------------------------------------


def _direct_bop_masses(q: np.ndarray, mu: float, n_max: int = 600) -> np.ndarray:
    F = np.cumsum(q)
    F_below = np.concatenate([[0.0], F[:-1]])
    n = np.arange(1, n_max + 1)
    pmf = stats.poisson.pmf(n - 1, mu)
    return (pmf[:, None] * (F[None, :] ** n[:, None] - F_below[None, :] ** n[:, None])).sum(axis=0)


@pytest.mark.parametrize("mu", [0.3, 2.0, 15.0, 60.0])
def test_bop_kl_on_atoms_matches_the_direct_mixture(mu):
    counts = np.array([1, 3, 2, 4])  # N = 10 samples on four levels
    N = int(counts.sum())
    q = counts / N
    masses = _direct_bop_masses(q, mu)
    direct = float(np.sum(np.where(masses > 0, masses * np.log(masses / q), 0.0)))
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    assert bop_level_kl(start, counts, N, mu, np.ones(4, dtype=bool)) == pytest.approx(direct, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("mu", [0.2, 1.0, 7.5, 120.0, 900.0])
def test_bop_kl_continuous_matches_the_mixture_density(mu):
    n = np.arange(1, int(mu + 40 * math.sqrt(mu) + 60))
    pmf = stats.poisson.pmf(n - 1, mu)

    def density(u):  # sum_n P(n) n u^(n-1), built term by term (not from the generating function)
        return float(np.sum(pmf * n * np.exp((n - 1) * np.log(u)))) if u > 0 else float(pmf[0])

    def integrand(u):
        d = density(u)
        return d * math.log(d) if d > 0 else 0.0

    breaks = sorted({max(0.0, 1 - k / mu) for k in (1, 3, 10, 30)} - {0.0})
    direct, _ = integrate.quad(integrand, 0.0, 1.0, points=breaks, limit=400, epsabs=1e-12, epsrel=1e-10)
    assert kl_bop(mu) == pytest.approx(direct, rel=1e-7)


@pytest.mark.parametrize("mu", [0.5, 4.0, 30.0])
def test_bop_kl_continuous_matches_khalaf_et_al_closed_form_density(mu):
    # Khalaf et al. 2025 (arXiv 2506.19248), BoP with n = 1 + Poisson(mu): the density of the
    # pick's proxy quantile is q(x) = (mu x + 1) exp(mu (x - 1)) on [0, 1].
    def integrand(x):
        log_q = math.log1p(mu * x) + mu * (x - 1)
        return math.exp(log_q) * log_q

    direct, _ = integrate.quad(integrand, 0.0, 1.0, limit=400, epsabs=1e-13, epsrel=1e-11)
    assert kl_bop(mu) == pytest.approx(direct, rel=1e-8)


def test_bop_kl_per_prompt_modes():
    tie_free = np.sort(np.random.default_rng(0).standard_normal((2, 50)), axis=1)
    new_group = np.ones_like(tie_free, dtype=bool)
    mus = np.array([0.0, 4.0])
    assert np.allclose(bop_kl_per_prompt(tie_free, new_group, mus, "auto"), kl_bop(mus))
    # every level an atom: the discrete value, below the continuous one
    discrete = bop_kl_per_prompt(tie_free, new_group, mus, "discrete")
    assert np.all(discrete[:, 1] < kl_bop(4.0)) and np.all(discrete[:, 0] == 0.0)
    # all tied in pairs: auto treats them as atoms, matching the direct mixture
    paired = np.repeat(np.arange(5.0), 2)[None, :]
    groups = np.ones((1, 10), dtype=bool)
    groups[0, 1::2] = False
    masses = _direct_bop_masses(np.full(5, 0.2), 4.0)
    direct = float(np.sum(masses * np.log(masses / 0.2)))
    assert bop_kl_per_prompt(paired, groups, mus, "auto")[0, 1] == pytest.approx(direct, rel=1e-9)


def test_bop_kl_is_below_bon_kl_at_the_same_mean_n():
    # Khalaf et al.: BoP is close to the optimal tilted policy; at equal E[n] its KL is lower than BoN's.
    for mu in (3.0, 15.0, 63.0):
        n = mu + 1
        assert kl_bop(mu) < math.log(n) - (n - 1) / n


def test_bon_estimates_through_selection_statistics_equal_bon_estimate():
    rng = np.random.default_rng(5)
    proxy, true = rng.standard_normal((20, 8)), rng.standard_normal((20, 8))
    inp = selection_input(proxy, true)
    s = compute_selection_statistics(inp, ns=[1, 2, 4, 8], n_resamples=10, soft_n=2)
    curve = s.get("member").curve("bon")
    assert np.allclose(curve.true_mean, bon_estimate(proxy, true, [1, 2, 4, 8]).mean(axis=0), atol=1e-12)
