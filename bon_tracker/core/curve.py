"""Best-of-n curves aggregated over prompts: means, standard errors and KL."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace

import numpy as np

from bon_tracker.core.accumulator import (
    CurveStats,
    curve_stats_compute,
    curve_stats_update,
    empty_curve_stats,
    merge_curve_stats,
)
from bon_tracker.core.kl import KlMode, _discrete_kl_sorted, check_kl_mode, counted_level_kl, kl_bon
from bon_tracker.core.levels import LevelCounts, LevelWeights, concat_level_counts, count_levels, same_array
from bon_tracker.core.ranking import BlockRanker, NonFiniteInput, block_rows, blocks_by_length, dense_blocks
from bon_tracker.core.threads import BlasTurns, map_in_order, single_threaded_blas, thread_count
from bon_tracker.core.validation import NanPolicy, check_nan_policy, check_ns, paired_scores, sample_counts
from bon_tracker.core.weights import MANY_NS, RankWeights, ScanWeights, TailWeights

# One prompt with more samples than this, in a call with few such prompts, gets its
# weights built block by block (ScanWeights) instead of as one dense matrix.
SCAN_MIN_N = 1 << 14
SCAN_MAX_PROMPTS = 64
# Blocks with few proxy levels are reduced this many at a time (one work item).
LEVEL_GROUP = 8


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


def _dense_input(proxy: object, true: object) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The input as two C-contiguous float64 matrices when it already is one (not yet checked
    for NaN: the blocks check that on the way); None for everything that needs full validation."""
    if not (isinstance(proxy, np.ndarray) and isinstance(true, np.ndarray)):
        return None
    if proxy.dtype != np.float64 or true.dtype != np.float64 or proxy.shape != true.shape or proxy.size == 0:
        return None
    if proxy.ndim == 1:
        return np.ascontiguousarray(proxy)[None, :], np.ascontiguousarray(true)[None, :], True
    if proxy.ndim != 2:
        return None
    return np.ascontiguousarray(proxy), np.ascontiguousarray(true), False


def curve_stats(
    proxy: object,
    true: object,
    ns: object | None = None,
    *,
    nan_policy: NanPolicy = "raise",
    kl_mode: KlMode = "auto",
    threads: int | None = None,
) -> CurveStats:
    """The mergeable statistics of :func:`bon_curve` (see :mod:`bon_tracker.core.accumulator`).

    ``ns`` default: the default grid of the largest N. Arguments as :func:`bon_curve`.
    """
    check_kl_mode(kl_mode)
    check_nan_policy(nan_policy)
    workers = thread_count(threads)
    dense = _dense_input(proxy, true)
    if dense is not None:
        p, t, _ = dense
        N = p.shape[1]
        n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]
        try:
            return _stats_of_groups([(p, t)], n_arr, kl_mode, workers, check_finite=True)
        except NonFiniteInput:
            pass  # validate in full below: an error naming the values, or nan_policy="omit"
    p, t, _ = paired_scores(proxy, true, nan_policy=nan_policy, names=("proxy", "true"))
    counts = sample_counts(p)
    N = int(counts.max())
    n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]
    if isinstance(p, np.ndarray):
        groups = [(p, t)]
    else:
        groups = [
            (np.stack([p[i] for i in idx]), np.stack([t[i] for i in idx])) for idx in blocks_by_length(p).values()
        ]
    stats = _stats_of_groups(groups, n_arr, kl_mode, workers, check_finite=False)
    empty = int(np.count_nonzero(counts == 0))
    return merge_curve_stats(stats, replace(empty_curve_stats(n_arr), n_prompts=empty)) if empty else stats


def _stats_of_groups(groups, n_arr: np.ndarray, kl_mode: KlMode, workers: int, *, check_finite: bool) -> CurveStats:
    """Statistics of groups of prompts, each a dense ``(P, N)`` pair, merged in order."""
    grid = np.unique(np.asarray(n_arr, dtype=np.int64))
    total = empty_curve_stats(grid)
    with single_threaded_blas() as limited:
        turns = BlasTurns(needed=workers > 1 and not limited)
        for p, t in groups:
            for part in _group_stats(p, t, grid, kl_mode, workers, turns, check_finite):
                total = merge_curve_stats(total, part)
    return total


def _counted(p: np.ndarray, t: np.ndarray, same: bool, check_finite: bool) -> LevelCounts | None:
    """The block counted by proxy level when it has few levels (:mod:`bon_tracker.core.levels`), else None."""
    counts = count_levels(p, (None, None) if same else (t, None))
    if counts is not None and check_finite and not same and not np.isfinite(counts.score_means[0]).all():
        raise NonFiniteInput  # a non-finite score, or finite ones whose sum overflows
    return counts


