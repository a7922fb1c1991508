"""Soft best-of-n (Verdun et al. 2025, arXiv 2505.03156; Khalaf et al. 2025, arXiv 2506.19248).

Draw n of the prompt's candidates uniformly without replacement; pick candidate i of that
subset S with probability ``softmax_S(lam * z)_i``, where z is the rule's selection score
divided by its pooled within-prompt standard deviation (so that ``lam`` means the same for
every rule: a standardised inverse temperature; the raw one is ``lam / scale``).
``lam = 0`` is the base policy, ``lam -> inf`` best-of-n.

Every statistic is a functional of the marginal pick distribution over the N samples,

    pi_i = E_S[ 1{i in S} softmax_S(lam z)_i ],

estimated without bias by averaging the exact softmax over R subsets (Rao-Blackwellised:
the pick itself is never sampled). With ``C(N, n) <= R`` every subset is enumerated and the
estimate is exact. ``lam = 0`` (``pi = 1/N``) and ``lam = inf`` (the exact all-subsets
best-of-n weights, ties sharing their group's weight) are always exact. The same subsets
serve every ``lam`` (common random numbers), so the curve is smooth in ``lam``.

* expected true / proxy: ``sum_i pi_i t_i`` (unbiased; SE across prompts, which includes the
  subset noise, as DESIGN.md's error bars do);
* KL: ``KL(pi || uniform on the N samples) = sum_i pi_i log(N pi_i)``, the KL of the induced
  distribution over this prompt's samples from the base pick. It is a plug-in (biased upwards
  by the subset noise, O(1/R)); at ``lam = inf`` it is ``sum_k w_k log(N w_k)``, close to
  ``log n - (n-1)/n`` for n << N and up to 1 nat above it as n -> N (``log N`` at n = N);
* derivative (for the hedged optimum): ``d/dlam E[t] = E_S[Cov_softmax(t, z)]``, unbiased on
  the same subsets; at ``lam = 0`` exactly ``(n-1)/n`` times the samples' covariance (ddof 1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from bon_tracker.core.ranking import average_within_ties, rank_by_proxy
from bon_tracker.core.weights import bon_weights

# Work arrays of about this many candidates per block of prompts.
_BLOCK_CANDIDATES = 1 << 20
DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, math.inf)


def check_lambdas(lambdas: object) -> np.ndarray:
    """The grid of standardised lambda: >= 0 (inf allowed), strictly increasing."""
    arr = np.atleast_1d(np.asarray(lambdas, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lambdas must be a non-empty 1-D grid of numbers >= 0, got shape {arr.shape}")
    if np.any(np.isnan(arr)) or np.any(arr < 0):
        raise ValueError(f"every lambda must be >= 0 (inf allowed), got {arr.tolist()[:8]}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"lambdas must be strictly increasing, got {arr.tolist()[:8]}")
    return arr


@dataclass(frozen=True)
class SoftBonEstimates:
    """Per-prompt soft best-of-n estimates over a lambda grid.

    ``true`` and ``deriv`` are ``(T, P, L)`` (one slice per true reward), ``proxy`` and ``kl``
    ``(P, L)``; ``exact[j]`` says whether column j is exact (no subset noise) for every prompt.
    """

    lambdas: np.ndarray
    n: int
    scale: float
    true: np.ndarray
    proxy: np.ndarray
    kl: np.ndarray
    deriv: np.ndarray
    exact: np.ndarray
    n_subsets: int


def selection_scale(rows: np.ndarray | list[np.ndarray]) -> float:
    """Pooled within-prompt standard deviation of a selection score (1 where it is 0)."""
    if isinstance(rows, np.ndarray):
        var = float(rows.var(axis=1).mean())
    else:
        var = float(np.mean([r.var() for r in rows if len(r)]))
    return math.sqrt(var) if var > 0 and math.isfinite(var) else 1.0


def _subsets(N: int, n: int, n_subsets: int) -> np.ndarray | None:
    """Every n-subset of N, ``(C(N, n), n)``, when there are at most ``n_subsets``; else None."""
    if math.comb(N, n) > n_subsets:
        return None
    return np.array(list(itertools.combinations(range(N), n)), dtype=np.int64).reshape(-1, n)


def _block_estimates(z, t, n, lambdas, n_subsets, rng):
    """One dense block: z ``(b, N)``, t ``(T, b, N)`` -> true ``(T, b, L)``, proxy, kl ``(b, L)``, deriv, exact."""
    T, b, N = t.shape
    L = len(lambdas)
    true_out = np.empty((T, b, L))
    deriv_out = np.empty((T, b, L))
    proxy_out = np.empty((b, L))
    kl_out = np.empty((b, L))
    exact = np.zeros(L, dtype=bool)
    mean_z = z.mean(axis=1)
    finite = [j for j, lam in enumerate(lambdas) if 0.0 < lam < math.inf]
    R = 1
    if finite:  # only a finite, positive lambda needs candidate subsets
        R = _subset_estimates(z, t, n, np.asarray(lambdas)[finite], n_subsets, rng, finite,
                              (true_out, proxy_out, kl_out, deriv_out, exact))  # fmt: skip
    for j, lam in enumerate(lambdas):
        if lam == 0.0:
            exact[j] = True
            true_out[:, :, j] = t.mean(axis=2)
            proxy_out[:, j] = mean_z
            kl_out[:, j] = 0.0
            cov0 = ((t - t.mean(axis=2, keepdims=True)) * (z - mean_z[:, None])).sum(axis=2) / max(N - 1, 1)
            deriv_out[:, :, j] = (n - 1) / n * cov0
        elif math.isinf(lam):
            exact[j] = True
            pi = _bon_pick_probabilities(z, n)
            true_out[:, :, j] = (pi[None] * t).sum(axis=2)
            proxy_out[:, j] = (pi * z).sum(axis=1)
            kl_out[:, j] = _sample_kl(pi, N)
            deriv_out[:, :, j] = 0.0  # the softmax is a point mass (or uniform over tied maxima): no covariance
    return true_out, proxy_out, kl_out, deriv_out, exact, R


def _subset_estimates(z, t, n, lambdas, n_subsets, rng, columns, outputs) -> int:
    """Fill the finite-lambda ``columns`` of ``outputs`` from R subsets per prompt (all of them when few); returns R."""
    true_out, proxy_out, kl_out, deriv_out, exact = outputs
    T, b, N = t.shape
    every = _subsets(N, n, n_subsets)
    if every is not None:
        idx = np.broadcast_to(every, (b, *every.shape))
    elif n == N:
        idx = np.broadcast_to(np.arange(N), (b, 1, N))
    else:
        keys = rng.random((b, n_subsets, N), dtype=np.float32)  # ties among keys only bias by ~N^2 2^-24
        idx = np.argpartition(keys, n - 1, axis=2)[:, :, :n]
    R = idx.shape[1]
    rows = np.arange(b)[:, None, None]
    zs = z[rows, idx]  # (b, R, n)
    ts = t[:, rows, idx]  # (T, b, R, n)
    # Per candidate, the quantities whose softmax-weighted sums are needed: t (T of them), t z, z and 1
    # (the normaliser), laid out (b, R, K, n) so that one batched product per subset gives every sum.
    values = np.stack([*ts, *(ts * zs[None]), zs, np.ones_like(zs)], axis=2)
    K = values.shape[2]
    flat = (np.arange(b)[:, None, None] * N + idx).ravel()
    below_max = zs - zs.max(axis=2, keepdims=True)  # <= 0: exp never overflows, the top term is 1
    s = np.exp(below_max[:, :, :, None] * lambdas)  # (b, R, n, L')
    # (b, R, L', K): the weighted sums in each subset, the normaliser last (3-D batches: numpy's fast path)
    per_subset = np.matmul(values.reshape(b * R, K, n), s.reshape(b * R, n, len(columns)))
    per_subset = per_subset.reshape(b, R, K, -1).transpose(0, 1, 3, 2)
    norm = per_subset[..., -1:].copy()
    per_subset = per_subset / norm
    s /= norm.transpose(0, 1, 3, 2)
    sums = per_subset.mean(axis=1)  # averaged over the R subsets
    st, sz = sums[:, :, :T], sums[:, :, 2 * T]
    # E_S[Cov_s(t, z)] needs the product of the sums inside each subset, before averaging.
    cov = (per_subset[..., T : 2 * T] - per_subset[..., :T] * per_subset[..., 2 * T : 2 * T + 1]).mean(axis=1)
    for i, j in enumerate(columns):
        exact[j] = every is not None or n == N
        true_out[:, :, j] = st[:, i].T
        proxy_out[:, j] = sz[:, i]
        deriv_out[:, :, j] = cov[:, i].T
        pi = np.bincount(flat, weights=(s[:, :, :, i] / R).ravel(), minlength=b * N).reshape(b, N)
        kl_out[:, j] = _sample_kl(pi, N)
    return R


def _bon_pick_probabilities(z: np.ndarray, n: int) -> np.ndarray:
    """Exact best-of-n pick probability of each sample ``(b, N)``: rank weights, tied groups sharing."""
    b, N = z.shape
    _, _, new_group = rank_by_proxy(z)
    order = np.argsort(z, axis=1, kind="stable")
    weights = np.broadcast_to(bon_weights(N, n), (b, N))
    shared = average_within_ties(np.ascontiguousarray(weights), new_group)
    # Ties share their group's weight, so the order within a tie does not matter.
    pi = np.empty((b, N))
    np.put_along_axis(pi, order, shared, axis=1)
    return pi


def _sample_kl(pi: np.ndarray, N: int) -> np.ndarray:
    """KL(pi || uniform on N) per row."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(pi > 0, pi * np.log(N * pi), 0.0)
    return np.maximum(terms.sum(axis=1), 0.0)


