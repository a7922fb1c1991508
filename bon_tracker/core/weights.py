"""Weights of the unbiased all-subsets best-of-n estimator.

For N samples sorted by proxy ascending (rank k = 1 is the worst), the probability
that rank k is the best of a uniformly random n-subset is

.. math:: w_k(n) = \\binom{k-1}{n-1} \\Big/ \\binom{N}{n}

The binomials themselves overflow a float near N = 1030, so they are never formed:
the weights are built from the top down with the ratio
``w_{k-1} = w_k (k-n)/(k-1)`` starting at ``w_N = n/N`` (a cumulative product of
exact ratios of small integers); for a huge N, :class:`ScanWeights` builds the
same products block by block instead of serially.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# Below exp(-737) (about 1e-320) a weight is subnormal: its contribution to any
# weighted mean is below float64 resolution, so it is stored as exactly zero.
_LOG_NEGLIGIBLE = -737.0


def _lowest_nonzero_rank(N: int, n: int) -> int:
    """Smallest rank whose weight can exceed ``exp(_LOG_NEGLIGIBLE)``.

    Uses the bound w_k <= (n/N) ((k-1)/(N-1))^(n-1), so no weight at or above the
    returned rank is wrongly dropped; ranks below n have weight exactly zero.
    """
    if n <= 1:
        return 1
    log_ratio = (_LOG_NEGLIGIBLE - math.log(n / N)) / (n - 1)
    k_cut = 1 + math.floor((N - 1) * math.exp(log_ratio))
    return max(n, k_cut)


def bon_weight_tail_desc(N: int, n: int, ranks_desc: np.ndarray | None = None) -> np.ndarray:
    """Non-negligible weights from rank N downwards: ``w[i]`` is the weight of rank ``N - i``.

    Ranks below ``N - len(w) + 1`` have weight zero (below 1e-320). For large n this
    is a short tail, which keeps one prompt with N = 10^6 samples cheap.
    ``ranks_desc`` (``N, N-1, ..., 1`` as floats) may be passed to reuse it across n.
    """
    k0 = _lowest_nonzero_rank(N, n)
    length = N - k0 + 1
    if ranks_desc is None:
        ranks_desc = np.arange(N, 0, -1, dtype=np.float64)
    weights = np.empty(length, dtype=np.float64)
    weights[0] = n / N
    # w_{j-1} = w_j (j - n) / (j - 1): a cumulative product of exact small-integer ratios.
    ratios = weights[1:]
    np.subtract(ranks_desc[: length - 1], n, out=ratios)
    np.divide(ratios, ranks_desc[: length - 1] - 1.0, out=ratios)
    return np.cumprod(weights, out=weights)


def bon_weight_tail(N: int, n: int) -> tuple[int, np.ndarray]:
    """Non-negligible weights in ascending rank order: ``(k0, w)``, ``w[i]`` the weight of rank ``k0 + i``."""
    desc = bon_weight_tail_desc(N, n)
    return N - len(desc) + 1, desc[::-1].copy()


class RankWeights:
    """The weights of every n of a grid for one N, applied to rank-sorted scores.

    Dense matrices, so that one matrix product serves every prompt of a block. In
    :meth:`apply_stacked` the column of ``n = N`` (the top-ranked score) is read directly,
    and so is ``n = 1`` (the mean) where that leaves a multiple of four columns, the widths
    at which BLAS's kernels are fastest; :meth:`apply_by_n` (the curve's) multiplies every n.
    """

    DENSE_LIMIT = 1 << 21  # N * len(ns) above this: ScanWeights instead

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        special_top = self.ns == self.N
        special_mean = (self.ns == 1) & (self.N > 1)
        if (np.count_nonzero(~special_top) - np.count_nonzero(special_mean)) % 4 != 0:
            special_mean[:] = False  # the mean costs a column only when that keeps a multiple of four
        self.top = np.flatnonzero(special_top)
        self.mean = np.flatnonzero(special_mean & ~special_top)
        self.gemm = np.flatnonzero(~special_top & ~special_mean)
        self.dense = np.zeros((self.N, len(self.gemm)), order="F")  # Fortran order: BLAS's fast path
        for j, n in enumerate(self.ns[self.gemm]):
            k0, tail = bon_weight_tail(self.N, int(n))
            self.dense[k0 - 1 :, j] = tail
        # Weights below 1e-300 change no estimate (N * 1e-300 of the scores' scale) but
        # would make every product with them take the hundredfold-slower subnormal path.
        self.dense[self.dense < 1e-300] = 0.0

        # Every n in one matrix (the special columns cost more, a pass each, than their share of
        # a product), one row per n: what the statistics reduce. The shortest rows multiply it with
        # the whole block at once; longer ones chunk by chunk (see apply_by_n).
        every = np.zeros((len(self.ns), self.N))
        for j, n in enumerate(self.ns):
            k0, tail = bon_weight_tail(self.N, int(n))
            every[j, k0 - 1 :] = tail
        every[every < 1e-300] = 0.0
        self.by_n = every if self.N <= BY_N_MAX_N else None
        # (N, len(ns) rounded up to four) C-contiguous, zero-padded: BLAS's fast widths.
        self.columns = np.zeros((self.N, -(-len(self.ns) // 4) * 4))
        self.columns[:, : len(self.ns)] = every.T

    def apply_by_n(self, stacked: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(rows, N)`` scores sorted by proxy rank -> ``(len(ns), rows)`` estimates, C-contiguous.

        One row per n, so that reductions over prompts run along contiguous memory. ``out``:
        a C-contiguous ``(len(ns), rows)`` array to write them to.

        Up to ``BY_N_MAX_N`` one product ``by_n @ stacked.T``. Longer rows are multiplied
        ``PRODUCT_SAMPLES`` at a time as ``chunk @ columns`` and transposed into ``out``: a block's
        whole ``stacked`` does not stay in cache through BLAS's passes over it, a chunk does
        (the product measured about 1.4 times faster at N = 64 and 256, on one thread).
        """
        rows = stacked.shape[0]
        if out is None:
            out = np.empty((len(self.ns), rows))
        if self.by_n is not None:
            return np.matmul(self.by_n, stacked.T, out=out)
        step = max(PRODUCT_ROWS, PRODUCT_SAMPLES // self.N)
        part = np.empty((min(step, rows), self.columns.shape[1]))
        for start in range(0, rows, step):
            chunk = stacked[start : start + step]
            np.matmul(chunk, self.columns, out=part[: len(chunk)])
            out[:, start : start + len(chunk)] = part[: len(chunk), : len(self.ns)].T
        return out

    def apply_stacked(self, stacked: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(rows, N)`` scores sorted by proxy rank -> ``(rows, len(ns))`` estimates."""
        if out is None:
            out = np.empty((stacked.shape[0], len(self.ns)))
        if len(self.gemm) == len(self.ns):
            np.matmul(stacked, self.dense, out=out)
            return out
        if len(self.gemm):
            out[:, self.gemm] = stacked @ self.dense
        if len(self.top):
            out[:, self.top] = stacked[:, -1:]
        if len(self.mean):
            out[:, self.mean] = (np.add.reduce(stacked, axis=1) / self.N)[:, None]
        return out

    def apply(self, *sorted_scores: np.ndarray) -> list[np.ndarray]:
        """Each ``(P, N)`` matrix of scores sorted by proxy rank -> ``(P, len(ns))`` estimates."""
        return [self.apply_stacked(s) for s in sorted_scores]


# Up to this N, RankWeights multiplies the whole block at once with one row per n (apply_by_n);
# longer rows PRODUCT_SAMPLES at a time with one column per n, the result transposed.
BY_N_MAX_N = 16
PRODUCT_SAMPLES = 1 << 16
PRODUCT_ROWS = 128  # but at least this many rows: BLAS is slow on fewer (measured at N = 4,096)
# Grids with at most this many weights are built once and kept (rank_weights): building them
# costs more than the rest of a call on a few thousand samples. 64 kept grids: 16 MiB at most.
KEPT_WEIGHTS = 1 << 15


@functools.lru_cache(maxsize=64)
def _kept_rank_weights(N: int, ns: tuple[int, ...]) -> RankWeights:
    return RankWeights(N, np.array(ns, dtype=np.int64))


def rank_weights(N: int, ns: np.ndarray) -> RankWeights:
    """:class:`RankWeights` for ``N`` and the grid ``ns``; small ones are built once and reused
    by every call and thread, so their arrays must never be written to. (They are not flagged
    read-only: numpy's matrix product with a read-only operand measured three times slower.)"""
    if N * len(ns) <= KEPT_WEIGHTS:
        return _kept_rank_weights(int(N), tuple(int(n) for n in ns))
    return RankWeights(N, ns)


class ScanWeights:
    """The weights of a grid of n for a huge N, built block by block and applied at once.

    Position g = 0, 1, ... counts ranks down from the top (rank N - g). Each n's weight
    is the product of exact ratios ``w_{k-1} / w_k = (k - n)/(k - 1)`` from ``w_N = n/N``.
    Instead of one serial cumulative product per n, positions are laid out as ``R``
    rows by segments: a product down the rows (vectorised over segments and over every
    n at once), a short cumulative product over the segments' totals, and one matrix
    product of the weights with the scores in the same layout. Each weight is the
    product of the same exact ratios as in :func:`bon_weight_tail` (rounding differs
    only in the order of the products), with the same cut-off. The products carry a
    factor 2^600 (exact) so that weights down to 1e-320 stay normal floats: subnormal
    arithmetic is a hundred times slower.
    """

    R = 64  # positions per segment
    SEGMENTS = 2048  # segments per block: R * SEGMENTS weights (1 MiB) stay in cache
    SCALE_EXPONENT = 600

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        self.order = np.argsort(self.ns, kind="stable")  # ascending n: descending tail length
        sorted_ns = self.ns[self.order]
        self.tails = np.array([self.N - _lowest_nonzero_rank(self.N, int(n)) + 1 for n in sorted_ns])
        self.sorted_ns = sorted_ns.astype(np.float64)
        self.block = self.R * self.SEGMENTS
        self.n_blocks = -(-self.N // self.block)

    def positions(self) -> np.ndarray:
        """``(blocks, R, SEGMENTS)`` ascending rank positions (0 = lowest) of the layout; padding -> 0."""
        g = (
            np.arange(self.n_blocks)[:, None, None] * self.block
            + np.arange(self.SEGMENTS)[None, None, :] * self.R
            + np.arange(self.R)[None, :, None]
        )
        return np.where(g < self.N, self.N - 1 - g, 0)

    def lay_out(self, stacked: np.ndarray) -> np.ndarray:
        """``(K, N)`` rank-sorted scores -> ``(K, blocks, R, SEGMENTS)``: each at its :meth:`positions`.

        Position g holds rank ``N - g``: the scores reversed, cut into blocks of segments of R
        (a reshape), each block's ``(SEGMENTS, R)`` transposed. The padding past rank 1 is 0.0
        (its weights are zero).
        """
        K = stacked.shape[0]
        reversed_padded = np.zeros((K, self.n_blocks * self.block))
        reversed_padded[:, : self.N] = stacked[:, ::-1]
        segments = reversed_padded.reshape(K, self.n_blocks, self.SEGMENTS, self.R)
        return np.ascontiguousarray(segments.transpose(0, 1, 3, 2))

    def apply_layout(self, laid_out: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """``(K, blocks, R, SEGMENTS)`` scores at :meth:`positions` -> ``(K, len(ns))`` estimates.

        ``columns`` picks which n's to compute (indices into ``ns``; default all); the
        others are left NaN. Each n is independent, so threads may share the n's of one call.
        """
        K = laid_out.shape[0]
        R, S, N = self.R, self.SEGMENTS, self.N
        picked = np.arange(len(self.ns)) if columns is None else np.asarray(columns)
        wanted = set(picked.tolist())  # built once: a set per j made this quadratic in the grid
        js = [j for j in range(len(self.ns)) if self.order[j] in wanted]
        scale_exponent = self.SCALE_EXPONENT
        if not np.all(np.abs(laid_out) < 2.0 ** (1000 - scale_exponent)):
            scale_exponent = 0  # absurdly large scores: unscaled (slower, never overflows)
        scale = 2.0**scale_exponent
        result = np.full((K, len(self.ns)), np.nan)
        totals = {j: np.zeros(K) for j in js}
        carries = dict.fromkeys(js, scale)
        local = np.arange(S, dtype=np.float64)[None, :] * R + np.arange(R, dtype=np.float64)[:, None]
        g = np.empty((R, S))
        inverse = np.empty((R, S))
        x = np.empty((R, S))
        flat = x.reshape(-1)
        before = np.empty(S)
        for h in range(self.n_blocks):
            base = h * self.block
            todo = [j for j in js if self.tails[j] > base]
            if not todo:
                break
            np.add(local, base, out=g)
            np.subtract(N, g, out=inverse)
            with np.errstate(divide="ignore"):
                np.divide(1.0, inverse, out=inverse)  # the padding below rank 1 is cut below
            scores = laid_out[:, h].reshape(K, -1)
            for j in todo:
                n, tail = self.sorted_ns[j], int(self.tails[j])
                np.subtract(N + 1.0 - n, g, out=x)
                with np.errstate(invalid="ignore"):
                    x *= inverse
                if h == 0:
                    x[0, 0] = n / N
                cut = tail - base  # positions from here on have weight zero (or are padding)
                if cut < self.block:
                    x[cut % R :, cut // R] = 0.0
                    x[:, cut // R + 1 :] = 0.0
                for i in range(1, R):
                    np.multiply(x[i], x[i - 1], out=x[i])
                before[0] = carries[j]
                before[1:] = x[R - 1, :-1]
                np.cumprod(before, out=before)
                carries[j] = before[-1] * x[R - 1, -1]
                x *= before
                totals[j] += scores @ flat
        for j in js:
            result[:, self.order[j]] = totals[j] / scale
        return result


class TailWeights:
    """The weights of a large grid of n for one N, built vectorised over n and applied on each
    n's non-negligible tail only.

    :class:`RankWeights` holds a dense ``(N, len(ns))`` matrix built one n at a time, and
    :class:`ScanWeights` lays out every n over all N ranks: both cost per n (a Python loop, and
    memory or work over all N) -- minutes for a grid of every n. Here the n's, in ascending
    order (descending tail length), are cut into chunks of similar tail length with at most
    ``CHUNK`` weights each; a chunk's weights are one 2-D cumulative product of the same exact
    ratios as :func:`bon_weight_tail_desc` (so every weight is the same float), and its
    estimates one matrix product with the top ``L`` ranks of the scores. Total work is the sum
    of the tails (about ``737 N / n`` ranks for n > 737), not ``N x len(ns)``; each chunk is
    short, so a call stays responsive to Ctrl-C. Chunks are kept while they total at most
    ``CACHE`` weights, else rebuilt at each use (memory stays bounded).
    """

    CHUNK = 1 << 20  # weights per chunk (8 MiB)
    CACHE = 1 << 24  # weights kept between calls (128 MiB)

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        order = np.argsort(self.ns, kind="stable")  # ascending n: descending tails
        tails = np.array([self.N - _lowest_nonzero_rank(self.N, int(n)) + 1 for n in self.ns[order]], dtype=np.int64)
        self.chunks: list[tuple[np.ndarray, np.ndarray, int]] = []  # (columns, their tails, chunk length)
        i = 0
        while i < len(order):
            length = int(tails[i])
            j = i + 1
            while j < len(order) and (j - i + 1) * length <= self.CHUNK and 2 * tails[j] >= length:
                j += 1
            self.chunks.append((order[i:j], tails[i:j], length))
            i = j
        self.size = int(sum(len(cols) * length for cols, _, length in self.chunks))
        self._cache = [self._build(*chunk) for chunk in self.chunks] if self.size <= self.CACHE else None

    def _build(self, cols: np.ndarray, tails: np.ndarray, length: int) -> np.ndarray:
        """``(len(cols), length)`` weights from the top rank down (position i: rank ``N - i``)."""
        N = self.N
        n = self.ns[cols].astype(np.float64)[:, None]
        ranks = np.arange(N, N - length + 1, -1, dtype=np.float64)[None, :]  # N, N-1, ..., N-length+2
        w = np.empty((len(cols), length))
        w[:, :1] = n / N
        # w_{j-1} = w_j (j - n) / (j - 1): the ratios of bon_weight_tail_desc, one row per n
        np.subtract(ranks, n, out=w[:, 1:])
        np.divide(w[:, 1:], ranks - 1.0, out=w[:, 1:])
        np.cumprod(w, axis=1, out=w)
        for row, tail in enumerate(tails.tolist()):
            # Each row decreases down the ranks: zero past its own tail, and (as RankWeights) below
            # 1e-300, which moves no estimate and would take the slow subnormal path.
            small = int(np.searchsorted(-w[row, :tail], -1e-300, side="right"))
            w[row, small:] = 0.0
        return w

    def chunk_weights(self, index: int) -> np.ndarray:
        """The weights of chunk ``index`` (kept, or built now), from the top rank down."""
        return self._cache[index] if self._cache is not None else self._build(*self.chunks[index])

    def apply_chunk(self, stacked: np.ndarray, index: int) -> np.ndarray:
        """Estimates ``(rows, len(chunk))`` of chunk ``index`` for rank-sorted ``stacked (rows, N)``."""
        length = self.chunks[index][2]
        top_down = np.ascontiguousarray(stacked[:, self.N - length :][:, ::-1])  # (rows, length): cheap next to w
        return top_down @ self.chunk_weights(index).T

    def apply_stacked(self, stacked: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """``(rows, N)`` scores sorted by proxy rank -> ``(rows, len(ns))`` estimates."""
        if out is None:
            out = np.empty((stacked.shape[0], len(self.ns)))
        for index, (cols, _, _) in enumerate(self.chunks):
            out[:, cols] = self.apply_chunk(stacked, index)
        return out

    def apply(self, *sorted_scores: np.ndarray) -> list[np.ndarray]:
        """Each ``(P, N)`` matrix of scores sorted by proxy rank -> ``(P, len(ns))`` estimates."""
        return [self.apply_stacked(s) for s in sorted_scores]


# Grids with more points than this use TailWeights (work vectorised over n) instead of
# RankWeights / ScanWeights, whose cost grows per n (a Python loop, and N work per n).
MANY_NS = 64


def bon_weights(N: int, n: int) -> np.ndarray:
    """Weights of the all-subsets best-of-n estimator, by proxy rank ascending.

    .. math:: w_k(n) = \\binom{k-1}{n-1} / \\binom{N}{n}, \\quad k = 1, \\dots, N

    ``w[k-1]`` is the probability that the sample of proxy rank k (1 = lowest) is the
    best of a uniformly random n-subset of the N samples. The weights sum to 1,
    ``w[N-1] = n/N`` and ``w[k-1] = 0`` for ``k < n``. They are computed without
    forming binomials, so they stay finite and exact to rounding for N = 10^6;
    weights below 1e-320 are stored as zero.

    Args:
        N: number of samples (>= 1).
        n: best-of-n size, ``1 <= n <= N``.

    Returns:
        Array of shape ``(N,)``.

    Example:
        >>> bon_weights(4, 2)
        array([0.        , 0.16666667, 0.33333333, 0.5       ])
    """
    for name, value in (("N", N), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    N, n = int(N), int(n)
    if N < 1:
        raise ValueError(f"N must be >= 1, got {N}")
    if not 1 <= n <= N:
        raise ValueError(f"n must satisfy 1 <= n <= N = {N}, got n = {n}")
    k0, tail = bon_weight_tail(N, n)
    weights = np.zeros(N, dtype=np.float64)
    weights[k0 - 1 :] = tail
    return weights
