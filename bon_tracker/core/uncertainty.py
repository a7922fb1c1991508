"""How sure is the Goodhart point: intervals by resampling prompts.

Per-prompt best-of-n estimates are independent across prompts (DESIGN.md, error bars),
so the bootstrap resamples **prompts** -- whole rows of the ``(P, G)`` per-prompt estimate
matrix from :func:`bon_estimate` -- and never samples within a prompt. Gao et al.'s
best-of-n form ``R(d) = d (alpha - beta d)`` is linear in ``(alpha, beta)`` with a design that
depends only on the grid, so each resample's fit is one row of a ``(B, G) @ (G, 2)``
product: closed-form least squares over all B resamples at once.

The peak is taken on the whole half-line ``d >= 0``, so every resample has one:
``d* = max(alpha / (2 beta), 0)`` when ``beta > 0`` (``d* = 0``, ``n* = 1``: true falls from
the start), ``d* = inf`` when ``beta <= 0`` (no peak: true keeps rising) -- except where a
straight or convex fit falls over the whole measured range (``alpha < 0`` and its minimum
``alpha / (2 beta)`` at or past the largest measured d), whose maximum over what was measured
is the start: ``d* = 0`` as well, as :func:`~bon_tracker.core.fit.fit_overoptimization` says.
Intervals for ``n*`` and ``KL*`` are monotone maps of the interval for ``d*``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy.special import lambertw, ndtr, ndtri

from bon_tracker.core.kl import kl_bon
from bon_tracker.core.validation import float_array

_METHODS = ("percentile", "bca")


class BootstrapDraws:
    """Bootstrap draws from an integer seed, made once and shared (read-only) by every call
    given this object: pass it as ``draws=`` to :func:`goodhart_interval`,
    :func:`~bon_tracker.core.prediction.predict_curve`, :func:`prompt_resample_counts` or
    :func:`resample_prompt_means`.

    The draws are a function of (kind, prompts, resamples, seed) alone, so the eval steps of one
    analysis with the same number of prompts (every step of a fixed eval set) resample the same
    prompts: computing them once gives the very same arrays each step would draw, and results
    are exactly those of drawing again. One entry per kind (the last key) is kept; the arrays go
    with the object. ``max_bytes``: arrays larger than this are made afresh each time, never kept
    (None: no bound). Thread-safe. ``bon-tracker analyze`` makes one per analysis, a tracker one
    for its evals (bounded: see ``BonTracker``).

    Example:
        >>> draws = BootstrapDraws()
        >>> a, b = prompt_resample_counts(5, 3, rng=0, draws=draws), prompt_resample_counts(5, 3, rng=0, draws=draws)
        >>> a is b, bool(np.array_equal(a, prompt_resample_counts(5, 3, rng=0)))
        (True, True)
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[str, tuple[tuple, np.ndarray]] = {}
        self._kind_locks = {"indices": threading.Lock(), "counts": threading.Lock()}

    def get(self, kind: str, key: tuple | None, make: Callable[[], np.ndarray]) -> np.ndarray:
        """``make()``, or the array it made for the same ``key`` (``key`` None: a generator or
        fresh entropy, whose draws are never the same twice: always ``make()``)."""
        if key is None:
            return make()
        with self._kind_locks[kind]:  # a second thread asking for the same draws waits for the first's
            found = self._entries.get(kind)
            if found is not None and found[0] == key:
                return found[1]
            value = make()
            value.flags.writeable = False
            if self.max_bytes is None or value.nbytes <= self.max_bytes:
                self._entries[kind] = (key, value)
            return value


def _drawn(draws: BootstrapDraws | None, kind: str, key: tuple | None, make: Callable[[], np.ndarray]) -> np.ndarray:
    return make() if draws is None else draws.get(kind, key, make)


def _seed_key(rng: object) -> int | None:
    """The integer seed of ``rng`` (what makes its draws repeatable), None for anything else."""
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, (bool, np.bool_)):
        return int(rng)
    return None


_GATHER_CELLS = 1 << 16  # bootstrap cells worked on at once (1 MiB of complex values)


