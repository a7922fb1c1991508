"""Best-of-n curves aggregated over prompts: means, standard errors and KL."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np

from bon_tracker.core.accumulator import (
    CurveStats,
    curve_stats_by_n,
    curve_stats_compute,
    empty_curve_stats,
    kl_formula,
    merge_curve_stats,
)
from bon_tracker.core.kl import KlMode, _discrete_kl_sorted, check_kl_mode, counted_level_kl
from bon_tracker.core.levels import LevelCounts, LevelWeights, concat_level_counts, count_levels, same_array
from bon_tracker.core.ranking import (
    BlockRanker,
    NonFiniteInput,
    block_rows,
    blocks_by_length,
    dense_blocks,
    thread_ranker,
)
from bon_tracker.core.threads import BlasTurns, map_in_order, single_threaded_blas, thread_count
from bon_tracker.core.validation import NanPolicy, check_nan_policy, check_ns, paired_scores, sample_counts
from bon_tracker.core.weights import MANY_NS, ScanWeights, TailWeights, rank_weights

# One prompt with more samples than this, in a call with few such prompts, gets its
# weights built block by block (ScanWeights) instead of as one dense matrix.
SCAN_MIN_N = 1 << 14
SCAN_MAX_PROMPTS = 64
# Blocks with few proxy levels are reduced this many at a time (one work item).
LEVEL_GROUP = 8
# Multiply-adds of a call's weight products below which OpenBLAS runs them on one thread
# anyway (its GEMM_MULTITHREAD_THRESHOLD: 4 x 65,536), so BLAS is not limited around them.
SMALL_PRODUCT = 1 << 18


def default_ns(N: int) -> np.ndarray:
    """Powers of two up to N, plus N itself: 1, 2, 4, ..., N."""
    if N < 1:
        return np.array([N], dtype=np.int64)
    grid = [1 << i for i in range(int(N).bit_length())]  # every power of two up to N
    if grid[-1] != N:
        grid.append(int(N))
    return np.array(grid, dtype=np.int64)


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


@dataclass
class PromptEstimates:
    """Per-prompt estimates, filled block by block and held by n: ``by_n[s, j, p]`` is prompt
    ``p``'s estimate at n = ``grid[j]`` of the true score (``s = 0``), then of the proxy (``s = 1``).

    By n, a block's estimates (one row of the weight product per n) are copied in as whole rows,
    not scattered one column per prompt. NaN where a prompt has fewer than n samples. ``proxy``
    is None when only one score (``true``) is estimated (:func:`~bon_tracker.core.estimators.bon_estimate`).
    """

    grid: np.ndarray  # ascending, unique
    by_n: np.ndarray  # (scores, len(grid), P)

    @classmethod
    def empty(cls, P: int, grid: np.ndarray, *, with_proxy: bool, filled: bool = False) -> PromptEstimates:
        """``filled``: every prompt reaches every n of the grid (no NaN needed)."""
        shape = (2 if with_proxy else 1, len(grid), P)
        return cls(grid, np.empty(shape) if filled else np.full(shape, np.nan))

    @property
    def true(self) -> np.ndarray:
        """``(P, len(grid))``: a view (column-major) of ``by_n``."""
        return self.by_n[0].T

    @property
    def proxy(self) -> np.ndarray | None:
        return self.by_n[1].T if len(self.by_n) > 1 else None

    def in_order(self, values: np.ndarray, ns: np.ndarray, *, contiguous: bool = True) -> np.ndarray:
        """The columns of ``values`` (one per n of ``grid``) in the order of ``ns`` (repeats allowed),
        as a C-contiguous ``(P, len(ns))`` array (``contiguous`` False: a view where it can be)."""
        if not (ns is self.grid or (len(ns) == len(self.grid) and np.array_equal(ns, self.grid))):
            values = values[:, np.searchsorted(self.grid, ns)]
        return np.ascontiguousarray(values) if contiguous else values


@dataclass(frozen=True)
class _GroupOut:
    """Where one dense group's per-block estimates go: its prompts of a :class:`PromptEstimates`."""

    estimates: PromptEstimates
    prompts: np.ndarray | None  # the group's prompts among all (None: the group is every prompt)

    def put(self, rows: slice, block: np.ndarray) -> None:
        """``block``: ``(width, scores, m)``, the block's estimates by n (true, then proxy)."""
        # The group reaches the grid's first columns only; blocks (and threads) write disjoint prompts.
        where = rows if self.prompts is None else self.prompts[rows]
        self.estimates.by_n[:, : block.shape[0], where] = block.transpose(1, 0, 2)

    def put_rows(self, rows: slice, true_est: np.ndarray, proxy_est: np.ndarray | None) -> None:
        """Estimates by prompt, ``(m, width)`` each."""
        where = rows if self.prompts is None else self.prompts[rows]
        width = true_est.shape[1]
        by_n = self.estimates.by_n  # by_n[s] first: with an index array, by_n[s, :w, where] puts prompts first
        by_n[0][:width, where] = true_est.T
        if proxy_est is not None and len(by_n) > 1:
            by_n[1][:width, where] = proxy_est.T


