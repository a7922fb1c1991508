"""Win rate of best-of-n over an independent base sample."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bon_tracker.core.ranking import blocks_by_length, rank_by_proxy
from bon_tracker.core.validation import NanPolicy, check_ns, paired_scores, sample_counts
from bon_tracker.core.weights import bon_weights


@dataclass(frozen=True)
class BonWinRate:
    """Mean over prompts of P(best-of-n beats one base sample); ties count one half."""

    n: np.ndarray
    proxy: np.ndarray
    true: np.ndarray
    n_prompts: np.ndarray


def _compare(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """1 where a > b, 1/2 where equal, 0 otherwise (broadcasting)."""
    return (a > b) + 0.5 * (a == b)


def _win_rate_one_prompt(sorted_proxy: np.ndarray, sorted_score: np.ndarray, group_start: np.ndarray, ns):
    """All-subsets U-statistic of order n + 1 for one prompt sorted by proxy.

    For a fixed total order, averaging over every (n+1)-subset S and every choice of
    the base sample b in S gives

        (1/N) [ sum_i wL_i L_i + sum_j wU_j U_j ],

    where L_i counts lower-ranked samples that sample i beats, U_j counts
    higher-ranked samples that j beats, wL_i = w^{(N-1, n)}_{i-1} and
    wU_j = w^{(N-1, n)}_j. Proxy ties are broken uniformly at random: each sample's
    term is averaged over its uniformly random position inside its tie group, and
    the same-group samples below it are then a uniformly random subset.
    """
    N = len(sorted_score)
    beats = _compare(sorted_score[:, None], sorted_score[None, :])  # beats[a, b]: a beats b
    group_id = np.cumsum(group_start) - 1
    same_group = group_id[:, None] == group_id[None, :]
    lower = group_id[:, None] > group_id[None, :]
    np.fill_diagonal(same_group, False)
    beats_lower = (beats * lower).sum(axis=1)
    beats_higher = (beats * lower.T).sum(axis=1)
    beats_same = (beats * same_group).sum(axis=1)

    starts = np.flatnonzero(group_start)
    sizes = np.diff(np.append(starts, N))
    out = np.full(len(ns), np.nan)
    for j, n in enumerate(ns):
        if n + 1 > N:
            continue
        w = bon_weights(N - 1, int(n))
        w_low = np.concatenate(([0.0], w))  # wL_i for ranks 1..N
        w_up = np.concatenate((w, [0.0]))  # wU_j for ranks 1..N
        total = 0.0
        for start, size in zip(starts, sizes):
            members = slice(start, start + size)
            positions = np.arange(size)
            below_share = positions / (size - 1) if size > 1 else np.zeros(1)
            wl, wu = w_low[members], w_up[members]
            total += (
                wl.mean() * beats_lower[members].sum()
                + wu.mean() * beats_higher[members].sum()
                + ((wl * below_share).mean() + (wu * below_share[::-1]).mean()) * beats_same[members].sum()
            )
        out[j] = total / N
    return out


def bon_win_rate(proxy: object, true: object, ns: object, *, nan_policy: NanPolicy = "raise") -> BonWinRate:
    """Probability that the best-of-n sample beats one independent base sample.

    Estimated without bias by the order-(n+1) all-subsets U-statistic, under the
    proxy and under the true reward (a tie counts one half). Tie-free proxies give
    exactly n/(n+1) under the proxy. Needs n + 1 <= N; prompts with fewer samples
    give NaN and are left out of the mean. Costs O(N^2) per prompt.

    Example:
        >>> bon_win_rate([0.1, 0.5, 0.9], [0.0, 1.0, 0.5], [1, 2]).proxy
        array([0.5       , 0.66666667])
    """
    p, t, _ = paired_scores(proxy, true, nan_policy=nan_policy, names=("proxy", "true"))
    counts = sample_counts(p)
    n_arr, _ = check_ns(ns, int(counts.max()) - 1)
    rows_p = list(p) if isinstance(p, np.ndarray) else p
    rows_t = list(t) if isinstance(t, np.ndarray) else t
    per_proxy = np.full((len(rows_p), len(n_arr)), np.nan)
    per_true = np.full_like(per_proxy, np.nan)
    for indices in blocks_by_length(rows_p).values():
        for i in indices:
            sorted_proxy, (sorted_true,), group_start = rank_by_proxy(rows_p[i][None, :], rows_t[i][None, :])
            per_proxy[i] = _win_rate_one_prompt(sorted_proxy[0], sorted_proxy[0], group_start[0], n_arr)
            per_true[i] = _win_rate_one_prompt(sorted_proxy[0], sorted_true[0], group_start[0], n_arr)
    valid = ~np.isnan(per_true)
    return BonWinRate(
        n=n_arr,
        proxy=np.nanmean(per_proxy, axis=0),
        true=np.nanmean(per_true, axis=0),
        n_prompts=valid.sum(axis=0),
    )