def prompt_resample_counts(
    n_prompts: int, n_resamples: int, rng: np.random.Generator | int | None, *, draws: BootstrapDraws | None = None
) -> np.ndarray:
    """Bootstrap counts ``(B, P)``: how often each prompt is drawn in each resample of P prompts.

    With ``draws`` (a :class:`BootstrapDraws`), counts of an integer seed come back shared and read-only.

    Example:
        >>> counts = prompt_resample_counts(5, 3, rng=0)
        >>> counts.shape, counts.sum(axis=1).tolist()
        ((3, 5), [5.0, 5.0, 5.0])
    """
    if n_prompts < 1 or n_resamples < 1:
        raise ValueError(f"need n_prompts >= 1 and n_resamples >= 1, got {n_prompts} and {n_resamples}")
    seed = _seed_key(rng)

    def make() -> np.ndarray:
        generator = np.random.default_rng(rng)
        # A few resamples at a time, drawn and counted: their counters stay in cache (one bincount
        # over all B x P cells strays over B x P of them), and no (B, P) array of indices is ever
        # made (fresh memory costs a page fault per page: 80 MB of it took 0.1 to 0.2 s here).
        # int64 draws of a range below 2^32 come from the generator's 32-bit stream, which carries
        # over from call to call: drawn in pieces they are the very numbers of one call (tested).
        counts = np.empty((n_resamples, n_prompts), dtype=np.float64)
        rows = max(1, _GATHER_CELLS // n_prompts)
        offsets = (np.arange(rows, dtype=np.int64) * n_prompts)[:, None]
        for start in range(0, n_resamples, rows):
            block = generator.integers(0, n_prompts, size=(min(rows, n_resamples - start), n_prompts), dtype=np.int64)
            cells = block + offsets[: len(block)] if len(block) > 1 else block
            counts[start : start + len(block)] = np.bincount(cells.ravel(), minlength=cells.size).reshape(block.shape)
        return counts

    key = None if seed is None else (n_prompts, n_resamples, seed)
    return _drawn(draws, "counts", key, make)


def resample_prompt_means(
    contrib: np.ndarray,
    n_resamples: int,
    rng: np.random.Generator | int | None,
    *,
    draws: BootstrapDraws | None = None,
) -> np.ndarray:
    """Means over B bootstrap resamples of the rows (prompts) of ``contrib (P, k)`` -> ``(B, k)``.

    Indices are drawn as small integers, all at once, and, for ``k <= 2``, gathered as one
    complex array a few resamples at a time (each resample's sum is the same as over the
    whole ``(B, P)`` gather, without holding it): about 2 ms for P = B = 1000 on one core.
    With ``draws`` (a :class:`BootstrapDraws`) the indices of an integer seed are drawn once per (P, B).

    Example:
        >>> resample_prompt_means(np.ones((4, 3)), 2, rng=0).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """
    contrib = np.asarray(contrib, dtype=np.float64)
    P, k = contrib.shape
    if P < 1 or n_resamples < 1:
        raise ValueError(f"need at least one prompt and one resample, got {P} and {n_resamples}")
    if k > 2:
        return prompt_resample_counts(P, n_resamples, rng, draws=draws) @ contrib / P
    dtype = np.uint16 if np.iinfo(np.uint16).max >= P else np.int64
    seed = _seed_key(rng)

    def make() -> np.ndarray:
        if seed is not None and dtype is np.uint16 and _lemire_threshold_16(P) >= _MANY_REJECTED:
            return _uint16_integers(seed, P, (n_resamples, P))
        return np.random.default_rng(rng).integers(0, P, size=(n_resamples, P), dtype=dtype)

    idx = _drawn(draws, "indices", None if seed is None else (P, n_resamples, seed, np.dtype(dtype).str), make)
    packed = contrib[:, 0] + 1j * (contrib[:, 1] if k == 2 else 0.0)
    sums = np.empty(n_resamples, dtype=np.complex128)
    rows = max(1, _GATHER_CELLS // P)
    for start in range(0, n_resamples, rows):
        sums[start : start + rows] = packed.take(idx[start : start + rows]).sum(axis=1)
    means = sums / P
    return np.column_stack([means.real, means.imag])[:, :k]


def _lemire_threshold_16(P: int) -> int:
    """Below this, a 16-bit word's scaled remainder is rejected by Lemire's method for ``[0, P)``."""
    return (0xFFFF - (P - 1)) % P


# numpy's uint16 draws branch on each rejection: where more than 1/32 of the words are rejected
# (P = 10,000 to 65,534 mostly: a quarter at P = 50,000) they cost 2 to 4 times _uint16_integers.
_MANY_REJECTED = 1 << 11
_WORDS_AT_ONCE = 1 << 16  # 64-bit words of the stream worked on at once (4 x 16 bits each)


def _uint16_integers(seed: int, P: int, shape: tuple[int, int]) -> np.ndarray:
    """``np.random.default_rng(seed).integers(0, P, size=shape, dtype=np.uint16)``, the same numbers,
    computed on whole arrays instead of one draw at a time (``1 <= P <= 65,535``; tested against numpy).

    numpy draws each value by Lemire's method from the generator's stream of 16-bit words: the
    32-bit outputs low half first, each the low then the high half of a 64-bit output (the words of
    ``random_raw`` in little-endian order); a word ``w`` gives ``(w P) >> 16`` unless ``(w P) mod 2^16``
    falls below the threshold, when it is skipped and the next word tried. So the values are the
    kept words' results, in order.
    """
    if P == 1:
        return np.zeros(shape, dtype=np.uint16)
    size = shape[0] * shape[1]
    out = np.empty(size, dtype=np.uint16)
    bit_generator = np.random.default_rng(seed).bit_generator
    threshold = np.uint32(_lemire_threshold_16(P))
    kept_share = 1.0 - int(threshold) / 65536.0
    done = 0
    while done < size:
        left = size - done
        words = min(_WORDS_AT_ONCE, int(left / (4 * kept_share) * 1.02) + 16)  # past what is left: unused
        words_16 = bit_generator.random_raw(words).astype("<u8", copy=False).view("<u2")
        scaled = np.multiply(words_16, np.uint32(P), dtype=np.uint32)
        kept = np.compress(np.bitwise_and(scaled, np.uint32(0xFFFF)) >= threshold, scaled)[:left]
        np.right_shift(kept, np.uint32(16), out=kept)
        out[done : done + len(kept)] = kept
        done += len(kept)
    return out.reshape(shape)


def kl_to_n(kl: object) -> np.ndarray | float:
    """Inverse of :func:`kl_bon`: the real n >= 1 with ``log n - (n - 1)/n = kl`` (inf for inf).

    Closed form ``n = -1 / W0(-exp(-(kl + 1)))`` with Lambert's W; ``exp(kl + 1)`` where that
    underflows (``kl`` > 700).

    Example:
        >>> round(float(kl_to_n(kl_bon(64.0))), 9)
        64.0
    """
    k = kl if isinstance(kl, np.ndarray) and kl.dtype == np.float64 else float_array(kl, "kl")
    if np.any(k < 0):
        raise ValueError(f"kl must be >= 0, got {kl!r}")
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        z = -np.exp(-(np.minimum(k, 700.0) + 1.0))
        n = -1.0 / lambertw(z, 0).real
        n = np.where(k > 700.0, np.exp(np.minimum(k, 1e300) + 1.0), n)
        n = np.where(k == 0, 1.0, n)
    return float(n) if n.ndim == 0 else n


def _n_of_kl(kl: np.ndarray, ns: np.ndarray, curve_kl: np.ndarray | None) -> np.ndarray:
    """The n of each KL in ``kl``: :func:`kl_to_n` for a tie-free curve (``curve_kl`` None or the
    formula). With ties (a smaller exact KL, ``curve_kl``) the formula would put n far too low:
    within the measured KL range log n is interpolated on the curve's own points (as
    :func:`~bon_tracker.core.fit.fit_overoptimization` does); beyond it the n is not known
    (the exact KL of larger n grows slower than the formula, and may never reach that KL):
    ``inf``, "beyond the measured range"."""
    kl = np.asarray(kl, dtype=np.float64)
    if curve_kl is None or np.allclose(curve_kl, kl_bon(ns), rtol=1e-12, atol=0.0):
        return kl_to_n(kl)
    order = np.argsort(curve_kl, kind="stable")
    known_kl, log_n = curve_kl[order], np.log(ns[order])
    inside = np.exp(np.interp(np.minimum(kl, known_kl[-1]), known_kl, log_n))
    return np.where(kl <= known_kl[-1], inside, np.inf)


def _design(kl: np.ndarray) -> np.ndarray:
    d = np.sqrt(kl)
    return np.column_stack([d, -(d * d)])


def _peak(alpha: np.ndarray, beta: np.ndarray, d_max: float = math.inf) -> tuple[np.ndarray, np.ndarray]:
    """Extended peak ``(d*, gain)`` of ``d (alpha - beta d)`` on ``d >= 0``, elementwise.

    ``d_max``: the largest measured d; a convex fit (``beta < 0``) that falls over all of it
    (``alpha < 0``, minimum at ``alpha / (2 beta) >= d_max``) peaks at the start, ``d* = 0``.
    """
    concave = beta > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        d_star = np.where(concave, np.maximum(alpha / (2.0 * beta), 0.0), np.inf)
        gain = np.where(concave, np.where(alpha > 0, alpha * alpha / (4.0 * beta), 0.0), np.inf)
        convex_falls = (beta < 0) & (alpha < 0) & (alpha / (2.0 * np.where(beta < 0, beta, -1.0)) >= d_max)
    at_start = (~concave & (beta == 0) & (alpha <= 0)) | convex_falls
    d_star = np.where(at_start, 0.0, d_star)
    gain = np.where(at_start, 0.0, gain)
    return d_star, gain


def _order_stat_interval(values: np.ndarray, lower_q: float, upper_q: float) -> tuple[float, float]:
    """Interval from order statistics (no interpolation, so +inf values are handled)."""
    s = np.sort(values)
    B = len(s)
    lo = s[min(max(math.floor(lower_q * B), 0), B - 1)]
    hi = s[min(max(math.ceil(upper_q * B) - 1, 0), B - 1)]
    return float(lo), float(hi)


def _bca_levels(boot: np.ndarray, point: float, jack: np.ndarray, alpha: float) -> tuple[float, float] | None:
    """BCa-adjusted quantile levels, or None where they are undefined (infinite values)."""
    if not math.isfinite(point) or not np.all(np.isfinite(jack)):
        return None
    below = float(np.mean(boot < point) + 0.5 * np.mean(boot == point))
    if not 0.0 < below < 1.0:
        return None
    z0 = float(ndtri(below))
    dev = jack.mean() - jack
    denom = float((dev**2).sum()) ** 1.5
    accel = float((dev**3).sum() / (6.0 * denom)) if denom > 0 else 0.0
    levels = []
    for q in (alpha / 2.0, 1.0 - alpha / 2.0):
        zq = z0 + float(ndtri(q))
        levels.append(float(ndtr(z0 + zq / (1.0 - accel * zq))))
    return levels[0], levels[1]


@dataclass(frozen=True)
class GoodhartInterval:
    """The fitted Goodhart point with intervals from resampling prompts.

    ``n``/``kl``/``gain`` are the point estimates (the fit on all prompts; ``n = 1`` when the
    fitted true curve falls from the start, ``inf`` when it never peaks); ``*_low``/``*_high``
    the interval at ``level``. ``p_no_peak`` is the share of resamples without a peak.
    """

    n: float
    n_low: float
    n_high: float
    kl: float
    kl_low: float
    kl_high: float
    gain: float
    gain_low: float
    gain_high: float
    alpha: float
    beta: float
    p_no_peak: float
    level: float
    method: str
    n_resamples: int
    n_prompts: int

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain values for JSON and tables (``inf`` stays a float)."""
        return asdict(self)


def _relative_true(true_pp: np.ndarray, ns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt gains over n = 1 on the columns every prompt reaches; the kept column mask."""
    true_pp = np.asarray(true_pp, dtype=np.float64)
    if true_pp.ndim != 2 or true_pp.shape[1] != len(ns):
        raise ValueError(f"per-prompt estimates must be (P, len(ns)) = (P, {len(ns)}), got {true_pp.shape}")
    at_one = np.flatnonzero(ns == 1)
    if at_one.size == 0:
        raise ValueError("the n grid must include n = 1 (gains are relative to it)")
    keep = ~np.isnan(true_pp).any(axis=0)
    if not keep[at_one[0]]:
        raise ValueError("every prompt needs an estimate at n = 1")
    if np.count_nonzero(keep & (ns > 1)) < 2:
        raise ValueError("need at least two n > 1 that every prompt reaches to fit the best-of-n form")
    if true_pp.shape[0] < 2:
        raise ValueError(f"need at least two prompts to resample, got {true_pp.shape[0]}")
    # n = 1's column as a view: broadcast over the rows it subtracts 15 times faster than the
    # gathered copy of it (the same differences).
    at_n1 = true_pp[:, at_one[0] : at_one[0] + 1]
    return (true_pp if keep.all() else true_pp[:, keep]) - at_n1, keep


def goodhart_interval(
    true_pp: object,
    ns: object,
    *,
    kl: object | None = None,
    level: float = 0.95,
    n_resamples: int = 1000,
    method: str = "percentile",
    rng: np.random.Generator | int | None = 0,
    draws: BootstrapDraws | None = None,
) -> GoodhartInterval:
    """Interval for the Goodhart point (n*, KL*, peak gain) by resampling prompts.

    The point estimate is Gao et al.'s fit ``R(d) = d (alpha - beta d)``, ``d = sqrt(KL)``,
    to the mean over prompts of ``true_pp - true_pp[:, n=1]`` -- the same fit as
    :func:`fit_overoptimization` on the curve -- and each of ``n_resamples`` resamples of the
    prompts (with replacement) refits it. Columns that some prompt does not reach (NaN) are
    left out, as the record's own fit does.

    Args:
        true_pp: per-prompt true-score estimates ``(P, len(ns))``, e.g.
            ``bon_estimate(proxy, true, ns)``.
        ns: the n grid (must include 1).
        kl: the KL of each n (the curve's ``kl``); default ``kl_bon(ns)``. With ties (a
            smaller exact KL) n* and its bounds are mapped from KL on the curve's own points
            within the measured range, and are ``inf`` (not known) beyond it.
        level: two-sided confidence level.
        n_resamples: bootstrap resamples B.
        method: ``"percentile"`` (default: calibrated in the simulation benchmark) or
            ``"bca"`` (bias-corrected and accelerated, jackknife acceleration in closed
            form; falls back to percentile where undefined).
        rng: seed or generator of the resampling (fixed by default: the same data give
            the same interval).
        draws: a :class:`BootstrapDraws` to share an integer seed's draws with other calls
            (the same results, drawn once).

    Returns:
        A :class:`GoodhartInterval`.

    Example:
        >>> ns = np.array([1, 2, 4, 8, 16])
        >>> d = np.sqrt(kl_bon(ns))
        >>> rng = np.random.default_rng(0)
        >>> true_pp = d * (1.0 - 0.5 * d) + 0.05 * rng.standard_normal((200, 5))
        >>> ci = goodhart_interval(true_pp, ns)
        >>> ci.kl_low < 1.0 < ci.kl_high, round(ci.kl, 1)
        (True, 1.0)
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n_arr = float_array(ns, "ns").ravel()
    rel, keep = _relative_true(float_array(true_pp, "true_pp"), n_arr)
    kl_arr = kl_bon(n_arr) if kl is None else float_array(kl, "kl").ravel()
    if kl_arr.shape != n_arr.shape:
        raise ValueError(f"kl must have one value per n, got {kl_arr.shape} for {n_arr.shape}")
    X = _design(kl_arr[keep])
    solve = X @ np.linalg.pinv(X.T @ X)  # (G, 2): coefficients = mean gains @ solve
    P = rel.shape[0]
    proj = rel @ solve  # (P, 2): each prompt's contribution; fits are linear in the mean
    alpha_hat, beta_hat = proj.mean(axis=0)
    d_max = float(np.sqrt(max(float(np.nanmax(kl_arr[keep])), 0.0)))
    coef = resample_prompt_means(proj, n_resamples, rng, draws=draws)  # (B, 2)
    d_boot, gain_boot = _peak(coef[:, 0], coef[:, 1], d_max)
    (d_hat,), (gain_hat,) = _peak(np.array([alpha_hat]), np.array([beta_hat]), d_max)
    a = 1.0 - level
    bounds = {}
    jack = None
    for name, boot, point in (("d", d_boot, d_hat), ("gain", gain_boot, gain_hat)):
        levels = None
        if method == "bca":
            if jack is None:
                loo = (P * proj.mean(axis=0) - proj) / (P - 1)  # leave-one-prompt-out coefficients
                jack = _peak(loo[:, 0], loo[:, 1], d_max)
            levels = _bca_levels(boot, float(point), jack[0] if name == "d" else jack[1], a)
        lo_q, hi_q = levels if levels is not None else (a / 2.0, 1.0 - a / 2.0)
        bounds[name] = _order_stat_interval(boot, lo_q, hi_q)
    d_lo, d_hi = bounds["d"]
    curve_kl = None if kl is None else kl_arr[keep]
    n_hat, n_lo, n_hi = _n_of_kl(np.array([d_hat, d_lo, d_hi]) ** 2, n_arr[keep], curve_kl).tolist()
    return GoodhartInterval(
        n=float(n_hat),
        n_low=float(n_lo),
        n_high=float(n_hi),
        kl=float(d_hat**2),
        kl_low=d_lo**2,
        kl_high=d_hi**2,
        gain=float(gain_hat),
        gain_low=bounds["gain"][0],
        gain_high=bounds["gain"][1],
        alpha=float(alpha_hat),
        beta=float(beta_hat),
        p_no_peak=float(np.mean(~np.isfinite(d_boot))),
        level=float(level),
        method=method,
        n_resamples=int(n_resamples),
        n_prompts=int(P),
    )
