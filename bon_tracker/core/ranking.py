"""Sorting samples by proxy, and the tie structure that the estimators share.

Best-of-n breaks ties in the proxy uniformly at random. Every member of a tied
group then has the same chance of being selected, so each member's score can be
replaced by the group mean: the all-subsets estimate is unchanged in expectation
over tie-breaks and becomes exact (and independent of the sort's tie order).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

# Prompts are ranked in blocks of about this many samples (2 MiB per float64 array),
# so the gathers after the argsort work in cache instead of on fresh memory.
BLOCK_SAMPLES = 1 << 18


@dataclass(frozen=True)
class RankedScores:
    """Prompts with ``N`` samples each, sorted by proxy ascending (rank = column + 1)."""

    proxy: np.ndarray  # (rows, N) proxy, sorted ascending per row
    score: np.ndarray  # (rows, N) scores in the same order, tie-group means substituted
    new_group: np.ndarray  # (rows, N) bool: position starts a new proxy level
    tied_rows: np.ndarray  # (rows,) bool: the row has at least one tie in proxy

    @property
    def N(self) -> int:
        return self.proxy.shape[1]


def rank_by_proxy(proxy: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Sort each row of a C-contiguous block by proxy.

    Returns the sorted proxy, the scores in the same order, and ``new_group`` (True
    where a sorted position starts a new proxy level).
    """
    P, N = proxy.shape
    order = np.argsort(proxy, axis=1)
    # One flat gather per array is several times faster than take_along_axis.
    order += np.arange(0, P * N, N, dtype=order.dtype)[:, None]
    sorted_proxy = np.ascontiguousarray(proxy).ravel().take(order)
    sorted_scores = [np.ascontiguousarray(s).ravel().take(order) for s in scores]
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


def iter_ranked_blocks(proxy, score) -> Iterator[tuple[slice | np.ndarray, RankedScores]]:
    """Rank validated input block by block: yields ``(prompts, RankedScores)``.

    ``prompts`` is a slice (dense input) or an index array (ragged input, grouped by N)
    into the input's prompts. Each block holds about ``BLOCK_SAMPLES`` samples, sorted
    into buffers that are reused for the next block, so the sort, the gathers and the
    weights all work in cache: use a block before asking for the next one.
    """
    if isinstance(proxy, np.ndarray):
        yield from _blocks(np.ascontiguousarray(proxy), np.ascontiguousarray(score), None)
        return
    for idx in blocks_by_length(proxy).values():
        yield from _blocks(np.stack([proxy[i] for i in idx]), np.stack([score[i] for i in idx]), idx)


def _blocks(proxy: np.ndarray, score: np.ndarray, index: np.ndarray | None):
    P, N = proxy.shape
    # One row of a huge N is already a block; then take every row at once, so that the
    # weights (the costly part at that size) are built once for all prompts.
    rows = P if N > BLOCK_SAMPLES else max(1, BLOCK_SAMPLES // N)
    rows = min(rows, P)
    sorted_proxy = np.empty((rows, N))
    sorted_score = np.empty((rows, N))
    new_group = np.empty((rows, N), dtype=bool)
    offsets = np.arange(0, rows * N, N, dtype=np.intp)[:, None]
    for start in range(0, P, rows):
        stop = min(P, start + rows)
        m = stop - start
        order = np.argsort(proxy[start:stop], axis=1)
        # Flat gathers are several times faster than take_along_axis; mode="clip" (the
        # indices are valid by construction) avoids take's buffered copy into `out`.
        order += offsets[:m]
        block_proxy, block_score, block_new = sorted_proxy[:m], sorted_score[:m], new_group[:m]
        proxy[start:stop].ravel().take(order, out=block_proxy, mode="clip")
        score[start:stop].ravel().take(order, out=block_score, mode="clip")
        block_new[:, 0] = True
        np.not_equal(block_proxy[:, 1:], block_proxy[:, :-1], out=block_new[:, 1:])
        tied_rows = ~block_new.all(axis=1)
        if tied_rows.any():
            tied = np.flatnonzero(tied_rows)
            block_score[tied] = average_within_ties(block_score[tied], block_new[tied])
        prompts = slice(start, stop) if index is None else index[start:stop]
        yield prompts, RankedScores(block_proxy, block_score, block_new, tied_rows)


def blocks_by_length(rows: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Indices of ragged rows grouped by length, so each group is one dense block."""
    lengths = np.array([len(r) for r in rows])
    return {int(N): np.flatnonzero(lengths == N) for N in np.unique(lengths) if N > 0}