def rank_and_estimate(
    proxy: object,
    true: object,
    ns: object | None,
    *,
    nan_policy: NanPolicy,
    kl_mode: KlMode,
    threads: int | None,
    stats: bool,
    keep: bool,
    names: tuple[str, str] = ("proxy", "true"),
) -> tuple[CurveStats | None, PromptEstimates | None, np.ndarray, bool]:
    """One sort of every prompt: ``(statistics, per-prompt estimates, grid as given, one_prompt)``.

    ``stats``: the curve's statistics (true and proxy estimates, KL); without it only the
    estimates of ``true`` are computed. ``keep``: also return the per-prompt estimates.
    """
    check_kl_mode(kl_mode)
    check_nan_policy(nan_policy)
    workers = thread_count(threads)
    dense = _dense_input(proxy, true)
    if dense is not None:
        p, t, one_prompt = dense
        N = p.shape[1]
        n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]
        try:
            found = _pass_over_groups([(None, p, t)], p.shape[0], n_arr, kl_mode, workers, True, stats, keep)
            return (*found, n_arr, one_prompt)
        except NonFiniteInput:
            pass  # validate in full below: an error naming the values, or nan_policy="omit"
    p, t, one_prompt = paired_scores(proxy, true, nan_policy=nan_policy, names=names)
    counts = sample_counts(p)
    N = int(counts.max())
    n_arr = default_ns(N) if ns is None else check_ns(ns, N)[0]
    if isinstance(p, np.ndarray):
        groups = [(None, p, t)]
    else:
        groups = []
        for idx in blocks_by_length(p).values():
            group_p = np.stack([p[i] for i in idx])
            groups.append((idx, group_p, group_p if t is p else np.stack([t[i] for i in idx])))
    total, estimates = _pass_over_groups(groups, len(counts), n_arr, kl_mode, workers, False, stats, keep)
    empty = int(np.count_nonzero(counts == 0))
    if total is not None and empty:
        total = merge_curve_stats(total, replace(empty_curve_stats(n_arr), n_prompts=empty))
    return total, estimates, n_arr, one_prompt


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
    stats, _, _, _ = rank_and_estimate(
        proxy, true, ns, nan_policy=nan_policy, kl_mode=kl_mode, threads=threads, stats=True, keep=False
    )
    return stats


def _pass_over_groups(
    groups,
    P: int,
    n_arr: np.ndarray,
    kl_mode: KlMode,
    workers: int,
    check_finite: bool,
    stats: bool,
    keep: bool,
    lend: list | None = None,
) -> tuple[CurveStats | None, PromptEstimates | None]:
    """Statistics (merged in order) and per-prompt estimates of groups ``(prompts, proxy, true)``,
    each a dense ``(rows, N)`` pair (``prompts``: their indices among the ``P``, None for all).
    ``lend``: see :func:`_group_stats`."""
    grid = np.asarray(n_arr, dtype=np.int64)
    if np.any(grid[1:] <= grid[:-1]):
        grid = np.unique(grid)
    total = None
    # One group of every prompt, each with N samples: every estimate gets written.
    filled = len(groups) == 1 and groups[0][0] is None and groups[0][1].shape[1] >= grid[-1]
    estimates = PromptEstimates.empty(P, grid, with_proxy=stats, filled=filled) if keep else None
    # BLAS held to one thread (see threads.py), except where the products are too small for
    # OpenBLAS to thread them at all, and setting the limit would cost more than the product.
    products = len(grid) * 2 * sum(p.size for _, p, _ in groups)
    with single_threaded_blas() if products > SMALL_PRODUCT else contextlib.nullcontext(True) as limited:
        turns = BlasTurns(needed=workers > 1 and not limited)
        for prompts, p, t in groups:
            out = None if estimates is None else _GroupOut(estimates, prompts)
            parts = _group_stats(p, t, grid, kl_mode, workers, turns, check_finite, stats=stats, out=out, lend=lend)
            for part in parts:
                total = part if total is None else merge_curve_stats(total, part)
    if stats and (total is None or not np.array_equal(total.n, grid)):
        total = merge_curve_stats(empty_curve_stats(grid), total or empty_curve_stats(grid))
    return total, estimates


