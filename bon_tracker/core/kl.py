"""KL divergence of the best-of-n policy from the base policy."""

from __future__ import annotations

import numpy as np

from bon_tracker.core.ranking import rank_by_proxy
from bon_tracker.core.validation import NanPolicy, paired_scores


def kl_bon(n: object) -> np.ndarray | float:
    """KL(best-of-n || base) for a continuous proxy: ``log n - (n - 1)/n`` nats.

    Stiennon et al. 2020, App. G.3. For proxies with atoms (ties) this is only an
    upper bound (Beirami et al. 2024); see :func:`kl_bon_discrete`.

    Example:
        >>> round(float(kl_bon(1024)), 4)
        5.9324
    """
    n_arr = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"n must be finite and >= 1, got {n!r}")
    out = np.log(n_arr) - (n_arr - 1.0) / n_arr
    return float(out) if out.ndim == 0 else out


def _discrete_kl_sorted(sorted_proxy: np.ndarray, new_group: np.ndarray, ns: np.ndarray) -> np.ndarray:
    """Exact KL over the proxy levels of each sorted row: ``(P, N)`` -> ``(P, len(ns))``.

    A level y with mass q and CDF F (F- just below it) gets best-of-n mass
    a = F^n - F-^n, computed in log space as
    log a = n log F + log1p(-exp(-n (log F - log F-))) so nothing overflows or cancels.
    """
    P, N = sorted_proxy.shape
    flat_new = new_group.ravel()
    group_id = np.cumsum(flat_new) - 1
    row_of_group = (np.flatnonzero(flat_new) // N).astype(np.int64)
    start = np.flatnonzero(flat_new) % N  # samples strictly below the level
    size = np.bincount(group_id)
    end = start + size
    log_q = np.log(size / N)
    log_f = np.log(end / N)
    with np.errstate(divide="ignore"):
        log_f_below = np.log(start / N)  # -inf for the lowest level
    out = np.empty((P, len(ns)))
    for j, n in enumerate(np.asarray(ns, dtype=np.float64)):
        gap = n * (log_f - log_f_below)  # +inf for the lowest level
        with np.errstate(divide="ignore", over="ignore"):
            log_a = n * log_f + np.log1p(-np.exp(-gap))
            mass = np.exp(log_a)
            term = np.where(mass > 0, mass * (log_a - log_q), 0.0)
        out[:, j] = np.bincount(row_of_group, weights=term, minlength=P)
    # KL is >= 0 and exactly 0 at n = 1; clear the rounding residue of the log sums.
    out[:, np.asarray(ns) == 1] = 0.0
    return np.maximum(out, 0.0)


def discrete_kl_per_prompt(proxy: np.ndarray | list[np.ndarray], ns: np.ndarray) -> np.ndarray:
    """Validated dense or ragged proxy -> ``(P, len(ns))`` exact KL over levels."""
    if isinstance(proxy, np.ndarray):
        sorted_proxy, _, new_group = rank_by_proxy(proxy)
        return _discrete_kl_sorted(sorted_proxy, new_group, ns)
    out = np.empty((len(proxy), len(ns)))
    for i, row in enumerate(proxy):
        if len(row) == 0:  # every sample omitted as NaN
            out[i] = np.nan
            continue
        sorted_proxy, _, new_group = rank_by_proxy(row[None, :])
        out[i] = _discrete_kl_sorted(sorted_proxy, new_group, ns)[0]
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
