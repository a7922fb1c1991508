"""Prediction from small n: the fitted law beyond the measured range, with intervals.

Reaching KL ~ 10 nats takes n ~ 60,000, while users sample N = 16-64. Gao et al.'s
best-of-n form ``R(d) = d (alpha - beta d)``, ``d = sqrt(KL)``, fitted to the measured
curve (true and proxy gains over n = 1), predicts both at larger n. Intervals resample
prompts (the same bootstrap as :func:`goodhart_interval`). They cover the uncertainty of
the fit, not the form: where the law is wrong the prediction is biased however many
prompts there are (``benchmarks/bench_alerts.py`` measures both; ``docs/alerts.md``).
Every value at an n beyond the measured grid is marked ``predicted``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bon_tracker.core.kl import kl_bon
from bon_tracker.core.uncertainty import BootstrapDraws, _design, _relative_true, prompt_resample_counts
from bon_tracker.core.validation import float_array


@dataclass(frozen=True)
class CurvePrediction:
    """The fitted best-of-n law at the n of ``n``, with intervals at ``level``.

    ``*_gain`` are gains over n = 1; ``true_mean``/``proxy_mean`` add the measured n = 1
    mean (its resampling is in the intervals). ``predicted[i]`` is True where ``n[i]`` lies
    beyond the largest measured n (an extrapolation, to be marked as such).
    """

    n: np.ndarray
    kl: np.ndarray
    predicted: np.ndarray
    true_gain: np.ndarray
    true_gain_low: np.ndarray
    true_gain_high: np.ndarray
    proxy_gain: np.ndarray
    proxy_gain_low: np.ndarray
    proxy_gain_high: np.ndarray
    true_mean: np.ndarray
    true_mean_low: np.ndarray
    true_mean_high: np.ndarray
    proxy_mean: np.ndarray
    proxy_mean_low: np.ndarray
    proxy_mean_high: np.ndarray
    measured_max_n: int
    level: float

    def rows(self) -> list[dict[str, float | int | bool]]:
        """One dict per n, for tables (``predicted`` marks extrapolated rows)."""
        names = [
            "kl", "true_mean", "true_mean_low", "true_mean_high", "proxy_mean", "proxy_mean_low", "proxy_mean_high",
        ]  # fmt: skip
        return [
            {"n": int(n), "predicted": bool(self.predicted[i]), **{k: float(getattr(self, k)[i]) for k in names}}
            for i, n in enumerate(self.n.tolist())
        ]


def predict_curve(
    true_pp: object,
    proxy_pp: object,
    ns: object,
    predict_ns: object,
    *,
    level: float = 0.95,
    n_resamples: int = 1000,
    rng: np.random.Generator | int | None = 0,
    draws: BootstrapDraws | None = None,
) -> CurvePrediction:
    """Predict true and proxy best-of-n scores at ``predict_ns`` from the measured ``ns``.

    Args:
        true_pp: per-prompt true estimates ``(P, len(ns))`` (``bon_estimate(proxy, true, ns)``).
        proxy_pp: per-prompt proxy estimates, same shape (``bon_estimate(proxy, proxy, ns)``).
        ns: the measured grid (must include n = 1; at least two n > 1).
        predict_ns: where to predict (any real n >= 1, e.g. ``[64, 1024, 60_000]``).
        level: two-sided level of the percentile intervals.
        n_resamples: bootstrap resamples of the prompts.
        rng: seed or generator of the resampling.
        draws: a :class:`~bon_tracker.core.uncertainty.BootstrapDraws` to share an integer
            seed's draws with other calls (the same results, drawn once).

    Returns:
        A :class:`CurvePrediction`; the KL of each n is ``kl_bon(n)`` (continuous proxies).

    Example:
        >>> ns = np.array([1, 2, 4, 8])
        >>> d = np.sqrt(kl_bon(ns))
        >>> true_pp = np.tile(d * (1.0 - 0.25 * d), (10, 1))
        >>> pred = predict_curve(true_pp, np.tile(d, (10, 1)), ns, [8, 64])
        >>> np.round(pred.true_gain, 4).tolist(), pred.predicted.tolist()
        ([0.7964, 0.9881], [False, True])
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n_arr = float_array(ns, "ns").ravel()
    t = float_array(true_pp, "true_pp")
    p = float_array(proxy_pp, "proxy_pp")
    if t.shape != p.shape:
        raise ValueError(f"true_pp and proxy_pp must have the same shape, got {t.shape} and {p.shape}")
    rel_t, keep = _relative_true(t, n_arr)
    rel_p, keep_p = _relative_true(p, n_arr)
    if not np.array_equal(keep, keep_p):
        raise ValueError("true_pp and proxy_pp must have NaN (n beyond a prompt's samples) in the same places")
    at_one = int(np.flatnonzero(n_arr == 1)[0])
    target = np.atleast_1d(float_array(predict_ns, "predict_ns"))
    X = _design(kl_bon(n_arr[keep]))
    solve = X @ np.linalg.pinv(X.T @ X)
    design_new = _design(kl_bon(target))  # (M, 2)
    P = rel_t.shape[0]
    # per-prompt contributions, all linear in the mean: (alpha, beta) of true and proxy, and the n = 1 means
    contrib = np.column_stack([rel_t @ solve, rel_p @ solve, t[:, at_one], p[:, at_one]])  # (P, 6)
    point = contrib.mean(axis=0)
    boot = prompt_resample_counts(P, n_resamples, rng, draws=draws) @ contrib / P  # (B, 6)
    a = (1.0 - level) / 2.0

    def band(values: np.ndarray, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        low, high = np.quantile(values, [a, 1.0 - a], axis=0)
        return centre, low, high

    true_gain = band(boot[:, 0:2] @ design_new.T, design_new @ point[0:2])
    proxy_gain = band(boot[:, 2:4] @ design_new.T, design_new @ point[2:4])
    true_mean = band(boot[:, 0:2] @ design_new.T + boot[:, 4:5], design_new @ point[0:2] + point[4])
    proxy_mean = band(boot[:, 2:4] @ design_new.T + boot[:, 5:6], design_new @ point[2:4] + point[5])
    measured_max = int(n_arr[keep].max())
    return CurvePrediction(
        target,
        kl_bon(target) if target.size else target,
        target > measured_max,
        *true_gain,
        *proxy_gain,
        *true_mean,
        *proxy_mean,
        measured_max_n=measured_max,
        level=float(level),
    )
