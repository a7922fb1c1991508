"""Sufficient statistics of a best-of-n curve: one ``update``, one ``merge``, one ``compute``.

Per-prompt estimates are independent, so a curve's means and standard errors follow
exactly from per-n sums over prompts: the count, the mean and the sum of squared
deviations (merged by Chan, Golub & LeVeque 1979), and the sum of the prompts' KL.
:func:`bon_curve` computes them block by block and merges the blocks in order; the
streaming analyzer and distributed workers use the same three functions, so every
path shares one implementation of the mathematics. :func:`merge_curve_stats` is
associative (up to float rounding) and has :func:`empty_curve_stats` as identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurveStats:
    """Per-n sums over prompts. Every array has one entry per n of ``n`` (ascending)."""

    n: np.ndarray  # int64, ascending
    count: np.ndarray  # prompts with at least n samples
    true_mean: np.ndarray
    true_m2: np.ndarray  # sum of squared deviations from true_mean
    proxy_mean: np.ndarray
    proxy_m2: np.ndarray
    kl_sum: np.ndarray  # sum over those prompts of their KL
    N: int = 0  # largest number of samples per prompt
    has_ties: bool = False  # some prompt reaching some n has tied proxies
    n_samples: int = 0  # samples of every prompt counted
    n_prompts: int = 0  # prompts counted (also those below every n of the grid)


def empty_curve_stats(n: Sequence[int] | np.ndarray = ()) -> CurveStats:
    """Statistics of no prompts: the identity of :func:`merge_curve_stats`."""
    n_arr = np.asarray(n, dtype=np.int64)
    zeros = np.zeros(len(n_arr))
    return CurveStats(n_arr, np.zeros(len(n_arr), dtype=np.int64), zeros, zeros, zeros, zeros, zeros)


def curve_stats_update(
    n: np.ndarray,
    true: np.ndarray,
    proxy: np.ndarray,
    kl: np.ndarray,
    *,
    N: int,
    has_ties: bool,
    n_samples: int = 0,
    n_prompts: int | None = None,
) -> CurveStats:
    """Statistics of one batch of per-prompt estimates.

    Args:
        n: the grid (ascending).
        true, proxy, kl: ``(P, len(n))`` per-prompt estimates; NaN where a prompt has fewer than n samples.
        N: the largest number of samples of these prompts.
        has_ties: whether a prompt reaching some n has tied proxies.

    Example:
        >>> import numpy as np
        >>> s = curve_stats_update(np.array([1]), np.array([[1.0], [3.0]]), np.zeros((2, 1)), np.zeros((2, 1)),
        ...                        N=1, has_ties=False)
        >>> s.count.tolist(), s.true_mean.tolist(), s.true_m2.tolist()
        ([2], [2.0], [2.0])
    """
    n = np.asarray(n, dtype=np.int64)
    true, proxy, kl = (np.asarray(a, dtype=np.float64).reshape(-1, len(n)) for a in (true, proxy, kl))
    present = ~np.isnan(true)
    count = present.sum(axis=0)
    if present.all():
        true_mean, proxy_mean = true.mean(axis=0), proxy.mean(axis=0)
        true_m2 = ((true - true_mean) ** 2).sum(axis=0)
        proxy_m2 = ((proxy - proxy_mean) ** 2).sum(axis=0)
        kl_sum = kl.sum(axis=0)
    else:
        safe = np.maximum(count, 1)
        true_mean = np.where(present, true, 0.0).sum(axis=0) / safe
        proxy_mean = np.where(present, proxy, 0.0).sum(axis=0) / safe
        true_m2 = np.where(present, (true - true_mean) ** 2, 0.0).sum(axis=0)
        proxy_m2 = np.where(present, (proxy - proxy_mean) ** 2, 0.0).sum(axis=0)
        kl_sum = np.where(present, kl, 0.0).sum(axis=0)
    return CurveStats(
        n=n,
        count=count.astype(np.int64),
        true_mean=true_mean,
        true_m2=true_m2,
        proxy_mean=proxy_mean,
        proxy_m2=proxy_m2,
        kl_sum=kl_sum,
        N=int(N),
        has_ties=bool(has_ties),
        n_samples=int(n_samples),
        n_prompts=int(true.shape[0] if n_prompts is None else n_prompts),
    )


def kl_formula(n: np.ndarray) -> np.ndarray:
    """:func:`~bon_tracker.core.kl.kl_bon` (``log n - (n - 1)/n``, the same floats) for a grid already
    checked, without its checks: a small call computes it twice, and the checks cost more than it."""
    n = np.asarray(n, dtype=np.float64)
    return np.log(n) - (n - 1.0) / n


def curve_stats_by_n(
    n: np.ndarray,
    estimates: np.ndarray,
    kl_sum: np.ndarray,
    *,
    N: int,
    has_ties: bool,
    n_samples: int,
    overwrite: bool = False,
) -> CurveStats:
    """:func:`curve_stats_update` for a block whose prompts all reach every n, laid out one row per n.

    ``estimates``: ``(len(n), 2, P)``, the true score's estimates then the proxy's, each row
    contiguous (every reduction runs along contiguous memory, several times faster than down
    the columns of ``(P, len(n))`` for a short grid); ``kl_sum``: the sum of the prompts' KL per n.
    ``overwrite``: the deviations may be computed in ``estimates`` itself (no temporary as large).
    """
    P = estimates.shape[2]
    means = np.add.reduce(estimates, axis=2) / P
    deviations = np.subtract(estimates, means[:, :, None], out=estimates if overwrite else None)
    np.square(deviations, out=deviations)
    m2 = np.add.reduce(deviations, axis=2)
    return CurveStats(
        n=np.asarray(n, dtype=np.int64),
        count=np.full(len(n), P, dtype=np.int64),
        true_mean=means[:, 0],
        true_m2=m2[:, 0],
        proxy_mean=means[:, 1],
        proxy_m2=m2[:, 1],
        kl_sum=np.asarray(kl_sum, dtype=np.float64),
        N=int(N),
        has_ties=bool(has_ties),
        n_samples=int(n_samples),
        n_prompts=P,
    )


def _on_grid(stats: CurveStats, grid: np.ndarray) -> tuple[np.ndarray, ...]:
    """The statistics on a larger grid; an n the statistics lack has no prompts."""
    at = np.searchsorted(grid, stats.n)
    out = []
    for values in (stats.count, stats.true_mean, stats.true_m2, stats.proxy_mean, stats.proxy_m2, stats.kl_sum):
        full = np.zeros(len(grid), dtype=values.dtype)
        full[at] = values
        out.append(full)
    return tuple(out)


def merge_curve_stats(a: CurveStats, b: CurveStats) -> CurveStats:
    """The statistics of the prompts of ``a`` and ``b`` together (Chan et al. 1979).

    Grids are merged as a union: an n missing from one side counts no prompts there
    (its prompts have fewer samples than n, as when each side's grid is the default
    grid or a user grid cut at that side's largest N).
    """
    if len(a.n) == len(b.n) and np.array_equal(a.n, b.n):  # the usual case: blocks of one call
        grid = a.n
        ca, ma, qa, pa, ra, ka = a.count, a.true_mean, a.true_m2, a.proxy_mean, a.proxy_m2, a.kl_sum
        cb, mb, qb, pb, rb, kb = b.count, b.true_mean, b.true_m2, b.proxy_mean, b.proxy_m2, b.kl_sum
    else:
        grid = np.union1d(a.n, b.n).astype(np.int64)
        ca, ma, qa, pa, ra, ka = _on_grid(a, grid)
        cb, mb, qb, pb, rb, kb = _on_grid(b, grid)
    total = ca + cb
    safe = np.maximum(total, 1)
    wb = cb / safe
    d_true, d_proxy = mb - ma, pb - pa
    cross = ca * wb  # n_a n_b / (n_a + n_b)
    return CurveStats(
        n=grid,
        count=total,
        true_mean=ma + d_true * wb,
        true_m2=qa + qb + d_true * d_true * cross,
        proxy_mean=pa + d_proxy * wb,
        proxy_m2=ra + rb + d_proxy * d_proxy * cross,
        kl_sum=ka + kb,
        N=max(a.N, b.N),
        has_ties=a.has_ties or b.has_ties,
        n_samples=a.n_samples + b.n_samples,
        n_prompts=a.n_prompts + b.n_prompts,
    )


def curve_stats_compute(stats: CurveStats, ns: np.ndarray | None = None, *, kl_mode: str = "auto"):
    """Means, standard errors and KL per n: a :class:`~bon_tracker.core.curve.BonCurve`.

    Args:
        stats: merged statistics.
        ns: the grid to report (each n must be in ``stats.n``); default all of ``stats.n``.
        kl_mode: ``"continuous"`` reports the formula as ``kl`` even where ties exist.
    """
    from bon_tracker.core.curve import BonCurve

    grid = stats.n if ns is None else np.asarray(ns, dtype=np.int64)
    if len(grid) == len(stats.n) and np.array_equal(grid, stats.n):
        at: slice | np.ndarray = slice(None)  # the usual case: the grid of the statistics
    else:
        at = np.searchsorted(stats.n, grid)
        if np.any(at >= len(stats.n)) or np.any(stats.n[np.minimum(at, len(stats.n) - 1)] != grid):
            missing = sorted(set(grid.tolist()) - set(stats.n.tolist()))
            raise ValueError(f"the statistics hold no n = {missing}")
    count = stats.count[at]
    every_n_has_two = bool(count.min() >= 2) if len(count) else False

    def se(m2: np.ndarray) -> np.ndarray:
        if every_n_has_two:
            return np.sqrt(m2[at] / (count - 1)) / np.sqrt(count)
        out = np.full(len(count), np.nan)
        enough = count >= 2
        out[enough] = np.sqrt(m2[at][enough] / (count[enough] - 1)) / np.sqrt(count[enough])
        return out

    def mean(values: np.ndarray) -> np.ndarray:
        return values[at].copy() if every_n_has_two else np.where(count > 0, values[at], np.nan)

    bound = kl_formula(grid)
    if (stats.has_ties and kl_mode != "continuous") or kl_mode == "discrete":  # discrete: atoms even untied
        kl = np.where(count > 0, stats.kl_sum[at] / np.maximum(count, 1), np.nan)
    else:
        kl = bound.copy() if every_n_has_two else np.where(count > 0, bound, np.nan)
    return BonCurve(
        n=grid,
        kl=kl,
        kl_bound=bound,
        true_mean=mean(stats.true_mean),
        true_se=se(stats.true_m2),
        proxy_mean=mean(stats.proxy_mean),
        proxy_se=se(stats.proxy_m2),
        n_prompts=count.astype(np.int64),
        N=int(stats.N),
        has_ties=bool(stats.has_ties),
    )


DEFAULT_CHUNK_SAMPLES = 1 << 18


class CurveAccumulator:
    """One eval step's best-of-n curve, built from prompts added a few at a time.

    Completed prompts are buffered until they hold ``chunk_samples`` samples, reduced
    to :class:`CurveStats` by the same code as :func:`~bon_tracker.bon_curve`, and
    merged (:func:`merge_curve_stats`); :meth:`curve` equals ``bon_curve`` on all the
    prompts at once up to float rounding. :attr:`stats` can be merged with another
    accumulator's (a distributed worker's) statistics.

    Args:
        ns: the grid of n; default (None) as :func:`~bon_tracker.bon_curve`: powers
            of two up to the largest number of samples per prompt, plus that number.
        chunk_samples: samples buffered before they are reduced (bounds memory).
        kl_mode: as :func:`~bon_tracker.bon_curve`.

    Example:
        >>> import numpy as np
        >>> from bon_tracker import bon_curve
        >>> rng = np.random.default_rng(0)
        >>> proxy, true = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
        >>> acc = CurveAccumulator(chunk_samples=16)
        >>> for p, t in zip(proxy, true):
        ...     acc.add_prompt(p, t)
        >>> bool(np.allclose(acc.curve().true_se, bon_curve(proxy, true).true_se))
        True
    """

    def __init__(
        self, ns: Sequence[int] | None = None, *, chunk_samples: int = DEFAULT_CHUNK_SAMPLES, kl_mode: str = "auto"
    ):
        self.ns = None if ns is None else [int(n) for n in ns]
        if self.ns is not None and (not self.ns or min(self.ns) < 1):
            raise ValueError(f"ns must be a non-empty list of integers >= 1, got {ns!r}")
        self.chunk_samples = int(chunk_samples)
        self.kl_mode = kl_mode
        self._pending_proxy: list[np.ndarray] = []
        self._pending_true: list[np.ndarray] = []
        self._pending_samples = 0
        self._stats = empty_curve_stats()

    @property
    def stats(self) -> CurveStats:
        """The statistics of every prompt added so far (mergeable)."""
        self._flush()
        return self._stats

    @property
    def N(self) -> int:
        return max([self._stats.N] + [p.shape[-1] for p in self._pending_proxy])

    @property
    def n_prompts(self) -> int:
        return self._stats.n_prompts + sum(1 if p.ndim == 1 else p.shape[0] for p in self._pending_proxy)

    @property
    def n_samples(self) -> int:
        return self._stats.n_samples + self._pending_samples

    @property
    def has_ties(self) -> bool:
        return self.stats.has_ties

    def add_prompt(self, proxy: np.ndarray, true: np.ndarray) -> None:
        """Add one prompt's samples (1-D float arrays of equal length, finite)."""
        if len(proxy) == 0:
            return
        self._pending_proxy.append(proxy)
        self._pending_true.append(true)
        self._pending_samples += len(proxy)
        if self._pending_samples >= self.chunk_samples:
            self._flush()

    def add_prompts(self, proxy: np.ndarray, true: np.ndarray) -> None:
        """Add prompts with equal numbers of samples at once: ``(prompts, N)`` float arrays, finite.

        The same as :meth:`add_prompt` for each row (up to float rounding), without Python
        work per prompt.
        """
        if proxy.shape[0] == 0 or proxy.shape[1] == 0:
            return
        self._pending_proxy.append(proxy)
        self._pending_true.append(true)
        self._pending_samples += proxy.size
        if self._pending_samples >= self.chunk_samples:
            self._flush()

    def merge(self, stats: CurveStats) -> None:
        """Add another accumulator's (or worker's) statistics."""
        self._stats = merge_curve_stats(self.stats, stats)

    def curve(self):
        """The curve over every prompt added so far."""
        stats = self.stats
        if stats.n_prompts == 0:
            raise ValueError("no samples: every row was empty or dropped")
        if self.ns is None:
            from bon_tracker.core.curve import default_ns

            n_arr = default_ns(stats.N)
        else:
            too_big = sorted({n for n in self.ns if n > stats.N})
            if too_big:
                raise ValueError(
                    f"ns {too_big} exceed the largest number of samples per prompt ({stats.N}); "
                    "lower them or sample more completions"
                )
            n_arr = np.asarray(self.ns, dtype=np.int64)
        return curve_stats_compute(stats, n_arr, kl_mode=self.kl_mode)

    def _flush(self) -> None:
        if not self._pending_proxy:
            return
        part, _ = self._reduce()
        self._pending_proxy, self._pending_true, self._pending_samples = [], [], 0
        self._stats = merge_curve_stats(self._stats, part)

    def _reduce(self, keep: bool = False) -> tuple[CurveStats, tuple | None]:
        """The statistics of the pending prompts (left pending), from one sort of them; with ``keep``
        also their per-prompt estimates ``(largest N, prompts, grid, true, proxy)``, ``(P, len(grid))``
        each (None, None when they reach no n of the grid)."""
        return self._reduce_chunk(self._pending_proxy, self._pending_true, self._pending_samples, keep)

    def _reduce_chunk(
        self, pending_proxy: list[np.ndarray], pending_true: list[np.ndarray], pending_samples: int, keep: bool
    ) -> tuple[CurveStats, tuple | None]:
        """:meth:`_reduce` of the prompts given (a chunk taken from the pending ones)."""
        from bon_tracker.core.curve import default_ns, rank_and_estimate

        lengths = {p.shape[-1] for p in pending_proxy}
        prompts = sum(1 if p.ndim == 1 else p.shape[0] for p in pending_proxy)
        largest = max(lengths)
        if self.ns is None:
            grid = default_ns(largest)  # every n of the final grid that these prompts reach
        else:
            grid = np.array(sorted({n for n in self.ns if n <= largest}), dtype=np.int64)
            if grid.size == 0:  # these prompts have fewer samples than every n of the grid
                part = CurveStats(**{**empty_curve_stats().__dict__, "N": largest})
                counted = _with_counts(part, n_samples=pending_samples, n_prompts=prompts)
                return counted, ((largest, prompts, grid, None, None) if keep else None)
        if len(pending_proxy) == 1 and pending_proxy[0].ndim == 2:  # one block: as it is
            proxy, true = pending_proxy[0], pending_true[0]
        elif len(lengths) == 1:  # one dense matrix
            proxy = np.concatenate([p.reshape(-1, largest) for p in pending_proxy])
            true = np.concatenate([t.reshape(-1, largest) for t in pending_true])
        else:  # ragged: one row per prompt
            proxy = [row for p in pending_proxy for row in (p if p.ndim == 2 else [p])]
            true = [row for t in pending_true for row in (t if t.ndim == 2 else [t])]
        part, estimates, n_arr, _ = rank_and_estimate(
            proxy, true, grid, nan_policy="raise", kl_mode=self.kl_mode, threads=None, stats=True, keep=keep
        )
        assert part is not None
        if estimates is None or estimates.proxy is None:
            return part, None
        kept = (
            largest,
            prompts,
            n_arr,
            estimates.in_order(estimates.true, n_arr),
            estimates.in_order(estimates.proxy, n_arr),
        )
        return part, kept


def _with_counts(stats: CurveStats, *, n_samples: int, n_prompts: int) -> CurveStats:
    return CurveStats(**{**stats.__dict__, "n_samples": n_samples, "n_prompts": n_prompts})