def _counted(p: np.ndarray, t: np.ndarray, same: bool, check_finite: bool, with_proxy: bool) -> LevelCounts | None:
    """The block counted by proxy level when it has few levels (:mod:`bon_tracker.core.levels`), else None.

    Its score means are ``t``'s, then (``with_proxy``) the proxy's own."""
    scores = (None,) if same else (t,)
    counts = count_levels(p, (*scores, None) if with_proxy else scores)
    if counts is not None and check_finite and not same and not np.isfinite(counts.score_means[0]).all():
        raise NonFiniteInput  # a non-finite score, or finite ones whose sum overflows
    return counts


def _group_stats(
    p, t, grid, kl_mode, workers, turns, check_finite, *, stats: bool = True, out: _GroupOut | None, lend=None
):
    """One dense group, block by block in order: each block's :class:`CurveStats` (``stats``),
    and its per-prompt estimates into ``out``. Without ``stats`` only ``t`` is estimated and
    nothing is yielded. ``lend`` (a list): when the group is one block, sorted and without a tie
    in the proxy, ``(ranker, stacked buffer)`` is appended to it: the buffer (lent by the ranker,
    :meth:`~bon_tracker.core.ranking.BlockRanker.lend_stacked`) holds each prompt's samples
    sorted by proxy, the true scores in rows ``:P``, the proxies in rows ``P:2P``."""
    P, N = p.shape
    cols = grid[grid <= N]
    if len(cols) == 0:
        if stats:
            yield replace(empty_curve_stats(grid), N=N, n_samples=P * N, n_prompts=P)
        return
    bound = kl_formula(cols)
    same = same_array(p, t)
    level_weights = LevelWeights(N, cols)
    many = len(cols) > MANY_NS  # a large grid: TailWeights, work vectorised over n (see weights.py)
    scores = 2 if stats else 1  # rows of estimates per prompt: true (then proxy)

    def counted(rows: slice) -> LevelCounts | None:
        return _counted(p[rows], t[rows], same, check_finite, with_proxy=stats)

    def from_counts(counts: LevelCounts, rows: slice) -> CurveStats | None:
        masses = level_weights.masses(counts)
        true_est, *proxy_est = level_weights.estimates(counts, masses)
        if out is not None:
            out.put_rows(rows, true_est, proxy_est[0] if stats else None)
        return _level_block_stats(counts, true_est, proxy_est[0], cols, bound, kl_mode, N) if stats else None

    def from_sorted(ranked, by_n: np.ndarray, rows: slice) -> CurveStats | None:
        """``by_n``: ``(len(cols), scores * m)`` estimates, the true score's prompts then the proxy's."""
        m = rows.stop - rows.start
        if out is not None:
            out.put(rows, by_n.reshape(len(cols), scores, m))
        return _block_stats(ranked, by_n, cols, bound, kl_mode, N) if stats else None

    if N > SCAN_MIN_N and P <= SCAN_MAX_PROMPTS:
        scan = TailWeights(N, cols) if many else ScanWeights(N, cols)
        for row in range(P):
            rows = slice(row, row + 1)
            counts = counted(rows)
            part = None
            if counts is not None:
                part = from_counts(counts, rows)
            else:
                ranked = thread_ranker(1, N).rank(p[rows], t[rows], check_finite=check_finite)
                stacked = ranked.stacked[:scores]
                if many:
                    estimates = _tail_estimates(scan, stacked, workers)
                else:
                    estimates = _scan_estimates(scan, stacked, cols, workers)
                part = from_sorted(ranked, np.ascontiguousarray(estimates.T), rows)
            if part is not None:
                yield part
        return
    weights = TailWeights(N, cols) if many else rank_weights(N, cols)
    rows_per_block = min(block_rows(N), P)
    # Every weight of n = 1 is 1/N: its estimates (row means) are non-finite whenever a value of
    # their row is. With both scores estimated, checking them replaces two passes over the block
    # (the proxy's ends, the scores' sum) by one over a row of estimates.
    check_after = check_finite and stats and cols[0] == 1

    def sorted_block(rows: slice) -> CurveStats | None:
        ranker = thread_ranker(rows_per_block, N)
        ranked = ranker.rank(p[rows], t[rows], check_finite=check_finite, checked_after=check_after, chunked=alone)
        m = rows.stop - rows.start
        stacked = ranked.stacked[: scores * m]
        # Non-finite values are found only after the product here: no warnings about them.
        with turns, np.errstate(invalid="ignore", over="ignore"):
            if many:
                by_n = np.ascontiguousarray(weights.apply_stacked(stacked).T)
            else:
                by_n = weights.apply_by_n(stacked, out=ranker.product_buffer(len(cols), scores * m))
            if check_after and not np.isfinite(np.add.reduce(by_n[0])):
                raise NonFiniteInput  # a non-finite proxy or score, or finite ones whose sum overflows
        part = from_sorted(ranked, by_n, rows)
        if lend is not None and m == P and len(ranked.tied) == 0:
            lend.append((ranker, ranker.lend_stacked()))  # the last use of this block's buffer
        return part

    def work(blocks: list[slice]) -> list[CurveStats]:
        """Each block counted by level or sorted; consecutive counted blocks share one reduction."""
        parts: list[CurveStats | None] = []
        held: list[LevelCounts] = []  # consecutive counted blocks, not yet reduced
        held_rows = slice(0, 0)
        for rows in blocks:
            counts = counted(rows)
            if counts is not None:
                held_rows = slice(held_rows.start if held else rows.start, rows.stop)
                held.append(counts)
                continue
            if held:
                parts.append(from_counts(concat_level_counts(held), held_rows))
                held = []
            parts.append(sorted_block(rows))
        if held:
            parts.append(from_counts(concat_level_counts(held), held_rows))
        return [part for part in parts if part is not None]

    blocks = dense_blocks(P, N)
    # Work items: one block each, or LEVEL_GROUP consecutive blocks when the first block has few
    # proxy levels (counting a block is cheap next to reducing it). Either partition depends on
    # the input only, never on the thread count.
    size = LEVEL_GROUP if len(blocks) > 1 and counted(blocks[0]) is not None else 1
    items = [blocks[i : i + size] for i in range(0, len(blocks), size)]
    alone = min(workers, len(items)) <= 1  # one thread: sorted_block ranks in cache-sized chunks
    for parts in map_in_order(work, items, min(workers, len(items))):
        yield from parts


