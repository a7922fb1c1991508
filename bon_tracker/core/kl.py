"""KL divergence of the best-of-n policy from the base policy."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from bon_tracker.core.ranking import rank_by_proxy
from bon_tracker.core.validation import NanPolicy, float_array, paired_scores


def kl_bon(n: object) -> np.ndarray | float:
    """KL(best-of-n || base) for a continuous proxy: ``log n - (n - 1)/n`` nats.

    Stiennon et al. 2020, App. G.3. For proxies with atoms (ties) this is only an
    upper bound (Beirami et al. 2024); see :func:`kl_bon_discrete`.

    Example:
        >>> round(float(kl_bon(1024)), 4)
        5.9324
    """
    n_arr = n if isinstance(n, np.ndarray) and n.dtype == np.float64 else float_array(n, "n")
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"n must be finite and >= 1, got {n!r:.200}")
    out = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(out) if out.ndim == 0 else out


KlMode = Literal["auto", "discrete", "continuous"]
KL_MODES = ("auto", "discrete", "continuous")


def check_kl_mode(kl_mode: str) -> None:
    if kl_mode not in KL_MODES:
        raise ValueError(f"kl_mode must be one of {', '.join(repr(m) for m in KL_MODES)}, got {kl_mode!r}")


# exp(x) is exactly 0.0 below about -745.13 (the smallest subnormal is 4.9e-324).
_UNDERFLOW = -746.0


def _continuous_part(u: np.ndarray, n: float) -> np.ndarray:
    """G(u) = u^n log n + (n-1) u^n log u - (n-1) u^n / n, with G(0) = 0.

    The best-of-n density relative to the base is n u^(n-1) at CDF value u, so a
    continuous stretch of the CDF from a to b contributes
    int_a^b n u^(n-1) log(n u^(n-1)) du = G(b) - G(a).
    """
    with np.errstate(divide="ignore"):
        log_u = np.log(u)
    power = np.exp(n * log_u)
    return np.where(u > 0, power * (math.log(n) + (n - 1.0) * np.where(u > 0, log_u, 0.0) - (n - 1.0) / n), 0.0)


def level_kl(
    row_of_level: np.ndarray, start: np.ndarray, size: np.ndarray, N: int, ns: np.ndarray, P: int, kl_mode: KlMode
) -> np.ndarray:
    """KL(best-of-n || base) per prompt from its proxy levels: ``(P, len(ns))``.

    Each prompt has ``N`` samples; its levels, in ascending proxy order, are given by
    the prompt they belong to, the samples strictly below (``start``) and their count
    (``size``). ``kl_mode="discrete"`` treats every level as an atom (Beirami et al.);
    ``"auto"`` treats tied levels (``size >= 2``) as atoms and single samples as
    continuous mass, each maximal run of them integrated in closed form.

    An atom with mass q and CDF F (F- just below it) gets best-of-n mass
    a = F^n - F-^n, computed in log space as
    log a = n log F + log1p(-exp(-n (log F - log F-))) so nothing overflows or cancels.
    """
    start = np.asarray(start, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    end = start + size
    atom = size >= 2 if kl_mode == "auto" else np.ones(len(size), dtype=bool)
    single = ~atom
    # Runs of consecutive single-sample levels of one prompt: contribution G(b) - G(a).
    same_row_before = np.zeros(len(size), dtype=bool)
    same_row_before[1:] = row_of_level[1:] == row_of_level[:-1]
    single_before = np.zeros(len(size), dtype=bool)
    single_before[1:] = single[:-1]
    single_after = np.zeros(len(size), dtype=bool)
    single_after[:-1] = single[1:]
    same_row_after = np.zeros(len(size), dtype=bool)
    same_row_after[:-1] = same_row_before[1:]
    run_start = single & ~(single_before & same_row_before)
    run_end = single & ~(single_after & same_row_after)
    a_rows, a = row_of_level[run_start], start[run_start] / N
    b_rows, b = row_of_level[run_end], end[run_end] / N
    atom_rows = row_of_level[atom]
    log_q = np.log(size[atom] / N)
    log_f = np.log(end[atom] / N)
    with np.errstate(divide="ignore"):
        log_f_below = np.log(start[atom] / N)  # -inf for the lowest level
    with np.errstate(divide="ignore"):
        log_a_end, log_b_end = np.log(a), np.log(b)
    out = np.empty((P, len(ns)))
    for j, n in enumerate(np.asarray(ns, dtype=np.float64)):
        # Levels with n log F < -746 have best-of-n mass exp(...) = 0 exactly (and G(u) = 0 for
        # u^n = 0): they add exact zeros, so they are left out -- in their order, so the sums
        # are the same floats -- and a large n costs only the few levels near the top.
        cut = _UNDERFLOW / n
        live = log_f > cut
        every = bool(live.all())
        lf, lfb, lq, rows = (
            (log_f, log_f_below, log_q, atom_rows)
            if every
            else (log_f[live], log_f_below[live], log_q[live], atom_rows[live])
        )
        gap = n * (lf - lfb)  # +inf for the lowest level
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
            log_a = n * lf + np.log1p(-np.exp(-gap))
            mass = np.exp(log_a)
            term = np.where(mass > 0, mass * (log_a - lq), 0.0)
        total = np.zeros(P)
        total += np.bincount(rows, weights=term, minlength=P)
        if len(b):
            keep_b, keep_a = log_b_end > cut, log_a_end > cut
            total += np.bincount(b_rows[keep_b], weights=_continuous_part(b[keep_b], n), minlength=P)
            total -= np.bincount(a_rows[keep_a], weights=_continuous_part(a[keep_a], n), minlength=P)
        out[:, j] = total
    # KL is >= 0 and exactly 0 at n = 1; clear the rounding residue of the log sums.
    out[:, np.asarray(ns) == 1] = 0.0
    return np.maximum(out, 0.0)


def counted_level_kl(counts: np.ndarray, below: np.ndarray, N: int, ns: np.ndarray, kl_mode: KlMode) -> np.ndarray:
    """:func:`level_kl` of prompts counted by proxy level: ``(P, L)`` counts and samples below -> ``(P, len(ns))``."""
    present = counts > 0
    rows = np.nonzero(present)[0]
    return level_kl(rows, below[present], counts[present], N, ns, counts.shape[0], kl_mode)


def _discrete_kl_sorted(
    sorted_proxy: np.ndarray, new_group: np.ndarray, ns: np.ndarray, kl_mode: KlMode = "discrete"
) -> np.ndarray:
    """KL over the proxy levels of each sorted row: ``(P, N)`` -> ``(P, len(ns))``."""
    P, N = sorted_proxy.shape
    if kl_mode == "continuous":
        return np.broadcast_to(np.asarray(kl_bon(np.asarray(ns, dtype=np.float64))), (P, len(ns))).copy()
    flat_new = new_group.ravel()
    firsts = np.flatnonzero(flat_new)
    row_of_group = (firsts // N).astype(np.int64)
    start = firsts % N  # samples strictly below the level
    size = np.diff(np.append(firsts, flat_new.size))
    return level_kl(row_of_group, start, size, N, ns, P, kl_mode)


def discrete_kl_per_prompt(
    proxy: np.ndarray | list[np.ndarray], ns: np.ndarray, kl_mode: KlMode = "discrete"
) -> np.ndarray:
    """Validated dense or ragged proxy -> ``(P, len(ns))`` KL over levels."""
    if isinstance(proxy, np.ndarray):
        sorted_proxy, _, new_group = rank_by_proxy(proxy)
        return _discrete_kl_sorted(sorted_proxy, new_group, ns, kl_mode)
    out = np.empty((len(proxy), len(ns)))
    for i, row in enumerate(proxy):
        if len(row) == 0:  # every sample omitted as NaN
            out[i] = np.nan
            continue
        sorted_proxy, _, new_group = rank_by_proxy(row[None, :])
        out[i] = _discrete_kl_sorted(sorted_proxy, new_group, ns, kl_mode)[0]
    return out


def kl_bon_discrete(proxy: object, n: object, *, nan_policy: NanPolicy = "raise") -> np.ndarray | float:
    """Exact KL(best-of-n || base) for the empirical distribution of proxy values.

    .. math:: \\mathrm{KL} = \\sum_y (F(y)^n - F(y^-)^n) \\log \\frac{F(y)^n - F(y^-)^n}{q_y}

    over the distinct proxy levels y with empirical mass q_y and CDF F (Beirami et
    al. 2024, arXiv 2401.01879). Never larger than :func:`kl_bon`.

    Args:
        proxy: 1-D (one prompt), 2-D ``(P, N)`` or ragged list: 2-D/ragged give the
            mean over prompts.
        n: an integer >= 1, or an array of them.

    Example:
        >>> round(float(kl_bon_discrete([0, 1], 2)), 4)  # base 1/2 - 1/2, Beirami et al.
        0.1308
    """
    p, _, one_prompt = paired_scores(proxy, proxy, nan_policy=nan_policy, names=("proxy", "proxy"))
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.float64))
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"n must be finite and >= 1, got {n!r}")
    per_prompt = discrete_kl_per_prompt(p, n_arr)
    out = per_prompt[0] if one_prompt else np.nanmean(per_prompt, axis=0)
    return float(out[0]) if np.ndim(n) == 0 else out


def kl_bon_empirical(
    proxy: object, n: object, *, kl_mode: KlMode = "auto", nan_policy: NanPolicy = "raise"
) -> np.ndarray | float:
    """KL(best-of-n || base) of the empirical proxy distribution, by the rule of :func:`bon_curve`.

    ``kl_mode="auto"`` (default) treats tied proxy values as atoms and distinct values
    as continuous mass: over a continuous stretch of the CDF from a to b the
    contribution is G(b) - G(a), G(u) = u^n log n + (n-1) u^n log u - (n-1) u^n / n.
    Tie-free input gives ``log n - (n-1)/n`` (:func:`kl_bon`); input whose every level
    is tied gives the exact value of :func:`kl_bon_discrete`; one duplicated sample
    changes the value only by the mass best-of-n puts near it. ``"discrete"`` treats
    every level as an atom (right for verifiers and rating scales, where a level seen
    once is still an atom); ``"continuous"`` is the formula.

    Args:
        proxy: 1-D (one prompt), 2-D ``(P, N)`` or ragged list: 2-D/ragged give the mean over prompts.
        n: an integer >= 1, or an array of them.

    Example:
        >>> round(float(kl_bon_empirical([0.3, 0.1, 0.2, 0.5], 2)), 4) == round(float(kl_bon(2)), 4)
        True
        >>> round(float(kl_bon_empirical([0.0, 0.0, 1.0, 1.0], 2)), 4)  # all tied: Beirami et al.
        0.1308
    """
    check_kl_mode(kl_mode)
    p, _, one_prompt = paired_scores(proxy, proxy, nan_policy=nan_policy, names=("proxy", "proxy"))
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.float64))
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"n must be finite and >= 1, got {n!r}")
    per_prompt = discrete_kl_per_prompt(p, n_arr, kl_mode)
    out = per_prompt[0] if one_prompt else np.nanmean(per_prompt, axis=0)
    return float(out[0]) if np.ndim(n) == 0 else out
