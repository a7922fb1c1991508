"""Prediction from small n: exact on the law, consistent with the fit, honest in simulation."""

from __future__ import annotations

import numpy as np
import pytest

from bon_tracker.core import bon_curve, bon_estimate, default_ns, fit_overoptimization, kl_bon
from bon_tracker.core.prediction import predict_curve
from bon_tracker.core.simulation import SimulationModel


def test_exact_on_data_that_follow_the_law():
    ns = np.array([1, 2, 4, 8])
    d = np.sqrt(kl_bon(ns))
    offsets = np.linspace(-1, 1, 20)[:, None]  # prompt effects cancel in gains
    true_pp = offsets + d * (0.8 - 0.3 * d)
    proxy_pp = 2 * offsets + 1.1 * d
    target = np.array([2, 16, 1024, 60_000])
    pred = predict_curve(true_pp, proxy_pp, ns, target)
    dt = np.sqrt(kl_bon(target))
    np.testing.assert_allclose(pred.true_gain, dt * (0.8 - 0.3 * dt), atol=1e-12)
    np.testing.assert_allclose(pred.proxy_gain, 1.1 * dt, atol=1e-12)
    np.testing.assert_allclose(pred.true_gain_high - pred.true_gain_low, 0, atol=1e-12)  # no prompt-to-prompt spread
    assert pred.predicted.tolist() == [False, True, True, True] and pred.measured_max_n == 8
    assert pred.rows()[2]["predicted"] and pred.rows()[2]["n"] == 1024


def test_matches_the_curve_fit_and_the_absolute_means():
    rng = np.random.default_rng(0)
    model = SimulationModel(gamma=0.2)
    proxy, true = model.sample(model.draw_prompts(80, rng), 16, 0.0, rng)
    ns = default_ns(16)
    pred = predict_curve(bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns), ns, [64, 256])
    curve = bon_curve(proxy, true, ns)
    fit = fit_overoptimization(curve)
    d = np.sqrt(kl_bon(np.array([64, 256])))
    np.testing.assert_allclose(pred.true_gain, fit.true.predict(d), rtol=1e-10)
    np.testing.assert_allclose(pred.proxy_gain, fit.proxy.predict(d), rtol=1e-10)
    np.testing.assert_allclose(pred.true_mean, curve.true_mean[0] + pred.true_gain, rtol=1e-10)
    assert np.all(pred.true_mean_low <= pred.true_mean) and np.all(pred.true_mean <= pred.true_mean_high)


def test_fit_on_small_n_predicts_the_held_out_curve_in_simulation():
    """Fit on n <= N/8 of N = 512; the exact curve at n = 512 lies within the prediction interval."""
    model = SimulationModel(gamma=0.2)
    rng = np.random.default_rng(1)
    proxy, true = model.sample(model.draw_prompts(400, rng), 512, 0.0, rng)
    ns = default_ns(64)
    pred = predict_curve(bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns), ns, [256, 512])
    exact_true, exact_proxy = model.bon_gain([256, 512])
    assert np.all((pred.true_gain_low <= exact_true) & (exact_true <= pred.true_gain_high))
    np.testing.assert_allclose(pred.true_gain, exact_true, atol=0.08)
    np.testing.assert_allclose(pred.proxy_gain, exact_proxy, atol=0.15)


def test_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        predict_curve(np.zeros((3, 3)), np.zeros((3, 2)), [1, 2, 4], [8])
    with pytest.raises(ValueError, match="level"):
        predict_curve(np.zeros((3, 3)), np.zeros((3, 3)), [1, 2, 4], [8], level=95)
