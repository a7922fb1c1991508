"""Sorting samples by proxy once, and the tie structure that the estimators share.

Best-of-n breaks ties in the proxy uniformly at random. Every member of a tied
group then has the same chance of being selected, so each member's score can be
replaced by the group mean: the all-subsets estimate is unchanged in expectation
over tie-breaks and becomes exact (and independent of the sort's tie order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankedScores:
    """``P`` prompts with ``N`` samples each, sorted by proxy ascending (rank = column + 1)."""

    proxy: np.ndarray  # (P, N) proxy, sorted ascending per row
    score: np.ndarray  # (P, N) scores in the same order, tie-group means substituted
    tied_rows: np.ndarray  # (P,) bool: the row has at least one tie in proxy

    @property
    def N(self) -> int:
        return self.proxy.shape[1]


def rank_by_proxy(proxy: np.ndarray, *scores: np.ndarray) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Sort each row by proxy; return sorted proxy, sorted scores, and the new-group mask.

    ``new_group[p, j]`` is True where sorted position j starts a new proxy level.
    """
    order = np.argsort(proxy, axis=1)
    sorted_proxy = np.take_along_axis(proxy, order, axis=1)
    sorted_scores = [np.take_along_axis(s, order, axis=1) for s in scores]
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
    """Rank a dense ``(P, N)`` block and average scores within proxy ties."""
    sorted_proxy, (sorted_score,), new_group = rank_by_proxy(proxy, score)
    tied_rows = ~new_group.all(axis=1)
    if tied_rows.any():
        rows = np.flatnonzero(tied_rows)
        sorted_score = sorted_score.copy()
        sorted_score[rows] = average_within_ties(sorted_score[rows], new_group[rows])
    return RankedScores(sorted_proxy, sorted_score, tied_rows)


def blocks_by_length(rows: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Indices of ragged rows grouped by length, so each group is one dense block."""
    lengths = np.array([len(r) for r in rows])
    return {int(N): np.flatnonzero(lengths == N) for N in np.unique(lengths) if N > 0}
