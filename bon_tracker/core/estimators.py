"""The unbiased all-subsets best-of-n estimator and the naive Monte Carlo baseline."""

from __future__ import annotations

import numpy as np

from bon_tracker.core.curve import rank_and_estimate
from bon_tracker.core.levels import count_levels  # noqa: F401  (estimates count via curve.py's; tests patch both names)
from bon_tracker.core.validation import NanPolicy, check_ns, paired_scores, sample_counts


def bon_estimate(
    proxy: object, score: object, ns: object, *, nan_policy: NanPolicy = "raise", threads: int | None = None
) -> np.ndarray:
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
        threads: threads to compute on (the calling one included), as
            :func:`~bon_tracker.core.curve.bon_curve` (the same blocks, sort and weights);
            results are bit-identical for any count.

    Returns:
        ``(len(ns),)`` for one prompt, ``(P, len(ns))`` otherwise; a scalar n drops
        that axis.

    Example:
        >>> bon_estimate([0.1, 0.7, 0.4], [1.0, 0.0, 2.0], [1, 2, 3])
        array([1.        , 0.66666667, 0.        ])
    """
    if ns is None:
        raise TypeError("ns must be an integer or a sequence of integers, got None")
    _, estimates, n_arr, one_prompt = rank_and_estimate(
        proxy,
        score,
        ns,
        nan_policy=nan_policy,
        kl_mode="auto",
        threads=threads,
        stats=False,
        keep=True,
        names=("proxy", "score"),
    )
    out = estimates.in_order(estimates.true, n_arr)
    if one_prompt:
        out = out[0]
    return out[..., 0] if np.ndim(ns) == 0 else out


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
