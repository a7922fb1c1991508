"""Overoptimization fits of Gao, Schulman & Hilton 2022 (arXiv 2210.10760).

With d = sqrt(KL) and scores taken relative to the starting policy (n = 1):

* best-of-n:      R(d) = d (alpha - beta d),      peak at d* = alpha / (2 beta)
* RL checkpoints: R(d) = d (alpha - beta log d),  peak at d* = exp(alpha / beta - 1)

Both forms are linear in (alpha, beta), so ordinary least squares solves them exactly.
The fitted peak of the true score is the "Goodhart point": past that much
optimisation, more proxy optimisation lowers the true reward. The peak is taken on the
measured half-line ``d >= 0``: when the fitted true score falls from the start (it never
rises above its n = 1 value over the measured range), the peak is ``d* = 0``, i.e.
``n* = 1`` and ``KL* = 0``: any selection on this proxy already lowers the true reward --
the strongest form of Goodhart, not its absence.

A fitted peak far past the largest measured n is an extrapolation of the functional form,
not a measurement: past ``GOODHART_HORIZON`` times the largest n measured it is reported
as "beyond the measured range" (``beyond n = 4 N``), never as a number (see
:func:`goodhart_horizon`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bon_tracker.core.curve import BonCurve
from bon_tracker.core.validation import as_float, float_array

# A Goodhart point beyond this many times the largest measured n is "beyond the measured
# range": the fit's peak there is an extrapolation of the functional form, reported as
# "beyond n = <GOODHART_HORIZON x N>" and never logged or drawn as a number. 4 N is also
# the farthest n at which the tracker always predicts the curve (2 N and 4 N).
GOODHART_HORIZON = 4


def goodhart_horizon(max_n: float) -> float:
    """The largest n* reported as a number for a curve measured up to ``max_n``:
    ``GOODHART_HORIZON * max_n``.

    >>> goodhart_horizon(16)
    64.0
    """
    return float(GOODHART_HORIZON * max_n)


@dataclass(frozen=True)
class FunctionalFit:
    """One least-squares fit ``R(d) = d (alpha - beta g(d))``."""

    form: str  # "bon": g(d) = d; "rl": g(d) = log d
    alpha: float
    beta: float
    r2: float  # coefficient of determination (1 - SSE / SST about the mean)
    rmse: float
    n_points: int

    @property
    def has_peak(self) -> bool:
        """True when the fitted curve rises then falls: beta > 0, and for the best-of-n
        form alpha > 0 too (the RL form's slope is +inf at d -> 0, so beta > 0 suffices)."""
        return self.beta > 0 and (self.alpha > 0 or self.form == "rl")

    def falls_from_start(self, d_max: float = math.inf) -> bool:
        """True when the best-of-n fit has its maximum over ``0 <= d <= d_max`` at d = 0: it never
        rises above its start. Concave or straight (``beta >= 0``) with ``alpha <= 0``; or convex
        (``beta < 0``) with ``alpha < 0`` and its minimum ``alpha / (2 beta)`` at or past ``d_max``
        (the largest measured d), so that it falls over the whole measured range. Never for the RL form.
        """
        if self.form != "bon" or not (math.isfinite(self.alpha) and math.isfinite(self.beta)):
            return False
        if self.beta >= 0:
            return self.alpha <= 0
        return self.alpha < 0 and self.alpha / (2 * self.beta) >= d_max

    @property
    def peak_d(self) -> float:
        """sqrt(KL) at the fitted maximum (0 when the fit falls from the start); NaN without a peak."""
        if self.has_peak:
            if self.form == "bon":
                return self.alpha / (2 * self.beta)
            exponent = self.alpha / self.beta - 1
            return math.exp(exponent) if exponent < 709.0 else math.inf  # past float range: a peak at infinity
        if self.form == "bon" and self.beta >= 0 and self.falls_from_start():
            return 0.0
        return math.nan

    @property
    def peak_kl(self) -> float:
        d = self.peak_d
        return d * d  # a product overflows to inf, where ** raises OverflowError

    @property
    def peak_gain(self) -> float:
        """Fitted score gain over the start at the peak (0 when the fit falls from the start)."""
        d = self.peak_d
        return float(self.predict(d)) if math.isfinite(d) else math.nan

    def predict(self, d: object) -> np.ndarray | float:
        d_arr = np.asarray(d, dtype=np.float64)
        shape = d_arr if self.form == "bon" else np.log(np.where(d_arr > 0, d_arr, 1.0))
        out = d_arr * (self.alpha - self.beta * shape)
        return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class OveroptimizationFit:
    """Fits of a best-of-n curve's true and proxy scores, and the Goodhart point."""

    true: FunctionalFit
    proxy: FunctionalFit
    baseline_true: float  # true score at n = 1 (scores are relative to it)
    baseline_proxy: float
    goodhart_kl: float  # KL at the true-score peak (0 when true falls from the start), NaN if no peak
    goodhart_n: float  # the n with that KL (interpolated on the curve's own KL; 1 when true falls), NaN if none
    peak_within_range: bool  # the peak lies inside the measured KL range (not an extrapolation)
    falls_from_start: bool = False  # the fitted true score never rises above n = 1: n* = 1, KL* = 0
    max_n: float = math.nan  # the largest n of the fitted curve

    @property
    def has_goodhart_point(self) -> bool:
        return (self.true.has_peak or self.falls_from_start) and math.isfinite(self.goodhart_n)

    @property
    def goodhart_gain(self) -> float:
        """Fitted true-score gain over n = 1 at the Goodhart point (0 when true falls from the start)."""
        return 0.0 if self.falls_from_start else self.true.peak_gain

    @property
    def beyond_horizon(self) -> bool:
        """The fitted peak lies past :func:`goodhart_horizon` of the largest measured n (or its n
        is infinite): "beyond the measured range", an extrapolation reported without a number."""
        if not self.has_goodhart_point:
            return False
        return not self.goodhart_n <= goodhart_horizon(self.max_n) if math.isfinite(self.max_n) else False


def _least_squares(d: np.ndarray, y: np.ndarray, form: str) -> FunctionalFit:
    if form == "bon":
        design = np.column_stack([d, -(d**2)])
    else:
        design = np.column_stack([d, -d * np.log(np.where(d > 0, d, 1.0))])
    keep = np.isfinite(y) & np.isfinite(d)
    design, y, d = design[keep], y[keep], d[keep]
    if np.count_nonzero(d > 0) < 2:
        raise ValueError(
            f"need at least two points with KL > 0 to fit the {form} form, got {int(np.count_nonzero(d > 0))}"
        )
    (alpha, beta), *_ = np.linalg.lstsq(design, y, rcond=None)
    residual = y - design @ np.array([alpha, beta])
    sse = float(residual @ residual)
    sst = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else math.nan)
    return FunctionalFit(form, float(alpha), float(beta), r2, math.sqrt(sse / len(y)), len(y))


