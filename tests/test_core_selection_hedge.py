"""The hedged optimum (HedgeTune), and the synthetic ensemble whose answer is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bon_tracker.core.curve import bon_curve
from bon_tracker.core.hedge import bon_derivative, curve_argmax, derivative_root
from bon_tracker.core.selection import selection_input
from bon_tracker.core.selection_stats import compute_selection_statistics


def _plug_in_curve(sorted_true: np.ndarray, n: float) -> np.ndarray:
    N = sorted_true.shape[1]
    F = np.arange(N + 1) / N
    return sorted_true @ (F[1:] ** n - F[:-1] ** n)


def test_bon_derivative_is_the_derivative_of_the_plug_in_curve():
    rng = np.random.default_rng(0)
    st = rng.standard_normal((5, 20))
    ns = np.array([1.0, 2.7, 9.0, 19.5])
    h = 1e-6
    fd = np.column_stack([(_plug_in_curve(st, n + h) - _plug_in_curve(st, n - h)) / (2 * h) for n in ns])
    assert np.allclose(bon_derivative(st, ns), fd, atol=1e-6)


def test_bon_derivative_is_hedgetunes_expectation_for_a_continuous_proxy():
    # E_n[t (1/n + log F)] with t = F (the true reward is the proxy's quantile): int n u^(n-1) u (1/n + log u) du
    N = 20000
    st = ((np.arange(N) + 0.5) / N)[None, :]
    for n in (1.0, 3.0, 10.0):
        exact = 1.0 / (n + 1) - n / (n + 1) ** 2  # d/dn [n / (n + 1)]
        assert bon_derivative(st, np.array([n]))[0, 0] == pytest.approx(exact, abs=1e-4)


def test_root_and_argmax_on_a_known_curve_with_an_interval_that_covers_it():
    # true(n) = log n - n / 10: peak at n = 10, derivative 1/n - 1/10
    rng = np.random.default_rng(1)
    grid = np.geomspace(1, 64, 60)
    P = 400
    deriv_pp = (1 / grid - 0.1)[None, :] + 0.05 * rng.standard_normal((P, 1))  # a per-prompt shift
    shift = deriv_pp[:, 0].mean() - (1 - 0.1)
    curve = np.log(grid) - grid / 10
    opt = derivative_root("bon", "n", grid, deriv_pp, origin=1.0, curve_grid=grid, curve_true=curve,
                          curve_kl=np.log(grid), n_resamples=400, rng=0)  # fmt: skip
    assert opt.status == "interior" and opt.value == pytest.approx(1 / (0.1 - shift), rel=0.01)
    assert opt.low <= 10.0 <= opt.high and opt.high - opt.low < 3.0
    assert opt.true_mean == pytest.approx(math.log(opt.value) - opt.value / 10, abs=1e-3)
    ints = np.arange(1, 65)
    best = curve_argmax("bon", "n", ints, np.tile(np.log(ints) - ints / 10, (3, 1)), np.zeros(64), n_resamples=10)
    assert best.value == 10.0 and best.status == "interior"


def test_statuses_at_start_and_beyond_the_grid():
    grid = np.array([1.0, 2.0, 4.0])
    falls = derivative_root("bon", "n", grid, -np.ones((3, 3)), origin=1.0, curve_grid=grid,
                            curve_true=np.zeros(3), curve_kl=np.zeros(3), n_resamples=20)  # fmt: skip
    rises = derivative_root("bon", "n", grid, np.ones((3, 3)), origin=1.0, curve_grid=grid,
                            curve_true=np.arange(3.0), curve_kl=np.zeros(3), n_resamples=20)  # fmt: skip
    assert (falls.status, falls.value) == ("at_start", 1.0)
    assert (rises.status, rises.value, rises.p_beyond, rises.true_mean) == ("beyond_grid", math.inf, 1.0, 2.0)


def _heavy_tailed_ensemble(rng, P, N, K):
    """True reward N(0, 1); each member adds independent heavy-tailed error (Student t, 1.5 dof, scale 0.3).

    Selecting hard on one member picks its error's outliers (true falls back towards the mean:
    Goodhart); the mean of K members has an error whose tail is K^(1 - 1.5) times lighter, so it
    overoptimizes later.
    """
    true = rng.standard_normal((P, N))
    members = {f"rm{k}": true + 0.3 * rng.standard_t(1.5, (P, N)) for k in range(K)}
    return members, true


def test_mean_of_independent_members_overoptimizes_later_than_any_member_and_agrees_with_monte_carlo():
    K, N = 5, 64
    members, true = _heavy_tailed_ensemble(np.random.default_rng(0), 2000, N, K)
    stats = compute_selection_statistics(selection_input(members, true), lambdas=[0.0, 1.0], n_resamples=300, soft_n=4)
    # The Monte Carlo reference: 2^14 independent prompts (a million samples) of the same model.
    ref_members, ref_true = _heavy_tailed_ensemble(np.random.default_rng(1), 1 << 14, N, K)
    ref_stats = compute_selection_statistics(selection_input(ref_members, ref_true), lambdas=[0.0], n_resamples=50,
                                             soft_n=1, rules=["rm0", "rm1", "rm2", "rm3", "rm4", "mean"])  # fmt: skip
    singles = [f"rm{k}" for k in range(K)]
    for which in (stats, ref_stats):
        mean_opt = which.get("mean").optimum("bon")
        for rule in singles:
            single = which.get(rule).optimum("bon")
            assert single.status == "interior"
            assert mean_opt.value > single.value and mean_opt.kl > single.kl
            assert mean_opt.true_mean > single.true_mean
    mean_opt, single_opts = stats.get("mean").optimum("bon"), [stats.get(r).optimum("bon") for r in singles]
    assert mean_opt.low > max(o.high for o in single_opts)  # separated beyond the resampling intervals
    for rule in [*singles, "mean"]:
        measured = stats.get(rule).curve("bon")
        reference = ref_stats.get(rule).curve("bon")
        z = (np.array(measured.true_mean) - reference.true_mean) / np.hypot(measured.true_se, reference.true_se)[None]
        assert np.all(np.abs(z[:, 1:]) < 4.5), (rule, z)
    # the reference curves are those of bon_curve on the aggregate
    mean_agg = np.mean([ref_members[r] for r in singles], axis=0)
    assert np.allclose(ref_stats.get("mean").curve("bon").true_mean, bon_curve(mean_agg, ref_true).true_mean, atol=1e-9)


def test_gao_point_is_reported_beside_the_hedged_one():
    members, true = _heavy_tailed_ensemble(np.random.default_rng(3), 1000, 64, 1)
    stats = compute_selection_statistics(selection_input(members, true), lambdas=[0.0, 1.0], n_resamples=200)
    s = stats.get("rm0")
    hedge = s.optimum("bon")
    assert math.isfinite(s.gao["n"]) and math.isfinite(hedge.value)
    assert s.gao["log_n_ratio"] == pytest.approx(math.log(s.gao["n"] / hedge.value))
    assert s.gao["intervals_overlap"] in (0.0, 1.0)
