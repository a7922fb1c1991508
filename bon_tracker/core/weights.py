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
        # (N, n's multiplied rounded up to four) C-contiguous, zero-padded: BLAS's fast widths. The
        # last n, when it is N (weight 1 on the top rank: the product gives that score exactly), is
        # read directly where that saves four columns of the product (a third of it at N = 256).
        width = len(self.ns)
        if width > 1 and self.ns[-1] == self.N and -(-(width - 1) // 4) < -(-width // 4):
            width -= 1
        self.multiplied = width  # the first n's, by the product; the rest (the top) read directly
        self.columns = np.zeros((self.N, -(-width // 4) * 4))
        self.columns[:, :width] = every[:width].T

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
        width = self.multiplied
        for start in range(0, rows, step):
            chunk = stacked[start : start + step]
            np.matmul(chunk, self.columns, out=part[: len(chunk)])
            out[:width, start : start + len(chunk)] = part[: len(chunk), :width].T
        if width < len(self.ns):
            out[width, :] = stacked[:, -1]
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


def _log2_factorial(m: int) -> float:
    return math.lgamma(m + 1) / math.log(2.0)


def _scan_tables(N: int, R: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """``(psi, den)`` of :class:`ScanWeights` for ``N`` (see there), read-only.

    ``psi`` has ``N // R + 2`` rows: every n's shifted rows, ``q + s < N/R + 1``.
    """
    rows = N // R + 2
    scale = 2.0**-L
    # a_u = (N + 1 - u) / 2^L, laid out as psi's columns: a_{sR + j - 1} = v[s] - (j - 1) 2^-L (exact).
    v = (N + 1.0 - R * np.arange(rows, dtype=np.float64)) * scale
    psi_t = np.empty((2 * R + 1, rows))
    psi_t[0] = 2.0**ScanWeights.TABLE_EXPONENT
    factor = np.empty(rows)
    for j in range(1, 2 * R + 1):
        np.subtract(v, (j - 1) * scale, out=factor)
        np.multiply(psi_t[j - 1], factor, out=psi_t[j])  # each entry one rounding from the previous one
    psi = np.ascontiguousarray(psi_t.T)
    segments = -(-N // R)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = np.divide(psi[:segments, 1:2], psi[:segments, 2 : R + 2])  # (segments, R); inf past rank 1
    psi.flags.writeable = False
    den.flags.writeable = False
    return psi, den


class ScanWeights:
    """The weights of a grid of n for a huge N, applied as shifted products of shared tables.

    Position g = 0, 1, ... counts ranks down from the top (rank ``k = N - g``); the weight of
    n at g is ``w_g = (n/N) prod_{t=1}^{g} (k_t + 1 - n)/k_t``, the product of exact ratios of
    :func:`bon_weight_tail`. Positions are cut into segments of ``R``. Within a segment the
    ratios' numerators ``k_t + 1 - n = N + 1 - (t + n)`` are the numbers ``a_u 2^L = N + 1 - u``
    at ``u = t + n``: one table serves every n, shifted by n. With ``2^L > N + 1``:

    * ``psi[s, j] = 2^E prod_{u = sR}^{sR + j - 1} a_u`` (j = 0 .. 2R), a sequential product of
      exact numbers, so ``psi[s, j'] / psi[s, j]`` is ``prod a_u`` over ``j <= u - sR < j'`` to
      ``j' - j`` roundings and one division;
    * ``den[s, r] = psi[s, 1] / psi[s, r + 2] = 2^{(r+1)L} / prod_{t = sR}^{sR + r} k_t``, the
      denominators of segment s;
    * ``Q = scores * den`` (once per call, shared by every n).

    For ``n = qR + rho`` the sum over segment s is ``D(s) = sum_r psi[s + q, rho + 1 + r] Q[s, r]
    = psi[s + q, rho] * sum_r w_g s_g / B(s)``, one ``vecdot`` of two views, and the estimate
    ``sum_s D(s) B(s) / psi[s + q, rho]``, where the carry ``B(s)`` (the weight before segment
    s, times ``(N + 1 - n)/n`` at s = 0) is a cumulative product over segments of the segments'
    ratio products ``psi[s + q, rho + R] / psi[s + q, rho] * den[s, R - 1]``.

    Every weight is the product of the same exact ratios as in :func:`bon_weight_tail`. At
    position ``g = sR + r`` it carries at most ``2r + 8`` roundings from its own segment and
    ``2R + 4`` from each segment above it: ``2g + 4s + 8 <= (2 + 4/R) g + 8``, fewer than the
    ``3g + s + 2`` of the serial-ratio scan this replaced (two per ratio, one per product) from
    the seventh rank down (tests/test_core_scan_weights.py checks ``(3g + 8)`` roundings against
    exact binomials at N ~ 10^6). The factors 2^E, 2^L and 2^scale_exponent are exact and keep
    every product a normal float down to weights of about 1e-312 (subnormal arithmetic is a
    hundred times slower and inexact). The tables depend on N alone and the carries on N and
    n: up to ``KEEP_N`` both are kept between calls (for the last N), else built per call.
    """

    R = 32  # positions per segment (fewer from N = 2^20 - 1 on, see _segment_length)
    SEGMENTS = 1024  # segments per work item: its scaled scores and table rows stay in cache
    TABLE_EXPONENT = 493
    # Up to this N the tables (about 3 N floats) and the carries (N/R floats per n) are kept
    # between calls, for the last N and the last 32 n: 28 MiB at N = 10^6 (default grid),
    # 32 MiB at most. Building them costs as much as the rest of a call at N = 10^6 (an eval
    # step after step with the same N pays it once).
    KEEP_N = 1 << 20

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        self.L = (self.N + 1).bit_length()
        self.R = _segment_length(self.L)
        # carries stay below 2^1016 (psi >= 2^-TABLE_EXPONENT, B(0) <= N < 2^L)
        self.scale_exponent = 1016 - self.TABLE_EXPONENT - self.L
        self.order = np.argsort(self.ns, kind="stable")  # ascending n: descending tail length
        sorted_ns = self.ns[self.order]
        self.tails = np.array([self.N - _lowest_nonzero_rank(self.N, int(n)) + 1 for n in sorted_ns])
        self.sorted_ns = sorted_ns.astype(np.float64)
        self.segments = -(-self.N // self.R)
        self._spans = -(-self.tails // self.R)  # segments reached by each n's tail
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._carries: dict[int, np.ndarray] = {}

    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``(psi, den)`` (see the class), built on first use; kept between calls up to ``KEEP_N``."""
        if self._tables is None:
            build = _kept_scan_tables if self.N <= self.KEEP_N else _scan_tables
            self._tables = build(self.N, self.R, self.L)
        return self._tables

    def carries(self, j: int) -> np.ndarray:
        """``2^scale_exponent B(s) / psi[s + q, rho]`` for the j-th smallest n, s over its tail's segments."""
        carry = self._carries.get(j)
        if carry is None:
            build = _kept_scan_carries if self.N <= self.KEEP_N else _scan_carries
            carry = self._carries[j] = build(self.N, int(self.sorted_ns[j]), int(self._spans[j]))
        return carry

    def apply(self, stacked: np.ndarray, columns=None, mapper=None) -> np.ndarray:
        """``(K, N)`` rank-sorted scores -> ``(K, len(ns))`` estimates.

        ``columns`` picks which n's to compute (indices into ``ns``; default all); the others
        are left NaN. ``mapper(fn, items)``: an in-order map (default ``map``), e.g. over threads;
        the work items depend on N and the grid only, so the results do not depend on it.
        """
        K = stacked.shape[0]
        picked = np.arange(len(self.ns)) if columns is None else np.asarray(columns)
        wanted = set(picked.tolist())  # built once: a set per j made this quadratic in the grid
        js = [j for j in range(len(self.ns)) if self.order[j] in wanted]
        result = np.full((K, len(self.ns)), np.nan)
        if not js:
            return result
        mapper = map if mapper is None else mapper
        estimates = self._estimates(stacked, js, mapper)
        if not np.isfinite(estimates).all() and np.isfinite(stacked).all():
            # absurdly large scores overflowed a product: again on scores scaled by an exact 2^-600
            estimates = self._estimates(stacked * 2.0**-600, js, mapper) * 2.0**600
        result[:, self.order[js]] = estimates
        return result

    def _estimates(self, stacked: np.ndarray, js: list[int], mapper) -> np.ndarray:
        K, N, R = stacked.shape[0], self.N, self.R
        psi, den = self.tables()
        sums = {j: np.empty((K, int(self._spans[j]))) for j in js}
        scaled = np.zeros((K, self.segments * R))
        flat_den = den.reshape(-1)
        reversed_scores = stacked[:, ::-1]

        def block(start: int) -> None:
            """Segments ``start .. start + SEGMENTS``: their scaled scores, and every n's sums there."""
            stop = min(start + self.SEGMENTS, self.segments)
            lo, hi = start * R, min(stop * R, N)
            here = scaled[:, start * R : stop * R].reshape(K, -1, R)
            with np.errstate(over="ignore", invalid="ignore"):  # huge scores: found, and redone, in apply
                np.multiply(reversed_scores[:, lo:hi], flat_den[lo:hi], out=scaled[:, lo:hi])
                for j in js:
                    end = min(stop, int(self._spans[j]))
                    if end > start:
                        q, rho = divmod(int(self.sorted_ns[j]), R)
                        rows = psi[q + start : q + end, rho + 1 : rho + 1 + R]
                        np.vecdot(rows, here[:, : end - start], out=sums[j][:, start:end])

        for _ in mapper(self.carries, js):  # built once for N and n, then kept
            pass
        for _ in mapper(block, range(0, self.segments, self.SEGMENTS)):
            pass
        out = np.empty((K, len(js)))
        with np.errstate(over="ignore", invalid="ignore"):
            for i, j in enumerate(js):
                out[:, i] = sums[j] @ self.carries(j)
        return out * 2.0**-self.scale_exponent


def _scan_carries(N: int, n: int, spans: int) -> np.ndarray:
    """:meth:`ScanWeights.carries` of n (they depend on N and n alone), read-only."""
    scan = ScanWeights(N, np.array([n]))
    psi, den = scan.tables()  # kept or not as for the caller: the same N
    R = scan.R
    q, rho = divmod(n, R)
    rows = psi[q : q + spans]
    carry = np.empty(spans)
    carry[0] = 2.0**scan.scale_exponent * (n / (N + 1 - n))
    if spans > 1:
        # the ratio product of segment s: its numerators from psi, its denominators from den
        np.divide(rows[:-1, rho + R], rows[:-1, rho], out=carry[1:])
        carry[1:] *= den[: spans - 1, R - 1]
        np.cumprod(carry, out=carry)
    carry /= rows[:, rho]
    carry.flags.writeable = False
    return carry


_kept_scan_tables = functools.lru_cache(maxsize=1)(_scan_tables)
_kept_scan_carries = functools.lru_cache(maxsize=32)(_scan_carries)


def _segment_length(L: int) -> int:
    """The largest R (16 at most) whose tables stay within 2^+-450: psi spans ``2R L - log2((2R)!)`` bits."""
    for R in (32, 16, 8, 4, 2, 1):
        if 2 * R * L - _log2_factorial(2 * R) <= 2 * ScanWeights.TABLE_EXPONENT:
            return R
    return 1


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