def _tail_estimates(tail: TailWeights, stacked: np.ndarray, workers: int) -> np.ndarray:
    """Estimates for one huge prompt on a large grid: the chunks of n dealt to the threads."""
    out = np.empty((stacked.shape[0], len(tail.ns)))
    indices = list(range(len(tail.chunks)))
    for index, part in zip(indices, map_in_order(lambda i: tail.apply_chunk(stacked, i), indices, workers)):
        out[:, tail.chunks[index][0]] = part
    return out


def _scan_estimates(scan: ScanWeights, stacked: np.ndarray, cols: np.ndarray, workers: int) -> np.ndarray:
    """Estimates for one huge prompt (``stacked``: its sorted true, then its sorted proxy, ascending)."""
    K, N = stacked.shape
    out = np.empty((K, len(cols)))
    cheap = (cols == 1) | (cols == N)
    out[:, cols == 1] = (np.add.reduce(stacked, axis=1) / N)[:, None]
    out[:, cols == N] = stacked[:, -1:]
    rest = np.flatnonzero(~cheap)
    if len(rest):
        # The work items (blocks of positions, every n in each) depend on N and the grid only:
        # the threads share them, and the results do not depend on how many there are.
        part = scan.apply(stacked, rest, mapper=lambda fn, items: map_in_order(fn, items, workers))
        out[:, rest] = part[:, rest]
    return out