def _group_stats(p, t, grid, kl_mode, workers, turns, check_finite):
    P, N = p.shape
    cols = grid[grid <= N]
    if len(cols) == 0:
        yield replace(empty_curve_stats(grid), N=N, n_samples=P * N, n_prompts=P)
        return
    bound = np.asarray(kl_bon(cols), dtype=np.float64)
    same = same_array(p, t)
    level_weights = LevelWeights(N, cols)
    many = len(cols) > MANY_NS  # a large grid: TailWeights, work vectorised over n (see weights.py)
    if N > SCAN_MIN_N and P <= SCAN_MAX_PROMPTS:
        scan = TailWeights(N, cols) if many else ScanWeights(N, cols)
        positions = None if many else scan.positions().ravel()
        for row in range(P):
            counts = _counted(p[row : row + 1], t[row : row + 1], same, check_finite)
            if counts is not None:
                yield _level_block_stats(counts, level_weights, cols, bound, kl_mode, N)
                continue
            ranker = BlockRanker(1, N)
            ranked = ranker.rank(p[row : row + 1], t[row : row + 1], check_finite=check_finite)
            if many:
                estimates = _tail_estimates(scan, ranked.stacked, workers)
            else:
                estimates = _scan_estimates(scan, ranked.stacked, positions, cols, workers, turns)
            yield _block_stats(ranked, estimates, cols, bound, kl_mode, N)
        return
    weights = TailWeights(N, cols) if many else RankWeights(N, cols)
    local = threading.local()

    def sorted_stats(rows: slice) -> CurveStats:
        ranker = getattr(local, "ranker", None)
        if ranker is None:
            ranker = local.ranker = BlockRanker(block_rows(N), N)
            local.out = np.empty((2 * ranker.rows, len(cols)))
        ranked = ranker.rank(p[rows], t[rows], check_finite=check_finite)
        m = rows.stop - rows.start
        with turns:
            estimates = weights.apply_stacked(ranked.stacked, out=local.out[: 2 * m])
        return _block_stats(ranked, estimates, cols, bound, kl_mode, N)

    def work(blocks: list[slice]) -> list[CurveStats]:
        """Each block counted by level or sorted; consecutive counted blocks share one reduction."""
        parts: list[CurveStats] = []
        counted: list[LevelCounts] = []
        for rows in blocks:
            counts = _counted(p[rows], t[rows], same, check_finite)
            if counts is not None:
                counted.append(counts)
                continue
            if counted:
                parts.append(_level_block_stats(concat_level_counts(counted), level_weights, cols, bound, kl_mode, N))
                counted = []
            parts.append(sorted_stats(rows))
        if counted:
            parts.append(_level_block_stats(concat_level_counts(counted), level_weights, cols, bound, kl_mode, N))
        return parts

    blocks = dense_blocks(P, N)
    # Work items: one block each, or LEVEL_GROUP consecutive blocks when the first block has few
    # proxy levels (counting a block is cheap next to reducing it). Either partition depends on
    # the input only, never on the thread count.
    size = LEVEL_GROUP if _counted(p[blocks[0]], t[blocks[0]], same, check_finite) is not None else 1
    items = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    for parts in map_in_order(work, items, min(workers, len(items))):
        yield from parts


def _tail_estimates(tail: TailWeights, stacked: np.ndarray, workers: int) -> np.ndarray:
    """Estimates for one huge prompt on a large grid: the chunks of n dealt to the threads."""
    out = np.empty((stacked.shape[0], len(tail.ns)))
    indices = list(range(len(tail.chunks)))
    for index, part in zip(indices, map_in_order(lambda i: tail.apply_chunk(stacked, i), indices, workers)):
        out[:, tail.chunks[index][0]] = part
    return out


def _scan_estimates(scan, stacked, positions, cols, workers, turns) -> np.ndarray:
    """Estimates for one huge prompt (``stacked``: sorted true then proxy, ascending)."""
    N = stacked.shape[1]
    laid_out = np.stack([row.take(positions) for row in stacked]).reshape((2, scan.n_blocks, scan.R, scan.SEGMENTS))
    out = np.empty((2, len(cols)))
    cheap = (cols == 1) | (cols == N)
    out[:, cols == 1] = (np.add.reduce(stacked, axis=1) / N)[:, None]
    out[:, cols == N] = stacked[:, -1:]
    rest = np.flatnonzero(~cheap)
    if len(rest):
        # Each n is independent: the n's are dealt round-robin to the threads (by
        # ascending n, so that long and short tails mix); results do not depend on it.
        ascending = rest[np.argsort(cols[rest], kind="stable")]
        shares = [ascending[i :: max(1, workers)] for i in range(max(1, min(workers, len(ascending))))]
        for share, part in zip(shares, map_in_order(lambda cs: scan.apply_layout(laid_out, cs), shares, len(shares))):
            out[:, share] = part[:, share]
    return out


