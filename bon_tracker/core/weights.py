"""Weights of the unbiased all-subsets best-of-n estimator.

For N samples sorted by proxy ascending (rank k = 1 is the worst), the probability
that rank k is the best of a uniformly random n-subset is

.. math:: w_k(n) = \\binom{k-1}{n-1} \\Big/ \\binom{N}{n}

The binomials themselves overflow a float near N = 1030, so they are never formed:
the weights are built from the top down with the ratio
``w_{k-1} = w_k (k-n)/(k-1)`` starting at ``w_N = n/N`` (a cumulative product of
exact ratios of small integers).
"""

from __future__ import annotations

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

    Small grids keep one dense ``(N, len(ns))`` matrix (one matrix product for all
    prompts); a huge N keeps only each n's non-negligible tail.
    """

    DENSE_LIMIT = 1 << 21  # N * len(ns) up to this: one dense matrix
    CHUNK = 1 << 15  # huge N: ranks per chunk of weights (256 KiB, stays in cache)

    def __init__(self, N: int, ns: np.ndarray):
        self.N = int(N)
        self.ns = np.asarray(ns, dtype=np.int64)
        self.dense = None
        if self.N * len(self.ns) <= self.DENSE_LIMIT:
            self.dense = np.zeros((self.N, len(self.ns)), order="F")  # Fortran order: BLAS's fast path
            for j, n in enumerate(self.ns):
                k0, tail = bon_weight_tail(self.N, int(n))
                self.dense[k0 - 1 :, j] = tail

    def apply(self, *sorted_scores: np.ndarray) -> list[np.ndarray]:
        """Each ``(P, N)`` matrix of scores sorted by proxy rank -> ``(P, len(ns))`` estimates."""
        if self.dense is not None:
            return [s @ self.dense for s in sorted_scores]
        # Huge N (one prompt with 10^6 samples): each n's weights are built from rank N
        # down in cache-sized chunks, continuing the same cumulative product across chunks
        # (bit for bit the weights of bon_weight_tail_desc), and applied to every matrix
        # as they are built; einsum stays on this thread, unlike a BLAS call.
        ranks_desc = np.arange(self.N, 0, -1, dtype=np.float64)
        ranks_below = ranks_desc - 1.0
        reversed_scores = [np.ascontiguousarray(s[:, ::-1]) for s in sorted_scores]
        outs = [np.empty((s.shape[0], len(self.ns))) for s in sorted_scores]
        buffer = np.empty(self.CHUNK + 1)
        for j, n in enumerate(self.ns):
            length = self.N - _lowest_nonzero_rank(self.N, int(n)) + 1
            carry = n / self.N  # the weight of rank N
            totals = [carry * s[:, 0] for s in reversed_scores]
            for start in range(1, length, self.CHUNK):
                stop = min(length, start + self.CHUNK)
                weights = buffer[: stop - start + 1]
                weights[0] = carry
                np.subtract(ranks_desc[start - 1 : stop - 1], n, out=weights[1:])
                np.divide(weights[1:], ranks_below[start - 1 : stop - 1], out=weights[1:])
                np.cumprod(weights, out=weights)
                for total, s in zip(totals, reversed_scores):
                    total += np.einsum("ij,j->i", s[:, start:stop], weights[1:])
                carry = weights[-1]
            for total, out in zip(totals, outs):
                out[:, j] = total
        return outs


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
