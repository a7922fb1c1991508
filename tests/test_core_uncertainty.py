"""Goodhart-point intervals by resampling prompts; the simulation family's exact curves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bon_tracker.core import bon_curve, bon_estimate, default_ns, fit_overoptimization, kl_bon
from bon_tracker.core.prediction import predict_curve
from bon_tracker.core.simulation import SimulationModel, normal_max_moments, simulated_runs
from bon_tracker.core.uncertainty import (
    BootstrapDraws,
    goodhart_interval,
    kl_to_n,
    prompt_resample_counts,
    resample_prompt_means,
)


# ---- the simulation family -------------------------------------------------------------------
def test_normal_max_moments_closed_forms_and_monte_carlo():
    m1, m2 = normal_max_moments([1, 2, 3, 64])
    assert m1[:3] == pytest.approx([0.0, 1 / math.sqrt(math.pi), 1.5 / math.sqrt(math.pi)], abs=1e-9)
    assert m2[:3] == pytest.approx([1.0, 1.0, 1.0 + math.sqrt(3) / (2 * math.pi)], abs=1e-9)
    draws = np.random.default_rng(0).standard_normal((100_000, 64)).max(axis=1)
    assert m1[3] == pytest.approx(draws.mean(), abs=4 * draws.std() / math.sqrt(len(draws)))


def test_simulated_bon_curve_matches_the_exact_gain():
    model = SimulationModel(gamma=0.2, noise=1.0)
    rng = np.random.default_rng(1)
    proxy, true = model.sample(model.draw_prompts(4000, rng), 32, 0.7, rng)
    curve = bon_curve(proxy, true, [1, 2, 8, 32])
    want_true, want_proxy = model.bon_gain([1, 2, 8, 32], lam=0.7)
    got = curve.true_mean - curve.true_mean[0]
    np.testing.assert_allclose(got, want_true, atol=4 * curve.true_se.max())
    np.testing.assert_allclose(curve.proxy_mean - curve.proxy_mean[0], want_proxy, atol=0.02)
    assert curve.true_mean[0] == pytest.approx(model.policy_true(0.7), abs=4 * curve.true_se[0])


def test_exact_peak_and_run_ground_truth():
    model = SimulationModel(gamma=0.8 / 3)
    peak = model.bon_peak()
    grid = np.exp(np.linspace(0, 6, 601))
    gains = model.bon_gain(grid)[0]
    assert peak["n"] == pytest.approx(grid[np.argmax(gains)], rel=2e-2)
    assert peak["gain"] >= gains.max() - 1e-12
    near = model.bon_gain([peak["n"] * 0.999, peak["n"] * 1.001])[0]
    assert np.all(near <= peak["gain"])
    assert peak["kl"] == pytest.approx(kl_bon(peak["n"]))
    assert model.bon_peak(lam=model.peak_lam)["n"] == 1.0  # at the policy's peak, selection only hurts
    run = simulated_runs("peaked", 1, seed=2)[0]
    assert run.policy_kl(run.peak_eval) == pytest.approx(1.5**2 / 2)
    assert np.argmax(run.model.policy_true(np.array(run.lams))) == run.peak_eval


# ---- resampling --------------------------------------------------------------------------------
def test_resampled_means_equal_brute_force_over_the_same_draws():
    contrib = np.random.default_rng(3).normal(size=(37, 2))
    got = resample_prompt_means(contrib, 50, rng=9)
    idx = np.random.default_rng(9).integers(0, 37, size=(50, 37), dtype=np.uint16)
    np.testing.assert_allclose(got, contrib[idx].mean(axis=1), rtol=1e-12)
    counts = prompt_resample_counts(37, 50, rng=4)
    assert counts.shape == (50, 37) and np.all(counts.sum(axis=1) == 37)
    wide = resample_prompt_means(np.column_stack([contrib, contrib[:, :1]]), 20, rng=4)
    np.testing.assert_allclose(
        wide, prompt_resample_counts(37, 20, rng=4) @ np.column_stack([contrib, contrib[:, :1]]) / 37
    )


@pytest.mark.parametrize(("P", "B"), [(3000, 50), (50_000, 20), (70_000, 3), (7, 10_000), (1, 4)])
def test_resampling_in_blocks_of_resamples_is_the_whole_gather(P, B):
    """Means gathered a few resamples at a time (and counts bincounted so) are, to the bit, those of
    the whole (B, P) gather and of one bincount over every cell, from the same single draw (the counts
    are drawn a few resamples at a time too: the same numbers)."""
    contrib = np.random.default_rng(5).normal(size=(P, 2))
    dtype = np.uint16 if P <= 65535 else np.int64
    idx = np.random.default_rng(2).integers(0, P, size=(B, P), dtype=dtype)
    packed = contrib[:, 0] + 1j * contrib[:, 1]
    whole = packed.take(idx).sum(axis=1) / P
    got = resample_prompt_means(contrib, B, rng=2)
    np.testing.assert_array_equal(got, np.column_stack([whole.real, whole.imag]))
    np.testing.assert_array_equal(resample_prompt_means(contrib[:, :1], B, rng=2), whole.real[:, None])
    draws = np.random.default_rng(2).integers(0, P, size=(B, P), dtype=np.int64)
    cells = (draws + (np.arange(B) * P)[:, None]).ravel()
    want = np.bincount(cells, minlength=B * P).reshape(B, P).astype(np.float64)
    np.testing.assert_array_equal(prompt_resample_counts(P, B, rng=2), want)


@pytest.mark.parametrize("seed", [0, 9, 2**40 + 3])
def test_uint16_draws_on_whole_arrays_are_numpys_own(seed):
    """The bootstrap's indices drawn on whole arrays (where numpy's own loop branches on many
    rejected words) are numpy's to the bit: every rejection rate, both ends of the range, sizes
    that end inside a block of words and past several."""
    from bon_tracker.core.uncertainty import _MANY_REJECTED, _lemire_threshold_16, _uint16_integers

    cases = [(1, 5), (2, 999), (3, 7), (1000, 3), (3000, 40), (33_000, 9), (50_000, 7), (65_534, 3), (65_535, 2)]
    cases += [(40_000, 1), (20_000, 70)]  # 40,000 words: less than one block; 1.4 million: several
    for P, B in cases:
        want = np.random.default_rng(seed).integers(0, P, size=(B, P), dtype=np.uint16)
        np.testing.assert_array_equal(_uint16_integers(seed, P, (B, P)), want, err_msg=f"P={P}, B={B}")
    assert _lemire_threshold_16(50_000) == 15_536 >= _MANY_REJECTED > _lemire_threshold_16(1000)


def test_shared_draws_give_the_same_intervals_and_predictions():
    """With one BootstrapDraws the steps of one size share one draw (read-only): every interval
    and prediction is the one drawn afresh; a generator or another size draws its own."""
    rng = np.random.default_rng(8)
    ns = np.array([1, 2, 4, 8, 16])
    d = np.sqrt(kl_bon(ns))
    steps = [d * (1.0 - g * d) + 0.3 * rng.standard_normal((P, 5)) for g, P in ((0.3, 300), (0.5, 300), (0.4, 301))]
    fresh = [(goodhart_interval(t, ns, n_resamples=200), predict_curve(t, t + 1.0, ns, [32, 64], n_resamples=200))
             for t in steps]  # fmt: skip
    draws = BootstrapDraws()
    shared = [
        (
            goodhart_interval(t, ns, n_resamples=200, draws=draws),
            predict_curve(t, t + 1.0, ns, [32, 64], n_resamples=200, draws=draws),
        )
        for t in steps
    ]
    counts = prompt_resample_counts(300, 200, rng=0, draws=draws)
    assert prompt_resample_counts(300, 200, rng=0, draws=draws) is counts and not counts.flags.writeable
    assert prompt_resample_counts(300, 200, rng=np.random.default_rng(0), draws=draws) is not counts
    assert prompt_resample_counts(300, 200, rng=0) is not counts  # without the object: drawn afresh
    np.testing.assert_array_equal(prompt_resample_counts(300, 200, rng=0), counts)
    for (ci_a, pred_a), (ci_b, pred_b) in zip(fresh, shared):
        assert ci_a.to_dict() == ci_b.to_dict()
        assert pred_a.rows() == pred_b.rows()
    assert fresh[0][0].to_dict() != fresh[1][0].to_dict()  # the steps differ; only the draws are shared


def test_shared_draws_past_their_bound_are_drawn_afresh_with_the_same_numbers():
    draws = BootstrapDraws(max_bytes=300 * 200 * 8)  # the counts of 300 prompts x 200 resamples fit
    kept = prompt_resample_counts(300, 200, rng=0, draws=draws)
    assert prompt_resample_counts(300, 200, rng=0, draws=draws) is kept
    big = prompt_resample_counts(301, 200, rng=0, draws=draws)
    again = prompt_resample_counts(301, 200, rng=0, draws=draws)
    assert again is not big and np.array_equal(again, big)
    np.testing.assert_array_equal(big, prompt_resample_counts(301, 200, rng=0))
    assert prompt_resample_counts(300, 200, rng=0, draws=draws) is kept  # too big to keep: the kept entry stays


def test_kl_to_n_inverts_kl_bon():
    ns = np.array([1.0, 1.5, 2.0, 16.0, 1000.0, 6e4, 1e12])
    np.testing.assert_allclose(kl_to_n(kl_bon(ns)), ns, rtol=1e-9)
    assert kl_to_n(0.0) == 1.0 and kl_to_n(np.inf) == np.inf
    assert kl_to_n(600.0) == pytest.approx(math.exp(601.0), rel=1e-9) and kl_to_n(800.0) == np.inf


# ---- the interval ----------------------------------------------------------------------------------
def test_point_estimate_is_the_curve_fit():
    model = SimulationModel(gamma=0.25)
    rng = np.random.default_rng(5)
    proxy, true = model.sample(model.draw_prompts(100, rng), 16, 0.0, rng)
    ns = default_ns(16)
    ci = goodhart_interval(bon_estimate(proxy, true, ns), ns)
    fit = fit_overoptimization(bon_curve(proxy, true, ns))
    assert (ci.alpha, ci.beta) == pytest.approx((fit.true.alpha, fit.true.beta), rel=1e-10)
    assert ci.kl == pytest.approx(fit.goodhart_kl, rel=1e-10)
    assert ci.n == pytest.approx(fit.goodhart_n, rel=1e-8)
    assert ci.gain == pytest.approx(fit.true.peak_gain, rel=1e-10)
    assert ci.n_low <= ci.n <= ci.n_high and ci.kl_low <= ci.kl <= ci.kl_high and ci.gain_low <= ci.gain <= ci.gain_high
    assert ci.n_low == pytest.approx(kl_to_n(ci.kl_low)) and ci.n_high == pytest.approx(kl_to_n(ci.kl_high))


def test_extended_peak_for_falling_and_rising_curves():
    ns = np.array([1, 2, 4, 8])
    d = np.sqrt(kl_bon(ns))
    noise = 0.01 * np.random.default_rng(6).standard_normal((50, 4))
    falling = goodhart_interval(-d - d * d + noise, ns)
    assert (falling.n, falling.kl, falling.gain, falling.n_high) == (1.0, 0.0, 0.0, 1.0)
    rising = goodhart_interval(d + d * d + noise, ns)
    assert rising.n == math.inf and rising.n_low == math.inf and rising.p_no_peak == 1.0


def test_resampling_prompts_not_samples_width_tracks_prompt_count():
    """The interval shrinks like 1/sqrt(P); duplicating every prompt's row adds no information but halves nothing."""
    model = SimulationModel(gamma=0.8 / 3)
    rng = np.random.default_rng(7)
    ns = default_ns(16)
    widths = []
    for P in (100, 400):
        proxy, true = model.sample(model.draw_prompts(P, rng), 16, 0.0, rng)
        ci = goodhart_interval(bon_estimate(proxy, true, ns), ns)
        widths.append(ci.gain_high - ci.gain_low)
    assert widths[1] / widths[0] == pytest.approx(0.5, abs=0.15)