def _n_at_kl(curve: BonCurve, kl_target: float) -> float:
    """The (real-valued) n whose KL equals ``kl_target``.

    Tie-free proxies: the curve's KL is exactly log n - (n-1)/n, which is increasing
    in n, so it is inverted by bisection (also beyond the measured grid). With ties
    the KL has no closed form in n: log n is interpolated linearly in KL between the
    curve's own points, and NaN is returned outside them.
    """
    if kl_target < 0:
        return math.nan
    if curve.has_ties:
        kl, n = np.asarray(curve.kl, dtype=np.float64), np.asarray(curve.n, dtype=np.float64)
        order = np.argsort(kl)
        kl, n = kl[order], n[order]
        if not kl[0] <= kl_target <= kl[-1]:
            return math.nan
        return float(np.exp(np.interp(kl_target, kl, np.log(n))))
    if kl_target > 700:  # n = e^(KL+1) overflows a float: the peak is unreachably far
        return math.inf

    def kl_of(n: float) -> float:  # kl_bon on one float, without the array checks (called ~300 times)
        return math.log(n) - (n - 1.0) / n

    low, high = 1.0, 2.0
    while kl_of(high) < kl_target:
        low, high = high, high * 2
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if kl_of(mid) < kl_target else (low, mid)
        if high - low <= 1e-12 * high:
            break
    return 0.5 * (low + high)


