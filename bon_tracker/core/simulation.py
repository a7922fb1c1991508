"""A documented family of simulated RLHF runs whose true best-of-n curves are known exactly.

Used to measure the alerts (detection delay, false alarms), the intervals of the
Goodhart point (coverage) and the prediction from small n, against ground truth.

The model (numpy only). Prompt ``i`` has a true-reward offset ``b_i``, a proxy offset
``c_i`` and a selection slope ``rho_i`` (prompt-level random effects, fixed over a run).
A policy at optimisation level ``lam`` draws, per sample,

.. math::

    u \\sim N(\\lambda, 1),\\quad \\text{proxy} = c_i + u,\\quad
    \\text{true} = b_i + \\rho_i u - \\gamma (u^2 - 1) + \\sigma v,\\quad v \\sim N(0, 1).

``N(lam, 1)`` is the base ``N(0, 1)`` exponentially tilted by the proxy -- the optimum of
KL-regularised RL -- so the policy's KL to the base is exactly ``lam**2 / 2``. The
``-gamma u^2`` term is the Goodhart mechanism: very high proxy scores are bad.

Ground truth (population means over prompts, ``rho = E[rho_i]``):

* the policy's own true reward (n = 1): ``rho lam - gamma lam^2``, peaking at
  ``lam* = rho / (2 gamma)``;
* best-of-n of the policy's samples: with ``M_n`` the maximum of n standard normals,
  ``E[true | best-of-n] - E[true | n=1] = (rho - 2 gamma lam) E[M_n] - gamma (E[M_n^2] - 1)``,
  with ``E[M_n]``, ``E[M_n^2]`` by quadrature (:func:`normal_max_moments`).

A *run* is a sequence of evals with ``lam`` rising linearly from 0. Peaked runs put the
policy's true peak at a known eval; unpeaked runs have ``gamma = 0`` (both rewards rise
linearly) or a peak at least twice as far as the run goes (both keep rising, concave).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def _normal_cdf_and_logs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(log Phi(x), phi(x))`` on a grid, with ``log Phi`` accurate in both tails."""
    upper = np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in x])  # 1 - Phi(x)
    lower = np.array([0.5 * math.erfc(-v / math.sqrt(2.0)) for v in x])  # Phi(x)
    with np.errstate(divide="ignore"):
        log_cdf = np.where(x > 0, np.log1p(-upper), np.log(lower))
    return log_cdf, np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def normal_max_moments(n: object) -> tuple[np.ndarray, np.ndarray]:
    """``E[M_n]`` and ``E[M_n^2]`` for the maximum ``M_n`` of n i.i.d. standard normals.

    By quadrature of ``x^k n phi(x) Phi(x)^(n-1)`` on a fine grid (real n >= 1 allowed),
    accurate to about 1e-9 for n up to 1e8.

    Example:
        >>> m1, m2 = normal_max_moments([1, 2, 3])
        >>> np.round(m1, 6).tolist(), np.round(m2, 6).tolist()  # 0, 1/sqrt(pi), 3/(2 sqrt(pi))
        ([0.0, 0.56419, 0.846284], [1.0, 1.0, 1.275664])
    """
    n_arr = np.atleast_1d(np.asarray(n, dtype=np.float64))
    if np.any(~np.isfinite(n_arr)) or np.any(n_arr < 1):
        raise ValueError(f"n must be finite and >= 1, got {n!r}")
    x, log_cdf, pdf = _quadrature_grid()
    dx = x[1] - x[0]
    m1, m2 = np.empty(n_arr.shape), np.empty(n_arr.shape)
    for start in range(0, n_arr.size, 256):  # bounded memory for long n arrays
        n_block = n_arr[start : start + 256, None]
        density = n_block * pdf[None, :] * np.exp((n_block - 1.0) * log_cdf[None, :])
        m1[start : start + 256] = (density * x).sum(axis=1) * dx
        m2[start : start + 256] = (density * x * x).sum(axis=1) * dx
    return m1, m2


_GRID: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []


def _quadrature_grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The x grid of the quadrature with log Phi and phi on it, computed once on first use."""
    if not _GRID:
        x = np.linspace(-10.0, 10.0, 8001)
        _GRID.append((x, *_normal_cdf_and_logs(x)))
    return _GRID[0]


@dataclass(frozen=True)
class SimulationModel:
    """Parameters of the sample-level model (see the module docstring).

    Attributes:
        rho: mean selection slope of the true reward on the proxy (``E[rho_i]``).
        gamma: Goodhart curvature; 0 gives no peak at all.
        noise: sd ``sigma`` of the true reward's noise independent of the proxy.
        rho_sd: sd of the per-prompt slope ``rho_i`` (prompt heterogeneity).
        prompt_sd: sd of the per-prompt offsets ``b_i`` and ``c_i``.
    """

    rho: float = 0.8
    gamma: float = 0.2
    noise: float = 1.0
    rho_sd: float = 0.2
    prompt_sd: float = 0.5

    @property
    def peak_lam(self) -> float:
        """Policy optimisation level where the policy's true reward peaks (inf if gamma = 0)."""
        return self.rho / (2.0 * self.gamma) if self.gamma > 0 else math.inf

    def draw_prompts(self, n_prompts: int, rng: np.random.Generator) -> np.ndarray:
        """Prompt effects ``(P, 3)``: columns ``b_i`` (true offset), ``c_i`` (proxy offset), ``rho_i``."""
        b = rng.normal(0.0, self.prompt_sd, n_prompts)
        c = rng.normal(0.0, self.prompt_sd, n_prompts)
        rho = rng.normal(self.rho, self.rho_sd, n_prompts)
        return np.column_stack([b, c, rho])

    def sample(
        self, prompts: np.ndarray, n_samples: int, lam: float, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Proxy and true scores ``(P, N)`` of a policy at level ``lam`` on the given prompts."""
        P = prompts.shape[0]
        u = lam + rng.standard_normal((P, n_samples))
        proxy = prompts[:, 1:2] + u
        true = prompts[:, 0:1] + prompts[:, 2:3] * u - self.gamma * (u * u - 1.0)
        true += self.noise * rng.standard_normal((P, n_samples))
        return proxy, true

    def policy_true(self, lam: object) -> np.ndarray | float:
        """Population mean true reward of the policy at ``lam`` (n = 1)."""
        lam_arr = np.asarray(lam, dtype=np.float64)
        out = self.rho * lam_arr - self.gamma * lam_arr**2
        return float(out) if out.ndim == 0 else out

    def bon_gain(self, ns: object, lam: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """Exact best-of-n gains over n = 1 (true, proxy) of the policy at ``lam``, population means."""
        m1, m2 = normal_max_moments(ns)
        true = (self.rho - 2.0 * self.gamma * lam) * m1 - self.gamma * (m2 - 1.0)
        return true, m1

    def bon_peak(self, lam: float = 0.0) -> dict[str, float]:
        """The exact peak of the best-of-n true curve at ``lam``: ``n``, ``kl`` (nats), ``gain``.

        Found on a fine log-spaced grid of real n refined by golden-section search; ``n = 1``
        when the curve falls from the start, ``inf`` when it never peaks (gamma = 0).
        """
        if self.gamma <= 0:
            return {"n": math.inf, "kl": math.inf, "gain": math.inf}
        if self.rho - 2.0 * self.gamma * lam <= 0:
            return {"n": 1.0, "kl": 0.0, "gain": 0.0}
        grid = np.exp(np.linspace(0.0, math.log(1e9), 400))
        gains = self.bon_gain(grid, lam)[0]
        i = int(np.argmax(gains))
        lo, hi = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, len(grid) - 1)])
        ratio = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(60):
            a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
            ga, gb = self.bon_gain(np.exp([a, b]), lam)[0]
            lo, hi = (lo, b) if ga > gb else (a, hi)
        n_star = math.exp(0.5 * (lo + hi))
        gain = float(self.bon_gain([n_star], lam)[0][0])
        return {"n": n_star, "kl": math.log(n_star) - (n_star - 1.0) / n_star, "gain": gain}


@dataclass(frozen=True)
class SimulatedRun:
    """One simulated training run: a model, an eval schedule and its known true peak.

    Attributes:
        model: the sample-level model.
        lams: the policy's optimisation level at each eval (rising from 0).
        n_prompts: eval prompts (fixed over the run).
        n_samples: samples per prompt at each eval.
        peak_eval: index of the eval where the policy's true reward peaks; None for runs
            whose true reward keeps rising over the whole run.
        seed: seeds the prompts and all samples.
    """

    model: SimulationModel
    lams: tuple[float, ...]
    n_prompts: int
    n_samples: int
    peak_eval: int | None
    seed: int

    def policy_kl(self, i: int) -> float:
        """KL(policy || base) at eval ``i``: ``lam**2 / 2`` nats."""
        return 0.5 * self.lams[i] ** 2

    def evals(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, float]]:
        """``(eval index, proxy (P, N), true (P, N), policy KL)`` for every eval, in order."""
        rng = np.random.default_rng(self.seed)
        prompts = self.model.draw_prompts(self.n_prompts, rng)
        for i, lam in enumerate(self.lams):
            proxy, true = self.model.sample(prompts, self.n_samples, lam, rng)
            yield i, proxy, true, self.policy_kl(i)


def simulated_runs(
    kind: str,
    n_runs: int,
    *,
    n_prompts: int = 64,
    n_samples: int = 16,
    noise: float = 1.0,
    n_evals: int = 12,
    seed: int = 0,
) -> list[SimulatedRun]:
    """The documented family of simulated runs.

    Every run has ``n_evals`` evals with ``lam`` rising linearly from 0, ``rho = 0.8``,
    prompt heterogeneity ``rho_sd = 0.2``, ``prompt_sd = 0.5``.

    * ``"peaked"``: the policy's true reward peaks at eval ``K``, drawn uniformly from
      ``[n_evals // 3, n_evals // 2]``, with the peak at ``lam* = 1.5`` (policy KL 1.125 nats,
      ``gamma = rho / (2 lam*)``); ``lam`` rises by ``lam* / K`` per eval, so the run goes
      on to about twice the peak's KL distance and true falls back towards its start.
    * ``"rising"``: both rewards keep rising: half the runs with ``gamma = 0`` (linear),
      half concave with the peak at least twice as far as the run's last ``lam``; ``lam``
      ends at 1.5 to 3.

    Args:
        kind: ``"peaked"`` or ``"rising"``.
        n_runs: how many runs.
        n_prompts: eval prompts per run.
        n_samples: samples per prompt and eval.
        noise: sd of the true reward's independent noise (the noise level).
        n_evals: evals per run.
        seed: seeds the family (run ``r`` uses seed ``seed * 1_000_003 + r``).

    Example:
        >>> run = simulated_runs("peaked", 1, seed=3)[0]
        >>> run.model.peak_lam, run.lams[run.peak_eval]
        (1.5, 1.5)
    """
    if kind not in ("peaked", "rising"):
        raise ValueError(f"kind must be 'peaked' or 'rising', got {kind!r}")
    if n_evals < 6:
        raise ValueError(f"n_evals must be >= 6, got {n_evals}")
    rng = np.random.default_rng(seed)
    runs = []
    for r in range(n_runs):
        run_seed = seed * 1_000_003 + r
        if kind == "peaked":
            peak_eval = int(rng.integers(n_evals // 3, n_evals // 2 + 1))
            lam_star = 1.5
            model = SimulationModel(rho=0.8, gamma=0.8 / (2 * lam_star), noise=noise)
            lams = tuple(float(lam_star * i / peak_eval) for i in range(n_evals))
            runs.append(SimulatedRun(model, lams, n_prompts, n_samples, peak_eval, run_seed))
        else:
            lam_end = float(rng.uniform(1.5, 3.0))
            gamma = 0.0 if r % 2 == 0 else 0.8 / (2 * float(rng.uniform(2.0, 4.0)) * lam_end)
            model = SimulationModel(rho=0.8, gamma=gamma, noise=noise)
            lams = tuple(float(lam_end * i / (n_evals - 1)) for i in range(n_evals))
            runs.append(SimulatedRun(model, lams, n_prompts, n_samples, None, run_seed))
    return runs