def test_coverage_in_simulation_is_near_nominal():
    model = SimulationModel(gamma=0.8 / 3)
    truth = model.bon_peak()
    ns = default_ns(16)
    rng = np.random.default_rng(8)
    reps = 200
    hits = np.zeros(2)
    for r in range(reps):
        proxy, true = model.sample(model.draw_prompts(128, rng), 16, 0.0, rng)
        ci = goodhart_interval(bon_estimate(proxy, true, ns), ns, n_resamples=400, rng=r)
        hits += [ci.kl_low <= truth["kl"] <= ci.kl_high, ci.gain_low <= truth["gain"] <= ci.gain_high]
    assert np.all((hits / reps > 0.89) & (hits / reps < 0.99)), hits / reps


def test_bca_agrees_with_percentile_on_a_well_determined_peak():
    model = SimulationModel(gamma=0.4)
    rng = np.random.default_rng(10)
    proxy, true = model.sample(model.draw_prompts(500, rng), 64, 0.0, rng)
    ns = default_ns(64)
    true_pp = bon_estimate(proxy, true, ns)
    pct, bca = goodhart_interval(true_pp, ns), goodhart_interval(true_pp, ns, method="bca")
    assert bca.kl == pct.kl and bca.method == "bca"
    assert bca.kl_low == pytest.approx(pct.kl_low, rel=0.15) and bca.kl_high == pytest.approx(pct.kl_high, rel=0.15)


def test_interval_input_errors():
    ns = np.array([1, 2, 4])
    with pytest.raises(ValueError, match="n = 1"):
        goodhart_interval(np.zeros((5, 3)), [2, 4, 8])
    with pytest.raises(ValueError, match="method"):
        goodhart_interval(np.zeros((5, 3)), ns, method="normal")
    with pytest.raises(ValueError, match=r"\(P, len\(ns\)\)"):
        goodhart_interval(np.zeros((5, 2)), ns)
    with pytest.raises(ValueError, match="two n > 1"):
        goodhart_interval(np.column_stack([np.zeros(5), np.zeros(5), np.r_[np.nan, np.zeros(4)]]), ns)