def fit_overoptimization(curve: BonCurve) -> OveroptimizationFit:
    """Fit Gao et al. 2022's best-of-n form ``R(d) = d (alpha - beta d)`` to a curve.

    ``d = sqrt(KL)`` (the curve's ``kl``), and R is the score minus its value at
    n = 1, for the true and for the proxy score. The Goodhart point is the peak of
    the true-score fit: ``d* = alpha / (2 beta)``, its KL ``d*^2`` and the n with
    that KL. When the fitted true score falls from the start over the measured range
    (:meth:`FunctionalFit.falls_from_start`), the Goodhart point is ``n* = 1``, ``KL* = 0``
    (``falls_from_start``): any selection on this proxy lowers the true reward.

    Example:
        >>> from bon_tracker.core.curve import BonCurve
        >>> from bon_tracker.core.kl import kl_bon
        >>> d = np.sqrt(kl_bon(np.array([1, 2, 4, 8, 16])))
        >>> curve = BonCurve(n=np.array([1, 2, 4, 8, 16]), kl=d**2, kl_bound=d**2,
        ...     true_mean=d * (1.0 - 0.5 * d), true_se=np.zeros(5), proxy_mean=d,
        ...     proxy_se=np.zeros(5), n_prompts=np.full(5, 10), N=16, has_ties=False)
        >>> fit = fit_overoptimization(curve)
        >>> round(fit.true.alpha, 6), round(fit.true.beta, 6), round(fit.goodhart_kl, 6)
        (1.0, 0.5, 1.0)
    """
    if not isinstance(curve, BonCurve):
        raise TypeError(f"fit_overoptimization expects a BonCurve, got {type(curve).__name__}")
    at_one = np.flatnonzero(np.asarray(curve.n) == 1)
    if at_one.size == 0:
        raise ValueError("the curve's n grid must include n = 1 (scores are fitted relative to it)")
    d = np.sqrt(np.asarray(curve.kl, dtype=np.float64))
    base_true = float(curve.true_mean[at_one[0]])
    base_proxy = float(curve.proxy_mean[at_one[0]])
    true_fit = _least_squares(d, np.asarray(curve.true_mean) - base_true, "bon")
    proxy_fit = _least_squares(d, np.asarray(curve.proxy_mean) - base_proxy, "bon")
    max_kl = float(np.nanmax(curve.kl))
    max_n = float(np.max(np.asarray(curve.n)))
    falls = not true_fit.has_peak and true_fit.falls_from_start(math.sqrt(max(max_kl, 0.0)))
    if falls:  # the maximum over the measured range is the start: n* = 1
        return OveroptimizationFit(true_fit, proxy_fit, base_true, base_proxy, 0.0, 1.0, True, True, max_n)
    goodhart_kl = true_fit.peak_kl
    goodhart_n = _n_at_kl(curve, goodhart_kl) if true_fit.has_peak else math.nan
    within = bool(true_fit.has_peak and goodhart_kl <= max_kl)
    return OveroptimizationFit(
        true_fit, proxy_fit, base_true, base_proxy, goodhart_kl, goodhart_n, within, False, max_n
    )


def fit_rl_overoptimization(kl: object, score: object, baseline: float = 0.0) -> FunctionalFit:
    """Fit Gao et al. 2022's RL form ``R(d) = d (alpha - beta log d)`` to checkpoints.

    Args:
        kl: KL(policy || initial policy) of each checkpoint, nats (>= 0).
        score: the checkpoints' mean score.
        baseline: the initial policy's score; the fit is to ``score - baseline``.

    Example:
        >>> d = np.array([0.5, 1.0, 2.0, 3.0])
        >>> fit = fit_rl_overoptimization(d**2, d * (2.0 - 1.0 * np.log(d)))
        >>> round(fit.alpha, 6), round(fit.beta, 6), round(fit.peak_d, 6)
        (2.0, 1.0, 2.718282)
    """
    kl_arr = float_array(kl, "kl").ravel()
    score_arr = float_array(score, "score").ravel()
    baseline = as_float(baseline, "baseline")
    if kl_arr.shape != score_arr.shape:
        raise ValueError(f"kl and score must have the same length, got {kl_arr.shape} and {score_arr.shape}")
    if np.any(kl_arr < 0):
        raise ValueError(f"kl must be >= 0, got {kl_arr[kl_arr < 0].tolist()}")
    return _least_squares(np.sqrt(kl_arr), score_arr - float(baseline), "rl")