def _kl_sum(bound: np.ndarray, rows: int, special: np.ndarray, special_kl: np.ndarray | None) -> np.ndarray:
    """Sum over ``rows`` prompts of their KL: ``special_kl`` (``(len(special), len(bound))``) for
    the prompts ``special``, the formula ``bound`` for every other prompt."""
    total = bound * (rows - len(special))
    if special_kl is not None and len(special):
        total = total + np.ones(len(special)) @ special_kl
    return total


def _block_stats(ranked, by_n: np.ndarray, cols: np.ndarray, bound: np.ndarray, kl_mode, N: int) -> CurveStats:
    """Statistics of one sorted block; ``by_n``: ``(len(cols), 2 m)`` estimates, true then proxy."""
    m = ranked.proxy.shape[0]
    tied = ranked.tied
    has_ties = len(tied) > 0
    if kl_mode == "discrete":  # every level an atom, also in rows without a tie
        kl = np.empty((m, len(cols)))
        if has_ties:
            kl[tied] = _discrete_kl_sorted(ranked.proxy[tied], ranked.new_group, cols, kl_mode)
        if len(tied) < m:
            untied = np.setdiff1d(np.arange(m), tied)
            every_level = np.ones((len(untied), ranked.proxy.shape[1]), dtype=bool)
            kl[untied] = _discrete_kl_sorted(ranked.proxy[untied], every_level, cols, kl_mode)
        kl_sum = _kl_sum(bound, m, np.arange(m), kl)
    elif has_ties and kl_mode != "continuous":
        kl_sum = _kl_sum(bound, m, tied, _discrete_kl_sorted(ranked.proxy[tied], ranked.new_group, cols, kl_mode))
    else:
        kl_sum = bound * m
    estimates = by_n.reshape(len(cols), 2, m)  # by_n is C-contiguous: a view, not needed after this
    return curve_stats_by_n(cols, estimates, kl_sum, N=N, has_ties=has_ties, n_samples=m * N, overwrite=True)


