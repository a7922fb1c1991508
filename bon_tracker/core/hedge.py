"""The hedged optimum of a selection rule: where its expected true reward stops rising.

Khalaf et al. 2025 (arXiv 2506.19248, "HedgeTune") find the parameter theta of an
inference-time method at which ``d/dtheta E_theta[true] = 0``, from samples alone, with no
functional form (unlike Gao et al. 2022's fit ``d (alpha - beta d)``, core/fit.py). Here:

* **best-of-n**, two readings. (1) ``derivative_root``: HedgeTune's estimator. A continuous
  proxy gives best-of-n the density ``n F^(n-1) p``, so ``d/dn E_n[t] = E_n[t (1/n + log F)]``.
  With F the prompt's empirical CDF from ranks (F_k = k/N, ties sharing their group's mean
  true reward) this is exactly the derivative in (real) n of the plug-in curve
  ``sum_k t_(k) (F_k^n - F_(k-1)^n)``:  ``D(n) = sum_k t_(k) (F_k^n log F_k - F_(k-1)^n log F_(k-1))``.
  (2) ``curve_argmax``: the integer n maximising the exact all-subsets curve (n = 1..N). n is
  an integer in deployment, and there the argmax of the exact curve *is* the point where
  the discrete derivative ``BoN(n+1) - BoN(n)`` changes sign; both are reported, and they
  differ only by the plug-in's bias and the grid.
* **Best-of-Poisson**: the exact derivative ``E_mu[BoN(n+1) - BoN(n)]`` (core/poisson.py).
* **soft best-of-n**: ``d/dlam E[t] = E_S[Cov_softmax(t, z)]`` (core/soft_bon.py).

The root is a down-crossing of the mean derivative over the grid, located by linear
interpolation between grid points in ``log1p(theta - theta_0)`` (log n for n). Khalaf et al.'s
Theorem 1 gives at most one interior extremum under their TP2 conditions; where the measured
derivative shows several local maxima (heavy-tailed scores can break those conditions), the
one where the family's measured curve is highest is taken. Its interval
resamples **prompts** (never samples within a prompt, DESIGN.md): each resample's mean
derivative gives its own root. A mean derivative <= 0 at the first grid point is
``status="at_start"`` (any selection lowers true reward); one still > 0 at the last point is
``"beyond_grid"`` (value ``inf``: the optimum is past what was measured).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from bon_tracker.core.uncertainty import prompt_resample_counts

STATUSES = ("interior", "at_start", "beyond_grid")


@dataclass(frozen=True)
class HedgedOptimum:
    """One rule family's optimum and its interval from resampling prompts.

    Attributes:
        family: ``"bon"``, ``"bop"`` or ``"soft"``.
        parameter: ``"n"``, ``"mu"`` or ``"lambda"``.
        method: ``"derivative_root"`` or ``"curve_argmax"``.
        value: the optimum (``inf`` beyond the grid).
        low, high: percentile interval at ``level`` (inf allowed).
        status: one of :data:`STATUSES`.
        p_beyond: share of resamples whose optimum lies beyond the grid.
        true_mean, kl: the family's curve (mean true reward, KL) at the optimum, interpolated
            between grid points (at the grid's end when beyond it).
    """

    family: str
    parameter: str
    method: str
    value: float
    low: float
    high: float
    status: str
    p_beyond: float
    true_mean: float
    kl: float
    level: float
    n_resamples: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HedgedOptimum:
        return cls(
            **{
                k: (float(v) if isinstance(v, (int, float)) and k not in ("n_resamples",) else v)
                for k, v in data.items()
            }
        )


def _coordinate(grid: np.ndarray, origin: float) -> np.ndarray:
    return np.log1p(np.maximum(grid - origin, 0.0))


def _roots(
    grid: np.ndarray, means: np.ndarray, origin: float, curve_grid: np.ndarray, curve_true: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The maximum per row of ``means (B, G)`` (a derivative): ``(value, status index)``; inf beyond the grid.

    Candidates are the local maxima the derivative shows: each down-crossing (interpolated), the
    start where the derivative is <= 0 there, the end (beyond the grid) where it is still > 0.
    Where there are several (a curve that is not unimodal), the one where the family's mean
    curve ``curve_true`` is highest wins.
    """
    B, G = means.shape
    c = _coordinate(grid, origin)
    finite = np.isfinite(curve_grid)
    known_c, known_y = _coordinate(curve_grid[finite], origin), curve_true[finite]
    scores, values, statuses = [], [], []
    start = np.where(means[:, 0] <= 0, float(np.interp(c[0], known_c, known_y)), -np.inf)
    scores.append(start[:, None])
    values.append(np.full((B, 1), grid[0]))
    statuses.append(np.ones((B, 1), dtype=int))
    if G > 1:
        m0, m1 = means[:, :-1], means[:, 1:]
        down = (m0 > 0) & (m1 <= 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            frac = np.where(down, m0 / (m0 - m1), 0.0)
        coord = c[:-1] + frac * (c[1:] - c[:-1])
        scores.append(np.where(down, np.interp(coord, known_c, known_y), -np.inf))
        values.append(np.expm1(coord) + origin)
        statuses.append(np.zeros((B, G - 1), dtype=int))
    # beyond the grid: rising at the end; scored just above the curve's end so that it wins a tie there
    end_score = float(known_y[-1]) if known_y.size else 0.0
    scores.append(np.where(means[:, -1] > 0, end_score + 1e-12 * (1.0 + abs(end_score)), -np.inf)[:, None])
    values.append(np.full((B, 1), np.inf))
    statuses.append(np.full((B, 1), 2))
    score, value, status = np.hstack(scores), np.hstack(values), np.hstack(statuses)
    pick = np.argmax(score, axis=1)
    rows = np.arange(B)
    return value[rows, pick], status[rows, pick]


def _interval(values: np.ndarray, level: float) -> tuple[float, float]:
    s = np.sort(values)
    B = len(s)
    a = (1.0 - level) / 2.0
    lo = s[min(max(math.floor(a * B), 0), B - 1)]
    hi = s[min(max(math.ceil((1.0 - a) * B) - 1, 0), B - 1)]
    return float(lo), float(hi)


def _at(grid: np.ndarray, curve: np.ndarray, value: float, origin: float) -> float:
    """The curve interpolated at ``value`` in the grid's coordinate (its end value beyond it)."""
    finite = np.isfinite(grid)
    g, y = grid[finite], curve[finite]
    if not math.isfinite(value):
        return float(curve[-1])
    return float(np.interp(_coordinate(np.array([value]), origin)[0], _coordinate(g, origin), y))


def derivative_root(
    family: str,
    parameter: str,
    grid: object,
    deriv_pp: np.ndarray,
    *,
    origin: float,
    curve_grid: object,
    curve_true: object,
    curve_kl: object,
    level: float = 0.95,
    n_resamples: int = 1000,
    rng: np.random.Generator | int | None = 0,
    counts: np.ndarray | None = None,
) -> HedgedOptimum:
    """The root of the mean over prompts of ``deriv_pp (P, G)`` on ``grid``, with a prompt bootstrap.

    ``curve_*``: the family's mean curve on its own grid, to read the true reward and KL there.
    ``counts``: bootstrap counts ``(B, P)`` to reuse (:func:`prompt_resample_counts`), so that
    several rules are compared on the same resamples; default drawn from ``rng``.

    Example:
        >>> grid = np.array([1.0, 2.0, 4.0, 8.0])
        >>> d = np.tile([1.0, 0.5, -0.5, -1.0], (10, 1)) + 0.01 * np.arange(10)[:, None]
        >>> opt = derivative_root("bon", "n", grid, d, origin=1.0, curve_grid=grid,
        ...     curve_true=np.array([0.0, 1.0, 1.2, 1.0]), curve_kl=np.zeros(4))
        >>> round(opt.value, 3), opt.status
        (2.918, 'interior')
    """
    grid = np.asarray(grid, dtype=np.float64)
    deriv_pp = np.asarray(deriv_pp, dtype=np.float64)
    curve_grid = np.asarray(curve_grid, dtype=np.float64)
    curve_true = np.asarray(curve_true, dtype=np.float64)
    curve_kl = np.asarray(curve_kl, dtype=np.float64)
    P = deriv_pp.shape[0]
    point, status = _roots(grid, deriv_pp.mean(axis=0)[None, :], origin, curve_grid, curve_true)
    if P >= 2 and n_resamples >= 1:
        counts = prompt_resample_counts(P, n_resamples, rng) if counts is None else counts
        n_resamples = counts.shape[0]
        boot, boot_status = _roots(grid, counts @ deriv_pp / P, origin, curve_grid, curve_true)
        low, high = _interval(boot, level)
        p_beyond = float(np.mean(boot_status == 2))
    else:
        low, high, p_beyond = math.nan, math.nan, math.nan
    value = float(point[0])
    return HedgedOptimum(
        family,
        parameter,
        "derivative_root",
        value,
        low,
        high,
        STATUSES[int(status[0])],
        p_beyond,
        _at(curve_grid, curve_true, value, origin),
        _at(curve_grid, curve_kl, value, origin),
        float(level),
        int(n_resamples),
    )


def curve_argmax(
    family: str,
    parameter: str,
    grid: object,
    curve_pp: np.ndarray,
    curve_kl: np.ndarray,
    *,
    level: float = 0.95,
    n_resamples: int = 1000,
    rng: np.random.Generator | int | None = 0,
    counts: np.ndarray | None = None,
) -> HedgedOptimum:
    """The grid point maximising the mean over prompts of ``curve_pp (P, G)``, with a prompt bootstrap.

    ``status`` is ``"at_start"`` at the first grid point and ``"beyond_grid"`` at the last (the
    curve may keep rising past it); the value is then the grid point itself.

    Example:
        >>> pp = np.tile([0.0, 1.0, 0.5], (4, 1))
        >>> curve_argmax("bon", "n", [1, 2, 3], pp, np.zeros(3)).value
        2.0
    """
    grid = np.asarray(grid, dtype=np.float64)
    curve_pp = np.asarray(curve_pp, dtype=np.float64)
    P, G = curve_pp.shape
    mean = curve_pp.mean(axis=0)
    best = int(np.argmax(mean))
    if P >= 2 and n_resamples >= 1:
        counts = prompt_resample_counts(P, n_resamples, rng) if counts is None else counts
        n_resamples = counts.shape[0]
        boot = np.argmax(counts @ curve_pp / P, axis=1)
        low, high = _interval(grid[boot], level)
        p_beyond = float(np.mean(boot == G - 1)) if G > 1 else math.nan
    else:
        low, high, p_beyond = math.nan, math.nan, math.nan
    status = "at_start" if best == 0 else ("beyond_grid" if best == G - 1 and G > 1 else "interior")
    return HedgedOptimum(
        family,
        parameter,
        "curve_argmax",
        float(grid[best]),
        low,
        high,
        status,
        p_beyond,
        float(mean[best]),
        float(curve_kl[best]),
        float(level),
        int(n_resamples),
    )


def bon_derivative(sorted_true: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """HedgeTune's ``d/dn E_n[t]`` per prompt at real ``ns``: ``(P, N)`` tie-averaged sorted true -> ``(P, G)``.

    .. math:: D(n) = \\sum_k t_{(k)} \\big(F_k^n \\log F_k - F_{k-1}^n \\log F_{k-1}\\big), \\quad F_k = k/N

    which equals ``E_n[t (1/n + log F)]`` under the plug-in best-of-n law with F from ranks.

    Example:
        >>> d = bon_derivative(np.array([[0.0, 1.0]]), np.array([1.0]))  # t rises with rank
        >>> round(float(d[0, 0]), 6)  # 0.5^1 log 0.5 * (0 - 1) = log 2 / 2
        0.346574
    """
    N = sorted_true.shape[1]
    F = np.arange(N + 1, dtype=np.float64) / N
    with np.errstate(divide="ignore"):
        log_f = np.where(F > 0, np.log(np.where(F > 0, F, 1.0)), 0.0)
    # h(n, F) = F^n log F (0 at F = 0 and F = 1); D = sum_k t_k (h_k - h_{k-1})
    h = np.exp(np.outer(ns, log_f)) * log_f  # (G, N + 1)
    h[:, 0] = 0.0
    return sorted_true @ (h[:, 1:] - h[:, :-1]).T