def _block_stats(ranked, estimates: np.ndarray, cols: np.ndarray, bound: np.ndarray, kl_mode, N: int) -> CurveStats:
    m = ranked.proxy.shape[0]
    true_est, proxy_est = estimates[:m], estimates[m : 2 * m]
    kl = np.broadcast_to(bound, true_est.shape)
    has_ties = len(ranked.tied) > 0
    if has_ties and kl_mode != "continuous":
        kl = kl.copy()
        kl[ranked.tied] = _discrete_kl_sorted(ranked.proxy[ranked.tied], ranked.new_group, cols, kl_mode)
    if kl_mode == "discrete" and len(ranked.tied) < m:  # a level seen once is an atom too
        kl = kl.copy()
        untied = np.setdiff1d(np.arange(m), ranked.tied)
        every_level = np.ones((len(untied), ranked.proxy.shape[1]), dtype=bool)
        kl[untied] = _discrete_kl_sorted(ranked.proxy[untied], every_level, cols, kl_mode)
    return curve_stats_update(cols, true_est, proxy_est, kl, N=N, has_ties=has_ties, n_samples=m * N)


def _level_block_stats(counts: LevelCounts, weights: LevelWeights, cols, bound, kl_mode, N: int) -> CurveStats:
    """As :func:`_block_stats`, for a block counted by proxy level."""
    masses = weights.masses(counts)
    true_est, proxy_est = weights.estimates(counts, masses)
    m = counts.counts.shape[0]
    kl = np.broadcast_to(bound, true_est.shape)
    tied = counts.tied
    if kl_mode == "discrete":  # every level an atom, also in rows without a tie
        kl = counted_level_kl(counts.counts, counts.below, N, cols, kl_mode)
    elif len(tied) and kl_mode != "continuous":
        kl = kl.copy()
        kl[tied] = counted_level_kl(counts.counts[tied], counts.below[tied], N, cols, kl_mode)
    return curve_stats_update(cols, true_est, proxy_est, kl, N=N, has_ties=len(tied) > 0, n_samples=m * N)


def bon_curve(
    proxy: object,
    true: object,
    ns: object | None = None,
    *,
    nan_policy: NanPolicy = "raise",
    kl_mode: KlMode = "auto",
    threads: int | None = None,
) -> BonCurve:
    """Best-of-n curves of the true and proxy score, averaged over prompts.

    Per prompt, the all-subsets estimator (:func:`bon_estimate`) gives the expected
    true and proxy score of best-of-n selection by proxy; this averages them over
    prompts with standard errors, and annotates each n with its KL from the base
    policy (``kl``, the mean over prompts; ``kl_bound`` is ``log n - (n-1)/n``).

    KL per prompt, by ``kl_mode``:

    * ``"auto"`` (default): tied proxy values are atoms and distinct values continuous
      mass (:func:`kl_bon_empirical`). Tie-free prompts get the formula exactly; a
      duplicated sample moves the KL only by the best-of-n mass near it.
    * ``"discrete"``: every proxy level is an atom, Beirami et al.'s exact value (for
      verifiers and rating scales, where a level seen once is still an atom).
    * ``"continuous"``: the formula for every prompt.

    Args:
        proxy: proxy scores, ``(P, N)`` or a ragged list of 1-D arrays (a 1-D array is one prompt).
        true: true scores, same shape.
        ns: the grid of n; default powers of two up to the largest N, plus that N.
        nan_policy: ``"raise"`` (default) or ``"omit"`` non-finite samples.
        kl_mode: ``"auto"``, ``"discrete"`` or ``"continuous"`` (above).
        threads: worker threads for blocks of prompts (default ``$BON_TRACKER_THREADS``,
            else ``min(cores, 4)``); results are bit-identical for any count.

    Example:
        >>> curve = bon_curve([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        >>> curve.n.tolist(), curve.true_mean.round(4).tolist()
        ([1, 2, 3], [0.5, 0.6667, 0.5])
    """
    stats = curve_stats(proxy, true, ns, nan_policy=nan_policy, kl_mode=kl_mode, threads=threads)
    N = stats.N
    n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]
    return curve_stats_compute(stats, n_arr, kl_mode=kl_mode)
