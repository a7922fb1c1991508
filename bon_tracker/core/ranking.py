"""Sorting samples by proxy, and the tie structure that the estimators share.

Best-of-n breaks ties in the proxy uniformly at random. Every member of a tied
group then has the same chance of being selected, so each member's score can be
replaced by the group mean: the all-subsets estimate is unchanged in expectation
over tie-breaks and becomes exact (and independent of the sort's tie order).
"""

from __future__ import annotations

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


def rank_scores(proxy: np.ndarray, score: np.ndarray) -> RankedScores:
    """Rank every row of a dense ``(P, N)`` pair by proxy; average scores within ties.

    Rows are sorted in blocks that fit in cache; the results land in full-size
    arrays so the weights are applied afterwards in one matrix product.
    """
    proxy, score = np.ascontiguousarray(proxy), np.ascontiguousarray(score)
    P, N = proxy.shape
    sorted_proxy = np.empty((P, N))
    sorted_score = np.empty((P, N))
    new_group = np.empty((P, N), dtype=bool)
    rows = max(1, BLOCK_SAMPLES // N)
    offsets = np.arange(0, rows * N, N, dtype=np.intp)[:, None]
    for start in range(0, P, rows):
        stop = min(P, start + rows)
        order = np.argsort(proxy[start:stop], axis=1)
        # Flat gathers are several times faster than take_along_axis; mode="clip" (the
        # indices are valid by construction) avoids take's buffered copy into `out`.
        order += offsets[: stop - start]
        block_proxy = sorted_proxy[start:stop]
        proxy[start:stop].ravel().take(order, out=block_proxy, mode="clip")
        score[start:stop].ravel().take(order, out=sorted_score[start:stop], mode="clip")
        block_new = new_group[start:stop]
        block_new[:, 0] = True
        np.not_equal(block_proxy[:, 1:], block_proxy[:, :-1], out=block_new[:, 1:])
    tied_rows = ~new_group.all(axis=1)
    if tied_rows.any():
        tied = np.flatnonzero(tied_rows)
        sorted_score[tied] = average_within_ties(sorted_score[tied], new_group[tied])
    return RankedScores(sorted_proxy, sorted_score, new_group, tied_rows)


def ranked_groups(proxy, score) -> list[tuple[np.ndarray, RankedScores]]:
    """Rank validated input: ``[(prompt indices, RankedScores)]``, one entry per distinct N
    (dense input has one)."""
    if isinstance(proxy, np.ndarray):
        return [(np.arange(proxy.shape[0]), rank_scores(proxy, score))]
    return [
        (idx, rank_scores(np.stack([proxy[i] for i in idx]), np.stack([score[i] for i in idx])))
        for idx in blocks_by_length(proxy).values()
    ]


def blocks_by_length(rows: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Indices of ragged rows grouped by length, so each group is one dense block."""
    lengths = np.array([len(r) for r in rows])
    return {int(N): np.flatnonzero(lengths == N) for N in np.unique(lengths) if N > 0}