def _level_block_stats(counts: LevelCounts, true_est, proxy_est, cols, bound, kl_mode, N: int) -> CurveStats:
    """As :func:`_block_stats`, for a block counted by proxy level (estimates ``(m, len(cols))``)."""
    m = counts.counts.shape[0]
    tied = counts.tied
    if kl_mode == "discrete":  # every level an atom, also in rows without a tie
        kl_sum = _kl_sum(bound, m, np.arange(m), counted_level_kl(counts.counts, counts.below, N, cols, kl_mode))
    elif len(tied) and kl_mode != "continuous":
        kl_tied = counted_level_kl(counts.counts[tied], counts.below[tied], N, cols, kl_mode)
        kl_sum = _kl_sum(bound, m, tied, kl_tied)
    else:
        kl_sum = bound * m
    estimates = np.stack([true_est.T, proxy_est.T], axis=1)  # (len(cols), 2, m)
    return curve_stats_by_n(cols, estimates, kl_sum, N=N, has_ties=len(tied) > 0, n_samples=m * N)


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
        threads: threads for blocks of prompts, the calling one included (default ``$BON_TRACKER_THREADS``,
            else ``min(cores, 4)``); results are bit-identical for any count.

    Example:
        >>> curve = bon_curve([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        >>> curve.n.tolist(), curve.true_mean.round(4).tolist()
        ([1, 2, 3], [0.5, 0.6667, 0.5])
    """
    stats, _, n_arr, _ = rank_and_estimate(
        proxy, true, ns, nan_policy=nan_policy, kl_mode=kl_mode, threads=threads, stats=True, keep=False
    )
    return curve_stats_compute(stats, n_arr, kl_mode=kl_mode)


class SortedScores(NamedTuple):
    """Each prompt's samples sorted by proxy (ascending; no prompt has a tie in it), lent by the
    curve's own ranker (:func:`finite_curve_parts` with ``lend_sorted``): read them, then
    :meth:`give_back` the buffer (from any thread) so that later calls reuse it."""

    proxy: np.ndarray  # (P, N), each row ascending
    true: np.ndarray  # (P, N): the true scores in the same order (exact: no tie was averaged)
    ranker: BlockRanker
    buffer: np.ndarray

    def give_back(self) -> None:
        self.ranker.give_back(self.buffer)


class CurveParts(NamedTuple):
    """A curve and the per-prompt estimates it averages (:func:`bon_curve_parts`)."""

    curve: BonCurve
    true: np.ndarray  # (P, len(curve.n)): each prompt's estimate of E[true of best-of-n], NaN where N_p < n
    proxy: np.ndarray  # (P, len(curve.n)): the same for the proxy score
    sorted: SortedScores | None = None  # finite_curve_parts(..., lend_sorted=True) only


def finite_curve_parts(
    proxy: np.ndarray, true: np.ndarray, ns: object | None = None, *, lend_sorted: bool = False
) -> CurveParts | None:
    """:func:`bon_curve_parts` of two ``(P, N)`` float64 matrices of one shape that have not been
    checked for NaN or inf: None when a value is not finite (or their sum overflows), so that a
    caller that validates anyway (the tracker) reads its scores once, not twice.

    The curve and estimates are those of :func:`bon_curve_parts` (the same pass): the blocks
    find non-finite values on the way, at no extra cost. The estimates are views of one buffer
    held by n (column-major): made C-contiguous by whoever needs them so, off the caller's thread.

    ``lend_sorted``: where the input was ranked as one block without a tie in the proxy, the
    sorted samples come with the parts (``parts.sorted``, :class:`SortedScores`), lent by the
    ranker rather than copied: a caller that must keep the scores past its return (the tracker's
    worker) takes them instead of a copy of the input.
    """
    dense = _dense_input(proxy, true)
    if dense is None or dense[2]:
        raise ValueError("finite_curve_parts takes two (P, N) float64 matrices of one shape")
    p, t, _ = dense
    n_arr = default_ns(p.shape[1]) if ns is None else check_ns(ns, p.shape[1])[0]
    lent: list = []
    try:
        stats, estimates = _pass_over_groups(
            [(None, p, t)],
            p.shape[0],
            n_arr,
            "auto",
            thread_count(None),
            True,
            True,
            True,
            lent if lend_sorted else None,
        )
    except NonFiniteInput:
        return None
    parts = _curve_parts(stats, estimates, n_arr, "auto", contiguous=False)
    if not lent:
        return parts
    ranker, buffer = lent[0]
    P = p.shape[0]
    return parts._replace(sorted=SortedScores(buffer[P : 2 * P], buffer[:P], ranker, buffer))


def _curve_parts(
    stats: CurveStats, estimates: PromptEstimates, n_arr: np.ndarray, kl_mode: KlMode, *, contiguous: bool = True
) -> CurveParts:
    curve = curve_stats_compute(stats, n_arr, kl_mode=kl_mode)
    assert estimates.proxy is not None
    return CurveParts(
        curve,
        estimates.in_order(estimates.true, n_arr, contiguous=contiguous),
        estimates.in_order(estimates.proxy, n_arr, contiguous=contiguous),
    )


def bon_curve_parts(
    proxy: object,
    true: object,
    ns: object | None = None,
    *,
    nan_policy: NanPolicy = "raise",
    kl_mode: KlMode = "auto",
    threads: int | None = None,
) -> CurveParts:
    """:func:`bon_curve` and the per-prompt estimates of the true and the proxy score, from one sort.

    ``parts.true`` equals ``bon_estimate(proxy, true, parts.curve.n)`` and ``parts.proxy``
    equals ``bon_estimate(proxy, proxy, parts.curve.n)`` (one row per prompt, also for a 1-D
    prompt; NaN where a prompt has fewer than n samples), at the cost of ``bon_curve`` alone.
    Arguments as :func:`bon_curve`.

    Example:
        >>> parts = bon_curve_parts([[0.1, 0.9, 0.5], [0.3, 0.2, 0.8]], [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        >>> parts.true.round(4).tolist(), parts.curve.true_mean.round(4).tolist()
        ([[0.6667, 1.0, 1.0], [0.3333, 0.3333, 0.0]], [0.5, 0.6667, 0.5])
    """
    stats, estimates, n_arr, _ = rank_and_estimate(
        proxy, true, ns, nan_policy=nan_policy, kl_mode=kl_mode, threads=threads, stats=True, keep=True
    )
    return _curve_parts(stats, estimates, n_arr, kl_mode)
