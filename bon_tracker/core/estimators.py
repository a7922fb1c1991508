"""The unbiased all-subsets best-of-n estimator and the naive Monte Carlo baseline."""

from __future__ import annotations

import numpy as np

from bon_tracker.core.levels import LevelWeights, count_levels, same_array
from bon_tracker.core.ranking import BlockRanker, block_rows, blocks_by_length, dense_blocks
from bon_tracker.core.validation import NanPolicy, check_ns, paired_scores, sample_counts
from bon_tracker.core.weights import MANY_NS, RankWeights, ScanWeights, TailWeights


def estimate_per_prompt(proxy, score, ns: np.ndarray) -> np.ndarray:
    """Validated (dense or ragged) input -> ``(P, len(ns))``, NaN where n > N_p.

    Blocks whose proxy takes few distinct values are counted by level
    (:mod:`bon_tracker.core.levels`); the others are sorted.
    """
    out = np.full((len(sample_counts(proxy)), len(ns)), np.nan)
    for index, p, s in _dense_groups(proxy, score):
        N = p.shape[1]
        cols = np.flatnonzero(ns <= N)
        same = same_array(p, s)
        level_weights = LevelWeights(N, ns[cols])
        ranker = BlockRanker(block_rows(N), N)
        many = len(cols) > MANY_NS  # a large grid: work vectorised over n, on each n's tail
        huge = not many and N * len(cols) > RankWeights.DENSE_LIMIT
        rank_weights = TailWeights(N, ns[cols]) if many else (ScanWeights if huge else RankWeights)(N, ns[cols])
        if huge:
            positions = rank_weights.positions().ravel()
            shape = (1, rank_weights.n_blocks, rank_weights.R, rank_weights.SEGMENTS)
        for rows in dense_blocks(*p.shape):
            prompts = rows if index is None else index[rows]
            counts = count_levels(p[rows], (None,) if same else (s[rows],))
            if counts is not None:
                (estimates,) = level_weights.estimates(counts)
                put_rows(out, prompts, cols, estimates)
                continue
            ranked = ranker.rank(p[rows], s[rows], check_finite=False)
            if huge:
                rows_out = [rank_weights.apply_layout(r.take(positions).reshape(shape)) for r in ranked.score]
                estimates = np.vstack(rows_out)
            else:
                (estimates,) = rank_weights.apply(ranked.score)
            put_rows(out, prompts, cols, estimates)
    return out


def _dense_groups(proxy, score):
    """``(index, proxy, score)`` per dense group: the input itself, or ragged rows grouped by length."""
    if isinstance(proxy, np.ndarray):
        p = np.ascontiguousarray(proxy)
        yield None, p, np.ascontiguousarray(score)
        return
    for idx in blocks_by_length(proxy).values():
        p = np.stack([proxy[i] for i in idx])
        yield idx, p, (p if score is proxy else np.stack([score[i] for i in idx]))


def put_rows(out: np.ndarray, prompts: slice | np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """``out[prompts, cols] = values`` for a slice or an index array of prompts."""
    if isinstance(prompts, slice) and len(cols) == out.shape[1]:
        out[prompts] = values
    else:
        rows = np.arange(out.shape[0])[prompts]
        out[np.ix_(rows, cols)] = values


def bon_estimate(proxy: object, score: object, ns: object, *, nan_policy: NanPolicy = "raise") -> np.ndarray:
    """Unbiased all-subsets estimate of ``score`` under best-of-n selection by ``proxy``.

    For one prompt with samples sorted by proxy ascending,

    .. math:: \\hat{E}[\\text{score of best-of-}n] = \\sum_{k=1}^{N} \\frac{\\binom{k-1}{n-1}}{\\binom{N}{n}} s_{(k)}

    the average over every n-subset of the N samples (Nakano et al. 2021, App. I).
    Ties in proxy are broken uniformly at random in expectation: each member of a
    tied group gets the group-average weight. With ``proxy = score = correct (0/1)``
    this is exactly pass@n.

    Args:
        proxy: proxy scores (what selection maximises); 1-D ``(N,)`` for one prompt,
            2-D ``(P, N)``, or a list of 1-D arrays of different lengths (ragged).
        score: the score to average, same shape as ``proxy`` (e.g. the true reward,
            or ``proxy`` itself for the proxy curve).
        ns: an integer n or a sequence of them, each ``1 <= n <= N`` (ragged: up to
            the largest N; prompts with fewer samples give NaN).
        nan_policy: ``"raise"`` (default) rejects NaN/inf; ``"omit"`` drops those samples.

    Returns:
        ``(len(ns),)`` for one prompt, ``(P, len(ns))`` otherwise; a scalar n drops
        that axis.

    Example:
        >>> bon_estimate([0.1, 0.7, 0.4], [1.0, 0.0, 2.0], [1, 2, 3])
        array([1.        , 0.66666667, 0.        ])
    """
    p, s, one_prompt = paired_scores(proxy, score, nan_policy=nan_policy)
    n_arr, scalar_n = check_ns(ns, int(sample_counts(p).max()))
    out = estimate_per_prompt(p, s, n_arr)
    if one_prompt:
        out = out[0]
    return out[..., 0] if scalar_n else out


def mc_bon_estimate(
    proxy: object,
    score: object,
    n: int,
    trials: int,
    rng: np.random.Generator | int | None = None,
    *,
    nan_policy: NanPolicy = "raise",
) -> np.ndarray | float:
    """Naive Monte Carlo best-of-n: draw n of the N samples without replacement,
    keep the proxy-best (ties at random), average its score over ``trials`` draws.

    Kept as the baseline that :func:`bon_estimate` beats in variance at equal samples.

    Returns:
        A float for one 1-D prompt, else an array ``(P,)``.

    Example:
        >>> round(float(mc_bon_estimate([0.1, 0.7, 0.4], [1.0, 0.0, 2.0], 3, trials=10, rng=0)), 6)
        0.0
    """
    p, s, one_prompt = paired_scores(proxy, score, nan_policy=nan_policy)
    (n_checked,), _ = check_ns(n, int(sample_counts(p).min()))
    if isinstance(trials, bool) or not isinstance(trials, (int, np.integer)) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    rng = np.random.default_rng(rng)
    rows = list(p) if isinstance(p, np.ndarray) else p
    scores = list(s) if isinstance(s, np.ndarray) else s
    out = np.array([_mc_one_prompt(a, b, int(n_checked), int(trials), rng) for a, b in zip(rows, scores)])
    return float(out[0]) if one_prompt else out


def _mc_one_prompt(proxy: np.ndarray, score: np.ndarray, n: int, trials: int, rng: np.random.Generator) -> float:
    N = len(proxy)
    subsets = np.argpartition(rng.random((trials, N)), n - 1, axis=1)[:, :n]  # uniform n-subsets
    sub_proxy = proxy[subsets]
    is_best = sub_proxy == sub_proxy.max(axis=1, keepdims=True)
    tie_break = np.where(is_best, rng.random(is_best.shape), -1.0)  # uniform among the tied best
    chosen = subsets[np.arange(trials), tie_break.argmax(axis=1)]
    return float(score[chosen].mean())
