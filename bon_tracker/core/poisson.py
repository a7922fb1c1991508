"""Best-of-Poisson: draw n at random, then best-of-n (Khalaf et al. 2025, arXiv 2506.19248).

Parametrisation: ``n = 1 + K`` with ``K ~ Poisson(mu)`` (n = 0 would select nothing), so
``mu = 0`` is the base policy and ``E[n] = 1 + mu``. Khalaf et al.'s BoP draws n from a
Poisson law and applies best-of-n; we use the shifted law above and say so everywhere.

Expected score. By linearity, BoP is a mixture of best-of-n over n, so its expected score is
``sum_n P(n; mu) BoN(n)`` with the exact all-subsets curve BoN(n) of every n = 1..N: on ranks,
one weight vector ``w^BoP = sum_n P(n) w(n)``. The N samples of a prompt measure BoN(n)
only up to n = N, so the estimate is that of the *capped* rule ``min(1 + K, N)`` (exact,
unbiased), and the untruncated BoP differs from it by at most

    P(1 + K > N) * (t_max - t_min)

when the true reward lies within ``[t_min, t_max]`` (default: the prompt's observed min/max;
a known range such as 0/1 for verifiers can be given): both BoN(n > N) and BoN(N) lie there.

Derivative in mu (for the hedged optimum): with ``d/dmu P(K = k) = P(K = k-1) - P(K = k)``,

    d/dmu E_mu = sum_k P(K = k) [BoN(min(k + 2, N)) - BoN(min(k + 1, N))],

again a weight vector on ranks, so the root of ``d/dmu E_mu[true] = 0`` is exact for the
capped rule (no functional form, no Monte Carlo).

KL from the base. For a continuous proxy, best-of-n has density ``n u^(n-1)`` at CDF value
u, so BoP has ``E[n u^(n-1)] = g'(u)`` with the probability generating function of n,
``g(u) = E[u^n] = u exp(mu (u - 1))``, ``g'(u) = (1 + mu u) exp(mu (u - 1))``, and

    KL = int_0^1 g'(u) log g'(u) du        (closed form below, distribution-free).

For proxies with atoms (ties) a level with base mass q and CDF F (F- below) gets BoP mass
``g(F) - g(F-)`` and contributes ``(g(F) - g(F-)) log((g(F) - g(F-)) / q)``; as for
best-of-n (:mod:`bon_tracker.core.kl`), ``kl_mode="auto"`` treats tied levels as atoms and
runs of distinct values as continuous stretches, each contributing ``G(b) - G(a)`` with G
the antiderivative of ``g' log g'``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expi, gammaln, pdtrc, xlogy

from bon_tracker.core.weights import bon_weight_tail

# Poisson masses below this are left out of the mixture: they change no estimate.
_NEGLIGIBLE_MASS = 1e-300
# Below this mu the closed-form antiderivative cancels; Gauss-Legendre is exact enough there.
_QUADRATURE_MU = 1.0
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(64)


def check_mus(mus: object) -> np.ndarray:
    """The grid of mu: finite, >= 0, 1-D, sorted ascending (a clear error otherwise)."""
    arr = np.atleast_1d(np.asarray(mus, dtype=np.float64))
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"mus must be a non-empty 1-D grid of numbers >= 0, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError(f"every mu must be finite and >= 0, got {arr.tolist()[:8]}")
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"mus must be strictly increasing, got {arr.tolist()[:8]}")
    return arr


def poisson_n_coefficients(mu: float, N: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Mixture coefficients of the capped rule ``n = min(1 + K, N)``, K ~ Poisson(mu).

    Returns ``(c, dc, tail)``: ``c[n-1] = P(n)`` for n < N and ``c[N-1] = P(1 + K >= N)``,
    ``dc = d c / d mu``, and ``tail = P(1 + K > N)``, the mass whose BoN is not measured.

    Example:
        >>> c, dc, tail = poisson_n_coefficients(1.0, 3)
        >>> [round(float(v), 6) for v in c], round(tail, 6), round(float(dc.sum()), 12)
        ([0.367879, 0.367879, 0.264241], 0.080301, 0.0)
    """
    k = np.arange(N, dtype=np.float64)  # K = n - 1 for n = 1..N
    pmf = np.exp(xlogy(k, mu) - mu - gammaln(k + 1.0))  # P(K = k)
    pmf_below = np.concatenate([[0.0], pmf[:-1]])  # P(K = k - 1)
    c = pmf.copy()
    dc = pmf_below - pmf
    at_least = float(pdtrc(N - 2, mu)) if N >= 2 else 1.0  # P(K >= N - 1) = P(n >= N)
    c[-1] = at_least
    dc[-1] = pmf_below[-1] if N >= 2 else 0.0  # d/dmu P(K >= m) = P(K = m - 1)
    tail = float(pdtrc(N - 1, mu))  # P(K >= N) = P(n > N)
    return c, dc, tail