def soft_bon_estimates(
    proxy: np.ndarray | list[np.ndarray],
    trues: np.ndarray | list[np.ndarray],
    n: int,
    lambdas: object = DEFAULT_LAMBDAS,
    *,
    n_subsets: int = 256,
    rng: np.random.Generator | int | None = 0,
) -> SoftBonEstimates:
    """Per-prompt soft best-of-n estimates for checked input (see the module docstring).

    Args:
        proxy: the rule's selection score, ``(P, N)`` or a list of 1-D prompts.
        trues: true rewards ``(T, P, N)``, or a list of ``(T, N_p)`` arrays (ragged).
        n: candidates per pick, ``1 <= n <= `` every prompt's N.
        lambdas: standardised inverse temperatures (0 and inf allowed).
        n_subsets: random subsets per prompt (R); all subsets when ``C(N, n) <= R``.
        rng: seed or generator of the subsets.

    Example:
        >>> est = soft_bon_estimates(np.array([[0.0, 1.0, 2.0]]), np.array([[[1.0, 0.0, 3.0]]]), 2, [0.0, np.inf])
        >>> est.true[0, 0].tolist(), bool(est.exact.all())
        ([1.3333333333333333, 2.0], True)
    """
    lam = check_lambdas(lambdas)
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, (int, np.integer)) or n_subsets < 1:
        raise ValueError(f"n_subsets must be a positive integer, got {n_subsets!r}")
    rng = np.random.default_rng(rng)
    ragged = not isinstance(proxy, np.ndarray)
    groups = _groups(proxy, trues)
    N_min = min(g[1].shape[1] for g in groups)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= N_min:
        raise ValueError(
            f"soft best-of-n needs an integer 1 <= n <= {N_min} (the fewest samples of a prompt), got {n!r}"
        )
    scale = selection_scale(proxy)
    T = groups[0][2].shape[0]
    P = len(proxy) if ragged else proxy.shape[0]
    L = len(lam)
    true_out, deriv_out = np.full((T, P, L), np.nan), np.full((T, P, L), np.nan)
    proxy_out, kl_out = np.full((P, L), np.nan), np.full((P, L), np.nan)
    exact = np.ones(L, dtype=bool)
    R_used = 1
    for index, p, t in groups:
        step = max(1, _BLOCK_CANDIDATES // max(1, n_subsets * n * max(T, 1)))
        for start in range(0, p.shape[0], step):
            sl = slice(start, min(p.shape[0], start + step))
            tr, pr, kl, de, ex, R = _block_estimates(p[sl] / scale, t[:, sl], int(n), lam, int(n_subsets), rng)
            rows = index[sl]
            true_out[:, rows], deriv_out[:, rows] = tr, de
            proxy_out[rows], kl_out[rows] = pr * scale, kl
            exact &= ex
            R_used = max(R_used, R)
    return SoftBonEstimates(lam, int(n), scale, true_out, proxy_out, kl_out, deriv_out, exact, int(R_used))


def _groups(proxy, trues):
    """``(prompt indices, proxy (m, N), trues (T, m, N))`` per number of samples N."""
    if isinstance(proxy, np.ndarray):
        return [(np.arange(proxy.shape[0]), proxy, trues)]
    lengths = np.array([len(r) for r in proxy])
    out = []
    for N in np.unique(lengths):
        if N == 0:
            continue
        idx = np.flatnonzero(lengths == N)
        out.append((idx, np.stack([proxy[i] for i in idx]), np.stack([trues[i] for i in idx], axis=1)))
    return out
