"""One eval's selection statistics: every rule x true reward x family, their optima and the frontier.

For each selection rule (core/selection.py) and each true reward this computes

* ``bon``: the plain best-of-n curve of the rule's aggregate (:func:`bon_curve`, so exactly the
  numbers the tracker logs for one proxy), Gao et al.'s Goodhart point with its interval
  (:func:`goodhart_interval`), HedgeTune's root of ``d/dn E_n[true]`` and the argmax of the
  exact curve over every n = 1..N (core/hedge.py);
* ``bop``: Best-of-Poisson over a grid of mu, exact up to the reported truncation bound, its
  KL, and its optimum (root of the exact derivative; argmax on the grid) (core/poisson.py);
* ``soft``: soft best-of-n over a grid of lambda, unbiased with SE (exact where enumerable),
  its sample KL, and its optimum (root of the estimated derivative; argmax) (core/soft_bon.py);

then the best rule at each KL budget (core/frontier.py; best-of-n and Best-of-Poisson share
one KL definition, soft best-of-n's sample KL is shown but not ranked against them).

All intervals resample the same prompts (one bootstrap count matrix), so rules are compared
on paired resamples. :class:`SelectionStatistics` round-trips exactly through JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from bon_tracker.core.curve import bon_curve, default_ns
from bon_tracker.core.estimators import bon_estimate
from bon_tracker.core.frontier import FrontierPoint, best_at_budgets, kl_budgets
from bon_tracker.core.hedge import HedgedOptimum, bon_derivative, curve_argmax, derivative_root
from bon_tracker.core.kl import discrete_kl_per_prompt
from bon_tracker.core.poisson import bop_kl_per_prompt, bop_rank_weights, check_mus, default_mus, kl_bop
from bon_tracker.core.ranking import average_within_ties, rank_by_proxy
from bon_tracker.core.selection import DEFAULT_UWO_LAMBDA, SelectionInput, check_rules, rule_scores
from bon_tracker.core.soft_bon import DEFAULT_LAMBDAS, check_lambdas, soft_bon_estimates
from bon_tracker.core.uncertainty import goodhart_interval, prompt_resample_counts
from bon_tracker.core.validation import check_ns
from bon_tracker.core.weights import bon_weights

FAMILIES = ("bon", "bop", "soft")
PARAMETERS = {"bon": "n", "bop": "mu", "soft": "lambda"}
# The exact per-n curve (argmax, Best-of-Poisson) covers every n up to this; past it, a grid.
MAX_EVERY_N = 1024
MAX_GRID = 64  # points of any one grid (ns, mus, lambdas): the record stays bounded
HEDGE_GRID = 96  # real n at which HedgeTune's derivative is evaluated
KL_POINTS = 128  # n at which the exact per-n curve's KL is computed (interpolated in log n between)
FRONTIER_BUDGETS = 16


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64).ravel())


@dataclass(frozen=True)
class FamilyCurve:
    """One rule's curve under one family, on that family's parameter grid.

    ``kl`` is the KL from the base policy (nats; best-of-n and Best-of-Poisson: population KL by
    the rule of :func:`bon_curve`; soft: the sample KL), ``kl_formula`` the continuous-proxy value
    (``log n - (n-1)/n``, :func:`kl_bop`; NaN for soft). ``truncation_bound`` (Best-of-Poisson):
    the mean over prompts of ``P(n > N) (t_max - t_min)``, a bound on how far the untruncated
    BoP's true reward can be from ``true_mean``; 0 elsewhere. ``exact``: no Monte Carlo noise at
    that point. ``scale``: soft's raw lambda is ``value / scale``; 1 elsewhere.
    """

    family: str
    parameter: str
    values: tuple[float, ...]
    kl: tuple[float, ...]
    kl_formula: tuple[float, ...]
    true_mean: tuple[float, ...]
    true_se: tuple[float, ...]
    proxy_mean: tuple[float, ...]
    proxy_se: tuple[float, ...]
    truncation_bound: tuple[float, ...]
    exact: tuple[bool, ...]
    scale: float = 1.0

    def to_dict(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> FamilyCurve:
        kwargs = {}
        for f in fields(cls):
            v = data[f.name]
            if f.name == "exact":
                kwargs[f.name] = tuple(bool(x) for x in v)
            elif isinstance(v, list):
                kwargs[f.name] = tuple(float(x) for x in v)
            else:
                kwargs[f.name] = float(v) if f.name == "scale" else v
        return cls(**kwargs)

    def rows(self) -> list[dict]:
        keys = ("values", "kl", "kl_formula", "true_mean", "true_se", "proxy_mean", "proxy_se", "truncation_bound")
        out = []
        for i in range(len(self.values)):
            row = {"family": self.family, self.parameter: self.values[i]}
            row.update({k: getattr(self, k)[i] for k in keys[1:]})
            row["exact"] = self.exact[i]
            out.append(row)
        return out


@dataclass(frozen=True)
class RuleStatistics:
    """Everything about one (rule, true reward) pair.

    ``gao``: Gao et al.'s Goodhart point on the rule's best-of-n curve (keys of
    :class:`GoodhartInterval`: ``n, n_low, n_high, kl, kl_low, kl_high, p_no_peak``) and
    ``log_n_ratio`` = log(Gao n* / HedgeTune n*) with ``intervals_overlap`` (1.0 / 0.0; NaN
    where either is missing).
    """

    rule: str
    true_name: str
    curves: tuple[FamilyCurve, ...]
    optima: tuple[HedgedOptimum, ...]
    gao: dict

    def curve(self, family: str) -> FamilyCurve:
        return next(c for c in self.curves if c.family == family)

    def optimum(self, family: str, method: str = "derivative_root") -> HedgedOptimum:
        return next(o for o in self.optima if o.family == family and o.method == method)

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "true_name": self.true_name,
            "curves": [c.to_dict() for c in self.curves],
            "optima": [o.to_dict() for o in self.optima],
            "gao": dict(self.gao),
        }

    @classmethod
    def from_dict(cls, data: dict) -> RuleStatistics:
        return cls(
            data["rule"],
            data["true_name"],
            tuple(FamilyCurve.from_dict(c) for c in data["curves"]),
            tuple(HedgedOptimum.from_dict(o) for o in data["optima"]),
            {k: float(v) for k, v in data["gao"].items()},
        )


@dataclass(frozen=True)
class SelectionStatistics:
    """The selection statistics of one eval (see the module docstring).

    ``frontier``: per true reward, one row per KL budget: the best (rule, family, parameter
    value) among best-of-n and Best-of-Poisson points within the budget.
    ``to_json()`` / ``from_json()`` round-trip exactly (``allow_nan``: NaN and Infinity tokens).
    """

    member_names: tuple[str, ...]
    true_names: tuple[str, ...]
    rules: tuple[str, ...]
    uwo_lambda: float
    soft_n: int
    n_prompts: int
    N: int
    n_resamples: int
    seed: int
    statistics: tuple[RuleStatistics, ...]
    frontier: dict

    def get(self, rule: str, true_name: str | None = None) -> RuleStatistics:
        """The statistics of ``rule`` under ``true_name`` (default: the first true reward)."""
        name = self.true_names[0] if true_name is None else true_name
        for s in self.statistics:
            if s.rule == rule and s.true_name == name:
                return s
        raise KeyError(f"no statistics for rule {rule!r} and true reward {name!r}; rules: {list(self.rules)}")

    def table(self) -> list[dict]:
        """One row per (rule, true reward, family, method): the optimum, its interval, true and KL there.

        Best-of-n rows also carry Gao et al.'s n* and its interval.
        """
        rows = []
        for s in self.statistics:
            for o in s.optima:
                row = {
                    "rule": s.rule,
                    "true": s.true_name,
                    "family": o.family,
                    "parameter": o.parameter,
                    "method": o.method,
                    "optimum": o.value,
                    "low": o.low,
                    "high": o.high,
                    "status": o.status,
                    "true_mean": o.true_mean,
                    "kl": o.kl,
                }
                if o.family == "bon":
                    row.update({f"gao_{k}": s.gao.get(k, math.nan) for k in ("n", "n_low", "n_high", "kl")})
                rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return {
            "member_names": list(self.member_names),
            "true_names": list(self.true_names),
            "rules": list(self.rules),
            "uwo_lambda": self.uwo_lambda,
            "soft_n": self.soft_n,
            "n_prompts": self.n_prompts,
            "N": self.N,
            "n_resamples": self.n_resamples,
            "seed": self.seed,
            "statistics": [s.to_dict() for s in self.statistics],
            "frontier": {k: [dict(r) for r in v] for k, v in self.frontier.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> SelectionStatistics:
        return cls(
            tuple(data["member_names"]),
            tuple(data["true_names"]),
            tuple(data["rules"]),
            float(data["uwo_lambda"]),
            int(data["soft_n"]),
            int(data["n_prompts"]),
            int(data["N"]),
            int(data["n_resamples"]),
            int(data["seed"]),
            tuple(RuleStatistics.from_dict(s) for s in data["statistics"]),
            {k: [dict(r) for r in v] for k, v in data["frontier"].items()},
        )

    @classmethod
    def from_json(cls, text: str) -> SelectionStatistics:
        return cls.from_dict(json.loads(text))


# ---- computation ---------------------------------------------------------------------------


def _mean_se(pp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SE over prompts (axis 0) of the prompts that have a value (NaN: not reached)."""
    count = np.sum(~np.isnan(pp), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(pp, axis=0) if pp.size else np.full(pp.shape[1:], np.nan)
        sd = np.sqrt(np.nansum((pp - mean) ** 2, axis=0) / (count - 1))
        se = np.where(count >= 2, sd / np.sqrt(count), np.nan)
    return mean, se


def _every_n(N_min: int) -> np.ndarray:
    if N_min <= MAX_EVERY_N:
        return np.arange(1, N_min + 1, dtype=np.int64)
    return np.unique(np.round(np.geomspace(1, N_min, MAX_EVERY_N)).astype(np.int64))


@dataclass
class _RankedRule:
    """Per-prompt quantities of one rule that do not depend on the family grid's statistics."""

    bon_pp: np.ndarray  # (T, P, G_all): exact all-subsets estimates at every_n then ns (NaN past N_p)
    bop_pp: np.ndarray  # (T, P, M) true under capped BoP
    bop_proxy_pp: np.ndarray  # (P, M)
    bop_deriv_pp: np.ndarray  # (T, P, M)
    bop_bound_pp: np.ndarray  # (T, P, M)
    bop_kl_pp: np.ndarray  # (P, M)
    hedge_pp: np.ndarray  # (T, P, H)


def _rank_rule(agg, trues, every_n, mus, hedge_ns, true_range) -> _RankedRule:
    dense = isinstance(agg, np.ndarray)
    T = trues.shape[0] if dense else trues[0].shape[0]
    P = agg.shape[0] if dense else len(agg)
    G, M, H = len(every_n), len(mus), len(hedge_ns)
    out = _RankedRule(
        np.full((T, P, G), np.nan),
        np.full((T, P, M), np.nan),
        np.full((P, M), np.nan),
        np.full((T, P, M), np.nan),
        np.full((T, P, M), np.nan),
        np.full((P, M), np.nan),
        np.full((T, P, H), np.nan),
    )
    if dense:
        groups = [(np.arange(P), agg, trues)]
    else:
        lengths = np.array([len(r) for r in agg])
        groups = [
            (idx, np.stack([agg[i] for i in idx]), np.stack([trues[i] for i in idx], axis=1))
            for N in np.unique(lengths)
            if N > 0
            for idx in [np.flatnonzero(lengths == N)]
        ]
    for idx, p, t in groups:
        N = p.shape[1]
        sorted_p, sorted_t, new_group = rank_by_proxy(p, *list(t))
        tied = ~new_group.all(axis=1)
        reach = every_n <= N
        W = np.column_stack([bon_weights(N, int(n)) for n in every_n[reach]])
        Wb, dWb, tails = bop_rank_weights(N, mus)
        for k in range(T):
            st = sorted_t[k].reshape(p.shape)
            if tied.any():
                st[tied] = average_within_ties(st[tied], new_group[tied])
            out.bon_pp[k][np.ix_(idx, np.flatnonzero(reach))] = st @ W
            out.bop_pp[k][idx] = st @ Wb
            out.bop_deriv_pp[k][idx] = st @ dWb
            lo, hi = (t[k].min(axis=1), t[k].max(axis=1)) if true_range is None else true_range  # raw, not tie-averaged
            out.bop_bound_pp[k][idx] = np.outer(np.broadcast_to(np.asarray(hi) - np.asarray(lo), (len(idx),)), tails)
            out.hedge_pp[k][idx] = bon_derivative(st, hedge_ns)
        out.bop_proxy_pp[idx] = sorted_p @ Wb
        out.bop_kl_pp[idx] = bop_kl_per_prompt(sorted_p, new_group, mus, "auto")
    return out


def _gao(curve, bon_pp_at_ns: np.ndarray, ns: np.ndarray, hedge: HedgedOptimum, counts) -> dict:
    """Gao et al.'s Goodhart point (with interval) and its disagreement with HedgeTune's n*."""
    keys = ("n", "n_low", "n_high", "kl", "kl_low", "kl_high", "p_no_peak")
    try:
        interval = goodhart_interval(bon_pp_at_ns, ns, kl=curve.kl, n_resamples=max(1, counts.shape[0]), rng=0)
    except ValueError:
        return {**dict.fromkeys(keys, math.nan), "log_n_ratio": math.nan, "intervals_overlap": math.nan}
    out = {k: float(getattr(interval, k)) for k in keys}
    gao_n, hedge_n = out["n"], hedge.value
    if not (gao_n > 0 and hedge_n > 0):  # NaN: a point is missing
        ratio = math.nan
    elif math.isinf(gao_n) or math.isinf(hedge_n):  # one (or both) beyond the measured range
        ratio = 0.0 if gao_n == hedge_n else (math.inf if math.isinf(gao_n) else -math.inf)
    else:
        ratio = math.log(gao_n / hedge_n)
    overlap = math.nan
    if not any(math.isnan(v) for v in (out["n_low"], out["n_high"], hedge.low, hedge.high)):
        overlap = float(out["n_low"] <= hedge.high and hedge.low <= out["n_high"])
    out["log_n_ratio"] = ratio
    out["intervals_overlap"] = overlap
    return out


def compute_selection_statistics(
    inp: SelectionInput,
    *,
    rules: Sequence[str] | None = None,
    ns: object | None = None,
    lambdas: object = DEFAULT_LAMBDAS,
    mus: object | None = None,
    soft_n: int | None = None,
    uwo_lambda: float = DEFAULT_UWO_LAMBDA,
    n_subsets: int = 32,
    n_resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
    true_range: tuple[float, float] | None = None,
) -> SelectionStatistics:
    """Selection statistics of checked input (:func:`~bon_tracker.core.selection.selection_input`).

    Args:
        inp: members and true rewards.
        rules: rule names (ensemble rules and member names); default every member alone and,
            with two members or more, ``mean``, ``worst``, ``uwo``.
        ns: best-of-n grid (default powers of two up to the largest N, plus N).
        lambdas: soft best-of-n standardised lambdas (0 and inf allowed).
        mus: Best-of-Poisson grid (default :func:`default_mus` of the smallest N).
        soft_n: candidates per soft pick (default a quarter of the smallest N, between 1 and 64).
        uwo_lambda: UWO's variance penalty.
        n_subsets: random subsets per prompt for soft best-of-n.
        n_resamples: bootstrap resamples of prompts for every interval.
        seed: seed of the subsets and the resamples (same data, same statistics).
        level: two-sided level of the intervals.
        true_range: a known ``(min, max)`` of the true reward for Best-of-Poisson's truncation
            bound (default: each prompt's observed min and max).
    """
    counts_per_prompt = inp.sample_counts()
    if counts_per_prompt.min() < 1:
        raise ValueError(
            "every prompt needs at least one sample for selection statistics (some have none after omitting NaN)"
        )
    N_min, N_max = int(counts_per_prompt.min()), int(counts_per_prompt.max())
    rule_names = check_rules(rules, inp.member_names)
    ns_arr = default_ns(N_max) if ns is None else np.unique(check_ns(ns, N_max)[0])
    lam = check_lambdas(lambdas)
    mu_arr = default_mus(N_min) if mus is None else check_mus(mus)
    for name, grid in (("ns", ns_arr), ("lambdas", lam), ("mus", mu_arr)):
        if len(grid) > MAX_GRID:
            raise ValueError(f"{name} has {len(grid)} points; at most {MAX_GRID} (a bounded record per eval)")
    soft_n = max(1, min(64, N_min // 4)) if soft_n is None else soft_n
    if isinstance(uwo_lambda, bool) or not isinstance(uwo_lambda, (int, float)) or not math.isfinite(uwo_lambda):
        raise ValueError(f"uwo_lambda must be a finite number, got {uwo_lambda!r}")
    P = inp.n_prompts
    counts = prompt_resample_counts(P, n_resamples, seed) if P >= 2 else np.ones((1, max(P, 1)))
    every_n = _every_n(N_min)
    hedge_ns = np.geomspace(1.0, float(N_min), HEDGE_GRID) if N_min > 1 else np.array([1.0])
    stats: list[RuleStatistics] = []
    points: dict[str, list[FrontierPoint]] = {name: [] for name in inp.true_names}
    options = {"level": level, "counts": counts}
    for rule in rule_names:
        agg = rule_scores(inp, rule, uwo_lambda)
        ranked = _rank_rule(agg, inp.trues, every_n, mu_arr, hedge_ns, true_range)
        every_kl = _kl_at_every_n(agg, every_n)
        soft = soft_bon_estimates(agg, inp.trues, int(soft_n), lam, n_subsets=n_subsets, rng=seed)
        bop_kl, _ = _mean_se(ranked.bop_kl_pp)
        bop_proxy, bop_proxy_se = _mean_se(ranked.bop_proxy_pp)
        soft_kl, _ = _mean_se(soft.kl)
        soft_proxy, soft_proxy_se = _mean_se(soft.proxy)
        for k, true_name in enumerate(inp.true_names):
            true_k = inp.trues[k] if inp.dense else [row[k] for row in inp.trues]
            curve = bon_curve(agg, true_k, ns_arr)
            at_ns = _estimates_at(agg, true_k, ns_arr)
            every_mean, _ = _mean_se(ranked.bon_pp[k])
            bon_root = derivative_root(
                "bon", "n", hedge_ns, ranked.hedge_pp[k], origin=1.0, curve_grid=every_n.astype(float),
                curve_true=every_mean, curve_kl=every_kl, **options,
            )  # fmt: skip
            bon_best = curve_argmax("bon", "n", every_n, ranked.bon_pp[k], every_kl, **options)
            bop_mean, bop_se = _mean_se(ranked.bop_pp[k])
            bop_root = derivative_root(
                "bop", "mu", mu_arr, ranked.bop_deriv_pp[k], origin=0.0, curve_grid=mu_arr,
                curve_true=bop_mean, curve_kl=bop_kl, **options,
            )  # fmt: skip
            bop_best = curve_argmax("bop", "mu", mu_arr, ranked.bop_pp[k], bop_kl, **options)
            soft_mean, soft_se = _mean_se(soft.true[k])
            finite = np.isfinite(lam)
            soft_root = derivative_root(
                "soft", "lambda", lam[finite], soft.deriv[k][:, finite], origin=0.0, curve_grid=lam[finite],
                curve_true=soft_mean[finite], curve_kl=soft_kl[finite], **options,
            )  # fmt: skip
            soft_best = curve_argmax("soft", "lambda", lam, soft.true[k], soft_kl, **options)
            bound, _ = _mean_se(ranked.bop_bound_pp[k])
            curves = (
                FamilyCurve(
                    "bon", "n", _floats(curve.n), _floats(curve.kl), _floats(curve.kl_bound), _floats(curve.true_mean),
                    _floats(curve.true_se), _floats(curve.proxy_mean), _floats(curve.proxy_se),
                    (0.0,) * len(curve.n), (True,) * len(curve.n),
                ),
                FamilyCurve(
                    "bop", "mu", _floats(mu_arr), _floats(bop_kl), _floats(kl_bop(mu_arr)), _floats(bop_mean),
                    _floats(bop_se), _floats(bop_proxy), _floats(bop_proxy_se), _floats(bound), (True,) * len(mu_arr),
                ),
                FamilyCurve(
                    "soft", "lambda", _floats(lam), _floats(soft_kl), (math.nan,) * len(lam), _floats(soft_mean),
                    _floats(soft_se), _floats(soft_proxy), _floats(soft_proxy_se), (0.0,) * len(lam),
                    tuple(bool(x) for x in soft.exact), float(soft.scale),
                ),
            )  # fmt: skip
            gao = _gao(curve, at_ns, ns_arr, bon_root, counts)
            stats.append(
                RuleStatistics(
                    rule, true_name, curves, (bon_root, bon_best, bop_root, bop_best, soft_root, soft_best), gao
                )
            )
            for c in curves:
                for i, value in enumerate(c.values):
                    points[true_name].append(
                        FrontierPoint(rule, c.family, value, c.kl[i], c.true_mean[i], c.true_se[i])
                    )
    frontier = {}
    for name, pts in points.items():
        ranked_pts = [p for p in pts if p.family in ("bon", "bop")]
        budgets = kl_budgets(ranked_pts, FRONTIER_BUDGETS)
        frontier[name] = [
            {"kl_budget": float(b), **(best.to_dict() if best is not None else {})}
            for b, best in zip(budgets, best_at_budgets(ranked_pts, budgets))
        ]
    return SelectionStatistics(
        inp.member_names, inp.true_names, rule_names, float(uwo_lambda), int(soft_n), int(P), N_max,
        int(counts.shape[0]), int(seed), tuple(stats), frontier,
    )  # fmt: skip


def _kl_at_every_n(agg, every_n: np.ndarray) -> np.ndarray:
    """Mean KL over prompts (``bon_curve``'s rule) at every n of the grid; computed exactly at up to
    ``KL_POINTS`` of them and interpolated in log n between (the KL is smooth in log n), since each
    n costs a pass over every proxy level."""
    if len(every_n) <= KL_POINTS:
        return np.nanmean(discrete_kl_per_prompt(agg, every_n, "auto"), axis=0)
    picks = np.unique(np.round(np.geomspace(1, len(every_n), KL_POINTS)).astype(np.int64) - 1)
    at = np.nanmean(discrete_kl_per_prompt(agg, every_n[picks], "auto"), axis=0)
    return np.interp(np.log(every_n), np.log(every_n[picks]), at)


def _estimates_at(agg, true_k, ns: np.ndarray) -> np.ndarray:
    """Per-prompt all-subsets estimates at the grid ``ns`` (NaN past a prompt's N), for Gao's interval."""
    return np.atleast_2d(bon_estimate(agg, true_k, ns))
