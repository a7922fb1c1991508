"""Best-of-n curves aggregated over prompts: means, standard errors and KL."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from bon_tracker.core.estimators import put_rows
from bon_tracker.core.kl import _discrete_kl_sorted, kl_bon
from bon_tracker.core.ranking import iter_ranked_blocks
from bon_tracker.core.validation import NanPolicy, check_ns, paired_scores, sample_counts
from bon_tracker.core.weights import RankWeights


def default_ns(N: int) -> np.ndarray:
    """Powers of two up to N, plus N itself: 1, 2, 4, ..., N."""
    powers = 2 ** np.arange(int(np.log2(N)) + 1) if N >= 1 else np.array([], dtype=np.int64)
    return np.unique(np.append(powers, N)).astype(np.int64)


@dataclass(frozen=True)
class BonCurve:
    """Best-of-n curves for one set of prompts (one eval step).

    Every array field has one entry per n of the grid. ``*_se`` is the standard
    error across prompts: sample standard deviation (ddof=1) of the per-prompt
    estimates divided by sqrt(n_prompts); NaN with fewer than two prompts.
    """

    n: np.ndarray
    kl: np.ndarray  # KL(best-of-n || base), nats: exact over proxy levels where ties exist
    kl_bound: np.ndarray  # log n - (n - 1)/n: exact for continuous proxies, else an upper bound
    true_mean: np.ndarray
    true_se: np.ndarray
    proxy_mean: np.ndarray
    proxy_se: np.ndarray
    n_prompts: np.ndarray  # prompts with at least n samples
    N: int  # largest number of samples per prompt
    has_ties: bool  # some prompt has tied proxy scores

    @property
    def gap(self) -> np.ndarray:
        """Proxy minus true mean: how much of the proxy gain is not real."""
        return self.proxy_mean - self.true_mean

    def to_dict(self) -> dict:
        """Plain Python values (lists, ints, floats), for JSON and tables."""
        return {
            f.name: (
                getattr(self, f.name).tolist()
                if isinstance(getattr(self, f.name), np.ndarray)
                else getattr(self, f.name)
            )
            for f in fields(self)
        }

    @classmethod
    def from_dict(cls, data: dict) -> BonCurve:
        kwargs = {}
        for f in fields(cls):
            value = data[f.name]
            if f.name in ("N", "has_ties"):
                kwargs[f.name] = int(value) if f.name == "N" else bool(value)
            elif f.name in ("n", "n_prompts"):
                kwargs[f.name] = np.asarray(value, dtype=np.int64)
            else:
                kwargs[f.name] = np.asarray(value, dtype=np.float64)
        return cls(**kwargs)

    def rows(self) -> list[dict]:
        """One dict per n: ``n, kl, kl_bound, true_mean, true_se, proxy_mean, proxy_se, n_prompts``."""
        return [
            {
                "n": int(self.n[i]),
                "kl": float(self.kl[i]),
                "kl_bound": float(self.kl_bound[i]),
                "true_mean": float(self.true_mean[i]),
                "true_se": float(self.true_se[i]),
                "proxy_mean": float(self.proxy_mean[i]),
                "proxy_se": float(self.proxy_se[i]),
                "n_prompts": int(self.n_prompts[i]),
            }
            for i in range(len(self.n))
        ]


def _mean_and_se(per_prompt: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard errors ignoring NaN (prompts with N_p < n)."""
    if not np.isnan(per_prompt).any():  # the common dense case: plain, fast reductions
        mean = per_prompt.mean(axis=0)
        if per_prompt.shape[0] < 2:
            return mean, np.full(mean.shape, np.nan)
        return mean, per_prompt.std(axis=0, ddof=1) / np.sqrt(per_prompt.shape[0])
    mean = np.nanmean(per_prompt, axis=0)
    se = np.full(mean.shape, np.nan)
    enough = counts >= 2
    se[enough] = np.nanstd(per_prompt[:, enough], axis=0, ddof=1) / np.sqrt(counts[enough])
    return mean, se


def bon_curve(proxy: object, true: object, ns: object | None = None, *, nan_policy: NanPolicy = "raise") -> BonCurve:
    """Best-of-n curves of the true and proxy score, averaged over prompts.

    Per prompt, the all-subsets estimator (:func:`bon_estimate`) gives the expected
    true and proxy score of best-of-n selection by proxy; this averages them over
    prompts with standard errors, and annotates each n with its KL from the base
    policy. Per prompt, KL is ``log n - (n-1)/n`` when the prompt's proxies are
    tie-free (a continuous proxy) and the exact KL over its proxy levels when they
    are not; ``kl`` is the mean over prompts, ``kl_bound`` the continuous formula.

    Args:
        proxy: proxy scores, ``(P, N)`` or a ragged list of 1-D arrays (a 1-D array is one prompt).
        true: true scores, same shape.
        ns: the grid of n; default powers of two up to the largest N, plus that N.
        nan_policy: ``"raise"`` (default) or ``"omit"`` non-finite samples.

    Example:
        >>> curve = bon_curve([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        >>> curve.n.tolist(), curve.true_mean.round(4).tolist()
        ([1, 2, 3], [0.5, 0.6667, 0.5])
    """
    p, t, _ = paired_scores(proxy, true, nan_policy=nan_policy, names=("proxy", "true"))
    counts = sample_counts(p)
    N = int(counts.max())
    n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]

    P = len(counts)
    true_pp = np.full((P, len(n_arr)), np.nan)
    proxy_pp = np.full_like(true_pp, np.nan)
    bound = np.asarray(kl_bon(n_arr), dtype=np.float64)
    kl_pp = np.broadcast_to(bound, true_pp.shape).copy()  # tie-free prompts: the formula is exact
    has_ties = False
    weights: dict[int, tuple[np.ndarray, RankWeights]] = {}
    for prompts, ranked in iter_ranked_blocks(p, t):
        if ranked.N not in weights:  # one set of weights per N, shared by true and proxy
            cols = np.flatnonzero(n_arr <= ranked.N)
            weights[ranked.N] = (cols, RankWeights(ranked.N, n_arr[cols]))
        cols, rank_weights = weights[ranked.N]
        true_est, proxy_est = rank_weights.apply(ranked.score, ranked.proxy)
        put_rows(true_pp, prompts, cols, true_est)
        put_rows(proxy_pp, prompts, cols, proxy_est)
        if ranked.tied_rows.any() and len(cols):  # ties matter where the prompt reaches some n
            has_ties = True
            tied = np.flatnonzero(ranked.tied_rows)
            kl_tied = _discrete_kl_sorted(ranked.proxy[tied], ranked.new_group[tied], n_arr[cols])
            put_rows(kl_pp, np.arange(P)[prompts][tied], cols, kl_tied)
    kl_pp[np.isnan(true_pp)] = np.nan

    n_prompts = (counts[:, None] >= n_arr[None, :]).sum(axis=0)
    true_mean, true_se = _mean_and_se(true_pp, n_prompts)
    proxy_mean, proxy_se = _mean_and_se(proxy_pp, n_prompts)
    kl = bound.copy() if not has_ties else np.nanmean(kl_pp, axis=0)
    return BonCurve(
        n=n_arr,
        kl=kl,
        kl_bound=bound,
        true_mean=true_mean,
        true_se=true_se,
        proxy_mean=proxy_mean,
        proxy_se=proxy_se,
        n_prompts=n_prompts,
        N=N,
        has_ties=has_ties,
    )