def bop_rank_weights(N: int, mus: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank weights of the capped Best-of-Poisson rule for N samples: ``(W, dW, tails)``.

    ``W[:, j]`` (ranks ascending) gives ``E_mu_j = sum_k W[k, j] t_(k)``; ``dW`` its derivative
    in mu; ``tails[j] = P(n > N)``. Columns sum to 1 (W) and 0 (dW).

    Example:
        >>> W, dW, tails = bop_rank_weights(4, np.array([0.0, 2.0]))
        >>> W[:, 0].tolist(), round(float(W[:, 1].sum()), 12)
        ([0.25, 0.25, 0.25, 0.25], 1.0)
    """
    W = np.zeros((N, len(mus)))
    dW = np.zeros((N, len(mus)))
    tails = np.zeros(len(mus))
    for j, mu in enumerate(mus):
        c, dc, tails[j] = poisson_n_coefficients(float(mu), N)
        for n in np.flatnonzero((c > _NEGLIGIBLE_MASS) | (np.abs(dc) > _NEGLIGIBLE_MASS)) + 1:
            k0, tail = bon_weight_tail(N, int(n))
            W[k0 - 1 :, j] += c[n - 1] * tail
            dW[k0 - 1 :, j] += dc[n - 1] * tail
    return W, dW, tails


# ---- KL ------------------------------------------------------------------------------


def _pgf(u: np.ndarray, mu: float) -> np.ndarray:
    """g(u) = E[u^n] = u exp(mu (u - 1)): the BoP mass at or below CDF value u."""
    return u * np.exp(mu * (u - 1.0))


def _scaled_ei(w: np.ndarray) -> np.ndarray:
    """exp(-w) Ei(w) for w >= 1 (an asymptotic series past 700, where Ei overflows)."""
    out = np.empty_like(w)
    small = w <= 700.0
    out[small] = np.exp(-w[small]) * expi(w[small])
    big = w[~small]
    if big.size:
        term, total = 1.0 / big, np.zeros_like(big)
        for k in range(12):
            total += term
            term = term * (k + 1) / big
        out[~small] = total
    return out


def _antiderivative(u: np.ndarray, mu: float) -> np.ndarray:
    """G(u) with G' = g' log g', g'(u) = (1 + mu u) e^(mu (u - 1)), for mu >= 1 (derivation in docs/selection.md).

    G = A + B: A integrates g' * mu (u - 1), B integrates g' * log(1 + mu u) (w = 1 + mu u).
    """
    s = u - 1.0
    decay = np.exp(mu * s)
    part_a = decay * (mu * s * s + (mu - 1.0) * s + (1.0 - mu) / mu)
    w = 1.0 + mu * u
    part_b = decay * ((w - 1.0) * np.log(w) - 1.0 + _scaled_ei(w)) / mu
    return part_a + part_b


def _stretch_kl(a: np.ndarray, b: np.ndarray, mu: float) -> np.ndarray:
    """int_a^b g' log g' du, elementwise over stretches ``[a, b]`` of the CDF."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if mu == 0.0:
        return np.zeros(np.broadcast(a, b).shape)
    if mu >= _QUADRATURE_MU:
        return _antiderivative(b, mu) - _antiderivative(a, mu)
    half = (b - a)[..., None] / 2.0
    u = (a + b)[..., None] / 2.0 + half * _GL_NODES
    density = (1.0 + mu * u) * np.exp(mu * (u - 1.0))
    return (half * _GL_WEIGHTS * density * np.log(density)).sum(axis=-1)


def kl_bop(mu: object) -> np.ndarray | float:
    """KL(BoP(mu) || base) for a continuous proxy, nats: ``int_0^1 g' log g' du``.

    Distribution-free (as ``log n - (n-1)/n`` is for best-of-n).

    Example:
        >>> round(kl_bop(0.0), 12), round(kl_bop(10.0), 4)
        (0.0, 1.408)
    """
    arr = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    out = np.array([float(_stretch_kl(np.array(0.0), np.array(1.0), float(m))) for m in arr])
    out = np.maximum(out, 0.0)
    return float(out[0]) if np.ndim(mu) == 0 else out


def bop_level_kl(start: np.ndarray, size: np.ndarray, N: int, mu: float, atom: np.ndarray) -> float:
    """KL of BoP(mu) on one prompt's proxy levels (ascending): atoms and continuous stretches.

    ``start``: samples strictly below each level; ``size``: its count; ``atom``: which levels are
    atoms (the others are single samples of continuous mass, integrated over their CDF cell).
    """
    start = np.asarray(start, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    lo, hi = start / N, (start + size) / N
    total = 0.0
    if atom.any():
        mass = _pgf(hi[atom], mu) - _pgf(lo[atom], mu)
        q = size[atom] / N
        with np.errstate(divide="ignore", invalid="ignore"):
            total += float(np.where(mass > 0, mass * np.log(mass / q), 0.0).sum())
    single = ~atom
    if single.any():
        total += float(_stretch_kl(lo[single], hi[single], mu).sum())
    return max(total, 0.0)


def bop_kl_per_prompt(sorted_proxy: np.ndarray, new_group: np.ndarray, mus: np.ndarray, kl_mode: str) -> np.ndarray:
    """KL of BoP per prompt of a sorted ``(P, N)`` block: ``(P, len(mus))``, by ``kl_mode`` as :func:`bon_curve`.

    Tie-free prompts (and ``kl_mode="continuous"``) get :func:`kl_bop`; under ``"auto"`` tied
    levels are atoms and single samples continuous mass; under ``"discrete"`` every level is an atom.
    """
    P, N = sorted_proxy.shape
    continuous = np.asarray(kl_bop(mus), dtype=np.float64)
    out = np.broadcast_to(continuous, (P, len(mus))).copy()
    if kl_mode == "continuous":
        return out
    rows = range(P) if kl_mode == "discrete" else np.flatnonzero(~new_group.all(axis=1))
    for row in rows:
        firsts = np.flatnonzero(new_group[row])
        size = np.diff(np.append(firsts, N))
        atom = np.ones(len(size), dtype=bool) if kl_mode == "discrete" else size >= 2
        out[row] = [bop_level_kl(firsts, size, N, float(mu), atom) for mu in mus]
    return out


def mean_n(mus: np.ndarray) -> np.ndarray:
    """E[n] = 1 + mu of the (uncapped) law."""
    return 1.0 + np.asarray(mus, dtype=np.float64)


def default_mus(N: int) -> np.ndarray:
    """A grid of mu from 0 to about N: 0 and powers of two, so E[n] spans the measured range.

    >>> default_mus(16).tolist()
    [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    """
    top = max(1, int(N))
    powers = 2.0 ** np.arange(-1, math.floor(math.log2(top)) + 1)
    return np.concatenate([[0.0], powers])
