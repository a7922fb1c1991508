"""Sorting samples by proxy, and the tie structure that the estimators share.

Best-of-n breaks ties in the proxy uniformly at random. Every member of a tied
group then has the same chance of being selected, so each member's score can be
replaced by the group mean: the all-subsets estimate is unchanged in expectation
over tie-breaks and becomes exact (and independent of the sort's tie order).

The sort itself never runs ``np.argsort``: each proxy's low mantissa bits are
replaced by its column index (for short rows: its index in the whole block), a
*packed key* that is still a float of nearly the same value; the keys are sorted with
``np.sort`` (several times faster than an argsort) and the index is read back from the
sorted keys. Truncating a float's low bits is monotone, so the keys come out in proxy
order except among proxies that agree in all but those bits; the gathered proxies are
checked to be non-decreasing and any such bucket is re-sorted exactly, so the order is
always exact.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Prompts are ranked in blocks of about this many samples (4 MiB per float64 array), each block
# one work item for the threads. Not smaller: every numpy call of a block hands the GIL to the
# other threads and back (measured on two threads: blocks of 2^16 samples 1.2 to 1.5 times slower
# than 2^17, 2^18 another 2 to 10% faster at 10^4 x 256 and 10^5 x 8 or 64, and 2^19 another 5 to
# 15% at 10^4 x 64 and 256); on one thread a block is sorted in cache-sized chunks (CHUNK_SAMPLES).
BLOCK_SAMPLES = 1 << 19
# Rows of at most this many samples get their per-position index arrays in full (see BlockRanker).
SHORT_ROW = 256
# On one thread a block is sorted and gathered in chunks of about this many samples (256 KiB per
# float64 array): a chunk's keys, proxies, scores and sorted copies stay in the core's cache from
# one pass to the next (measured 5 to 10% faster over a whole call at N = 64 to 256).
CHUNK_SAMPLES = 1 << 15


class NonFiniteInput(Exception):
    """A block held NaN or inf: the caller validates the input in full instead."""


@dataclass(frozen=True)
class RankedScores:
    """Prompts with ``N`` samples each, sorted by proxy ascending (rank = column + 1)."""

    proxy: np.ndarray  # (rows, N) proxy, sorted ascending per row
    score: np.ndarray  # (rows, N) scores in the same order, tie-group means substituted
    tied: np.ndarray  # indices of the rows with at least one tie in proxy
    new_group: np.ndarray  # (len(tied), N) bool: position starts a new proxy level (tied rows only)
    stacked: np.ndarray  # (2 rows, N): ``score`` rows then ``proxy`` rows, one matrix for the weights

    @property
    def N(self) -> int:
        return self.proxy.shape[1]

    @property
    def tied_rows(self) -> np.ndarray:
        """(rows,) bool: the row has at least one tie in proxy."""
        out = np.zeros(self.proxy.shape[0], dtype=bool)
        out[self.tied] = True
        return out


def index_bits(N: int) -> int:
    """Low mantissa bits that hold a column index ``0 .. N-1``."""
    return max(1, (int(N) - 1).bit_length())


class BlockRanker:
    """Sorts blocks of up to ``rows`` prompts with ``N`` samples each; buffers are reused.

    One ranker per thread: :meth:`rank` returns views of its buffers, valid until the
    next call.
    """

    def __init__(self, rows: int, N: int):
        if index_bits(N) > 52:
            raise ValueError(f"N = {N} samples per prompt is more than a float's mantissa can index")
        self.rows, self.N = int(rows), int(N)
        self.keys = np.empty((self.rows, self.N), dtype=np.float64)
        if self.N <= SHORT_ROW:
            # Short rows: a key holds its sample's index in the whole block, so one pass reads
            # the flat order back (broadcasting a column index and a row start along rows this
            # short runs an inner loop per row, several times slower than one loop over the block).
            self.bits = index_bits(self.rows * self.N)
            self.index = np.arange(self.rows * self.N, dtype=np.int64).reshape(self.rows, self.N)
            self.offsets = None
        else:
            self.bits = index_bits(N)
            self.index = np.arange(self.N, dtype=np.int64)  # the column, broadcast along each row
            self.offsets = np.arange(0, self.rows * self.N, self.N, dtype=np.int64)[:, None]
        self.mask = np.int64((1 << self.bits) - 1)
        self.steps_down = np.empty((self.rows, self.N), dtype=bool)
        self.stacked = np.empty((2 * self.rows, self.N), dtype=np.float64)
        self._spares: list[np.ndarray] = []  # stacked buffers lent out and given back (see lend_stacked)
        self._products: np.ndarray | None = None  # see product_buffer

    def product_buffer(self, n_cols: int, rows: int) -> np.ndarray:
        """A C-contiguous ``(n_cols, rows)`` float64 buffer for the weight product of one block,
        kept with the ranker (valid until the next call, as the ranked arrays).

        A fresh array of this size costs a page fault per 4 KiB on every block (the allocator hands
        freed memory of this size back to the system), about 1 us each here: for short rows, as
        long as the weight product itself.
        """
        size = n_cols * rows
        if self._products is None or self._products.size < size:
            self._products = np.empty(size)
        return self._products[:size].reshape(n_cols, rows)

    def lend_stacked(self) -> np.ndarray:
        """Hand over the stacked buffer of the last block (its sorted rows stay as they are: the
        ranker never writes it again) and rank the next blocks into a spare one, given back by an
        earlier borrower (:meth:`give_back`, from any thread), else a fresh one."""
        lent = self.stacked
        self.stacked = self._spares.pop() if self._spares else np.empty_like(lent)
        return lent

    def give_back(self, buffer: np.ndarray) -> None:
        """Take back a buffer :meth:`lend_stacked` handed over (its borrower is done with it)."""
        if buffer.shape == self.stacked.shape and len(self._spares) < 2:
            self._spares.append(buffer)  # one append (atomic): the owning thread may pop meanwhile

    def order(self, proxy: np.ndarray, *, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``(flat order, sorted proxy)`` of a C-contiguous ``(m, N)`` block, ``m <= rows``.

        ``flat order`` indexes ``proxy.ravel()``; the sorted proxy is written to the
        lower half of the stacked buffer. Raises :class:`NonFiniteInput` on a non-finite proxy,
        except (``check`` False) an infinite one that the sort left in place, which the caller
        must then find in the sorted proxy.
        """
        m = proxy.shape[0]
        for rows in self._chunks(m):
            self._sort_rows(proxy, m, rows, check)
        return self.keys[:m].view(np.int64), self.stacked[m : 2 * m]

    def _chunks(self, m: int) -> list[slice]:
        """The block's rows in chunks of about ``CHUNK_SAMPLES`` samples."""
        step = max(1, CHUNK_SAMPLES // self.N)
        return [slice(start, min(m, start + step)) for start in range(0, m, step)]

    def _sort_rows(self, proxy: np.ndarray, m: int, rows: slice, check: bool) -> None:
        """Sort the chunk ``rows`` of a block of ``m`` prompts: its flat order into the key buffer
        (indices into the whole block), its sorted proxy into the stacked buffer."""
        bits = self.keys[rows].view(np.int64)
        np.bitwise_and(proxy[rows].view(np.int64), ~self.mask, out=bits)
        np.bitwise_or(bits, self.index if self.offsets is not None else self.index[rows], out=bits)
        keys = self.keys[rows]
        keys.sort(axis=1)
        # Checked always: NaN or inf proxies (inf gains a NaN payload) are sorted last, and the
        # sort may not keep a NaN's payload (the index), so no order could be read back.
        if np.isnan(keys[:, -1]).any():
            raise NonFiniteInput
        np.bitwise_and(bits, self.mask, out=bits)
        if self.offsets is not None:
            np.add(bits, self.offsets[rows], out=bits)
        sorted_proxy = self.stacked[m + rows.start : m + rows.stop]
        proxy.ravel().take(bits, out=sorted_proxy, mode="clip")
        if check and not (np.isfinite(sorted_proxy[:, 0]).all() and np.isfinite(sorted_proxy[:, -1]).all()):
            raise NonFiniteInput  # -inf and inf with index 0 keep their value

    def rank(
        self,
        proxy: np.ndarray,
        score: np.ndarray,
        *,
        check_finite: bool = True,
        checked_after: bool = False,
        chunked: bool = True,
    ) -> RankedScores:
        """Sort one block by proxy and gather the scores in that order.

        ``check_finite``: raise :class:`NonFiniteInput` on a non-finite score. ``checked_after``:
        the caller checks the block's estimates at n = 1 of both the score and the proxy instead
        (each the mean of a whole row, non-finite whenever a value in the row is, or their sum
        overflows), so no pass here checks the score, nor the proxy beyond what the order needs.
        ``chunked``: in chunks of ``CHUNK_SAMPLES`` (faster on one thread; with several, each
        numpy call hands the GIL over, and the chunks' extra calls measured slower). The values
        are the same either way.
        """
        m = proxy.shape[0]
        order = self.keys[:m].view(np.int64)
        sorted_proxy, sorted_score = self.stacked[m : 2 * m], self.stacked[:m]
        # One comparison finds both ties and misordered buckets; continuous proxies have neither.
        # steps_down[r, c]: sorted position c + 1 <= position c, over the chunk as one flat run
        # (fast for short rows too); the last column compares across rows and is cleared.
        steps_down = self.steps_down[:m]
        # Chunk by chunk (each pass over a chunk finds it in cache): sort, gather, compare.
        chunks = self._chunks(m) if chunked else [slice(0, m)]
        in_chunks = len(chunks) > 1  # else the scores are gathered once, after any fix below
        for rows in chunks:
            self._sort_rows(proxy, m, rows, not checked_after)
            if in_chunks:
                score.ravel().take(order[rows], out=sorted_score[rows], mode="clip")
            flat = sorted_proxy[rows].reshape(-1)
            np.less_equal(flat[1:], flat[:-1], out=steps_down[rows].reshape(-1)[:-1])
        steps_down[:, -1] = False
        tied = np.empty(0, dtype=np.intp)
        new_group = np.empty((0, self.N), dtype=bool)
        if steps_down.any():
            rows = np.flatnonzero(steps_down.any(axis=1))
            # The suspect rows (a view when every row is one: one huge prompt, no copies of it).
            suspect = sorted_proxy if len(rows) == m else sorted_proxy[rows]
            misordered = rows[np.less(suspect[:, 1:], suspect[:, :-1]).any(axis=1)]
            for row in misordered:
                _fix_buckets(order[row], sorted_proxy[row], self.bits)
                if in_chunks:  # gathered already: again, in the fixed order
                    score.ravel().take(order[row], out=sorted_score[row], mode="clip")
            if len(misordered) and len(rows) < m:
                suspect = sorted_proxy[rows]  # as fixed
            new_group = np.empty((len(rows), self.N), dtype=bool)
            new_group[:, 0] = True
            np.not_equal(suspect[:, 1:], suspect[:, :-1], out=new_group[:, 1:])
            has_tie = ~new_group.all(axis=1)
            tied, new_group = rows[has_tie], new_group[has_tie]
        if not in_chunks:
            score.ravel().take(order, out=sorted_score, mode="clip")
        if check_finite and not checked_after and not np.isfinite(np.add.reduce(sorted_score, axis=None)):
            raise NonFiniteInput  # a non-finite score, or finite ones whose sum overflows
        if len(tied):
            sorted_score[tied] = average_within_ties(sorted_score[tied], new_group)
        return RankedScores(sorted_proxy, sorted_score, tied, new_group, self.stacked[: 2 * m])


# A thread keeps its last ranker when it holds at most this many samples per buffer: a call
# on a few thousand samples would otherwise spend as long on fresh buffers (allocation, page
# faults, the index arrays) as on its sort. About 17 MiB per thread (a whole block's buffers).
KEPT_SAMPLES = BLOCK_SAMPLES
_kept = threading.local()


def thread_ranker(rows: int, N: int) -> BlockRanker:
    """A :class:`BlockRanker` for blocks of up to ``rows`` prompts with ``N`` samples, reused by
    this thread's later calls of the same ``N`` when small. Its results are views of its buffers,
    valid until this thread ranks its next block (as for any ranker)."""
    ranker = getattr(_kept, "ranker", None)
    if ranker is not None and ranker.N == N and ranker.rows >= rows:
        return ranker
    ranker = BlockRanker(rows, N)
    if rows * N <= KEPT_SAMPLES:
        _kept.ranker = ranker
    return ranker


def _fix_buckets(order: np.ndarray, sorted_proxy: np.ndarray, bits: int) -> None:
    """Re-sort, exactly, the buckets of one row whose packed keys collided (in place)."""
    keep_high = np.int64(~((1 << bits) - 1))
    # The value each position's packed key had before its index was packed in; its
    # buckets are contiguous because truncation is monotone.
    bucket = np.bitwise_and(sorted_proxy.view(np.int64), keep_high).view(np.float64)
    done_until = -1
    for at in np.flatnonzero(sorted_proxy[1:] < sorted_proxy[:-1]).tolist():
        if at < done_until:
            continue
        lo = int(np.searchsorted(bucket, bucket[at], side="left"))
        hi = int(np.searchsorted(bucket, bucket[at], side="right"))
        segment = slice(lo, hi)
        fix = np.argsort(sorted_proxy[segment], kind="stable")
        order[segment] = order[segment][fix]
        sorted_proxy[segment] = sorted_proxy[segment][fix]
        done_until = hi


def rank_by_proxy(proxy: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Sort each row of a finite ``(P, N)`` block by proxy.

    Returns the sorted proxy, the scores in the same order (not tie-averaged), and
    ``new_group`` (True where a sorted position starts a new proxy level).
    """
    proxy = np.ascontiguousarray(proxy, dtype=np.float64)
    P, N = proxy.shape
    ranker = BlockRanker(P, N)
    order, sorted_proxy = ranker.order(proxy)
    bad = np.flatnonzero(np.less(sorted_proxy[:, 1:], sorted_proxy[:, :-1]).any(axis=1))
    for row in bad:
        _fix_buckets(order[row], sorted_proxy[row], ranker.bits)
    sorted_proxy = sorted_proxy.copy()
    sorted_scores = [np.ascontiguousarray(s, dtype=np.float64).ravel().take(order) for s in scores]
    new_group = np.empty(sorted_proxy.shape, dtype=bool)
    new_group[:, 0] = True
    np.not_equal(sorted_proxy[:, 1:], sorted_proxy[:, :-1], out=new_group[:, 1:])
    return sorted_proxy, sorted_scores, new_group


def average_within_ties(sorted_values: np.ndarray, new_group: np.ndarray) -> np.ndarray:
    """Replace each value by the mean of its proxy-tie group (rows sorted by proxy)."""
    group_id = np.cumsum(new_group.ravel()) - 1  # row starts are always new groups
    sums = np.bincount(group_id, weights=sorted_values.ravel())
    counts = np.bincount(group_id)
    return (sums / counts)[group_id].reshape(sorted_values.shape)


def block_rows(N: int) -> int:
    """Prompts per block for ``N`` samples each: about ``BLOCK_SAMPLES`` samples, at least one."""
    return max(1, BLOCK_SAMPLES // max(1, int(N)))


def dense_blocks(P: int, N: int) -> list[slice]:
    """The blocks of a dense ``(P, N)`` input, of at most ``block_rows(N)`` prompts and as even as
    possible (so that threads share the work evenly): they depend on the shape only.

    More than one block: an even number of them (three blocks on two threads leave one thread
    idle for a third of the call; four smaller ones keep both busy)."""
    count = -(-P // block_rows(N))
    if count > 1 and count % 2:
        count = min(P, count + 1)
    rows = -(-P // max(1, count))
    return [slice(start, min(P, start + rows)) for start in range(0, P, rows)]


def iter_ranked_blocks(proxy, score) -> Iterator[tuple[slice | np.ndarray, RankedScores]]:
    """Rank validated input block by block: yields ``(prompts, RankedScores)``.

    ``prompts`` is a slice (dense input) or an index array (ragged input, grouped by
    N) into the input's prompts. The ranked arrays are views of buffers reused for
    the next block: use a block before asking for the next one.
    """
    if isinstance(proxy, np.ndarray):
        groups = [(None, np.ascontiguousarray(proxy), np.ascontiguousarray(score))]
    else:
        groups = [
            (idx, np.stack([proxy[i] for i in idx]), np.stack([score[i] for i in idx]))
            for idx in blocks_by_length(proxy).values()
        ]
    for index, p, s in groups:
        P, N = p.shape
        ranker = BlockRanker(block_rows(N), N)
        for rows in dense_blocks(P, N):
            ranked = ranker.rank(p[rows], s[rows], check_finite=False)
            yield (rows if index is None else index[rows]), ranked


def blocks_by_length(rows: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Indices of ragged rows grouped by length, so each group is one dense block."""
    lengths = np.array([len(r) for r in rows])
    return {int(N): np.flatnonzero(lengths == N) for N in np.unique(lengths) if N > 0}
