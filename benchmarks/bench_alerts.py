"""Alerts and intervals measured in simulation (bon_tracker.core.simulation), in one run.

    python benchmarks/bench_alerts.py            # full: 400 runs per cell (about 2 minutes)
    python benchmarks/bench_alerts.py --quick    # 60 runs per cell, a smoke run
    python benchmarks/bench_alerts.py --seed 1   # the seeds the default thresholds were chosen on

The detection table's runs use ``simulated_runs(..., seed=S)`` for peaked and ``S + 1`` for
rising runs. The default thresholds of ``AlertRules`` were chosen on S = 1 (seeds 1, 2);
the default S = 3 (seeds 3, 4) are fresh runs, never used to choose them.

1. Detection: on peaked runs (the policy's true reward peaks at a known eval) the delay,
   in evals, of the first alert after the peak, and the share of runs alerted by
   peak + 2 evals (goal >= 95 % at 64 prompts x 16 samples); on runs whose rewards keep
   rising the share of runs with any alert (the false-alarm rate per run, goal <= 1 %).
   Per rule and for the default rule set, with counts and 95 % Wilson intervals.
2. Coverage of the 95 % interval of the Goodhart point (n*, KL*, peak gain) against the
   exact peak of the best-of-n curve (quadrature), over prompt counts P and samples N
   (goal 93-97 %).
3. Prediction from small n: fit on n <= N/8 of N samples, predict the true and proxy
   curve at the held-out n; error against the exact curve and against the held-out
   all-subsets estimates, and coverage of the 95 % prediction interval.
4. Cost per eval on the training thread (ms): the interval, the monitor update.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from bon_tracker.core import bon_curve, bon_estimate, default_ns
from bon_tracker.core.agreement import topq_agreement
from bon_tracker.core.alerts import RULES, AlertMonitor, AlertRules, EvalSummary
from bon_tracker.core.prediction import predict_curve
from bon_tracker.core.simulation import SimulationModel, simulated_runs
from bon_tracker.core.uncertainty import goodhart_interval


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion k / n."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)


def pct(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:5.1f} [{100 * lo:4.1f},{100 * hi:5.1f}]"


def run_onsets(run, rules: AlertRules) -> dict[str, int | None]:
    """First onset eval index of each rule in one simulated run (None: never fired)."""
    monitor = AlertMonitor(rules)
    ns = default_ns(run.n_samples)
    first: dict[str, int | None] = dict.fromkeys(RULES)
    for i, proxy, true, policy_kl in run.evals():
        curve = bon_curve(proxy, true, ns)
        interval = goodhart_interval(bon_estimate(proxy, true, ns), ns, n_resamples=400, rng=i)
        summary = EvalSummary.from_curve(i, curve, policy_kl=policy_kl, interval=interval)
        for event in monitor.update(summary):
            if event.kind == "onset" and first[event.rule] is None:
                first[event.rule] = i
    return first


RULE_SETS = {
    "default (all)": RULES,
    "peak rules 1-3": RULES[:3],
    "policy_true_falls": ("policy_true_falls",),
    "bon_true_falls": ("bon_true_falls",),
    "goodhart_kl": ("goodhart_kl",),
    "headroom_shrinks": ("headroom_shrinks",),
}


def detection(n_runs: int, cells: list[tuple[int, int, float]], seed: int = 3) -> list[str]:
    rules = AlertRules()
    misses = []
    print(
        f"\n1. Detection (default AlertRules; {n_runs} runs per cell; seeds {seed} (peaked), {seed + 1} (rising);"
        " % [95 % Wilson interval])"
    )
    print("   delay = first alert's eval - the true peak's eval; 'by peak+2': delay <= 2 (earlier counts)")
    header = f"{'P x N':>9} {'noise':>5} {'rules':<18}{'peaked: by peak+2':>22}{'fired <= peak-1':>17}"
    header += f"{'<= peak-3':>17}{'median delay':>13}{'never':>7}{'rising: any alert':>22}"
    print(header)
    for P, N, noise in cells:
        family = {"n_prompts": P, "n_samples": N, "noise": noise}
        peaked_runs = simulated_runs("peaked", n_runs, seed=seed, **family)
        peaked = [run_onsets(r, rules) for r in peaked_runs]
        peaks = [r.peak_eval for r in peaked_runs]
        rising = [run_onsets(r, rules) for r in simulated_runs("rising", n_runs, seed=seed + 1, **family)]
        for name, members in RULE_SETS.items():
            delays = []
            for onsets, peak in zip(peaked, peaks):
                fired = [onsets[m] for m in members if onsets[m] is not None]
                delays.append(min(fired) - peak if fired else None)
            hit = sum(d is not None and d <= 2 for d in delays)
            early = sum(d is not None and d < 0 for d in delays)
            too_early = sum(d is not None and d <= -3 for d in delays)
            never = sum(d is None for d in delays)
            finite = [d for d in delays if d is not None]
            med = f"{np.median(finite):+.1f}" if finite else "-"
            false = sum(any(o[m] is not None for m in members) for o in rising)
            print(
                f"{P:>4} x {N:<3} {noise:>5.1f} {name:<18}{pct(hit, n_runs):>22}{pct(early, n_runs):>17}"
                f"{pct(too_early, n_runs):>17}{med:>13}{never:>7}{pct(false, n_runs):>22}"
            )
            if name == "default (all)":
                if hit / n_runs < 0.95:
                    misses.append(f"P={P} N={N} noise={noise}: alerted by peak+2 in {100 * hit / n_runs:.1f} % < 95 %")
                if false / n_runs > 0.01:
                    misses.append(f"P={P} N={N} noise={noise}: false alarms {100 * false / n_runs:.1f} % > 1 %")
    return misses


def coverage(reps: int, cells: list[tuple[int, int]], models: list[SimulationModel]) -> list[str]:
    print(f"\n2. Coverage of the 95 % Goodhart-point interval (percentile bootstrap of prompts, B = 1000; {reps} reps)")
    print(f"{'model':>16} {'exact n*':>9} {'P':>5} {'N':>4}{'n*':>20}{'KL*':>20}{'gain':>20}{'median n* interval':>24}")
    misses = []
    for model in models:
        peak = model.bon_peak()
        for P, N in cells:
            ns = default_ns(N)
            rng = np.random.default_rng(P * 1000 + N)
            hits = np.zeros(3, dtype=int)
            widths = []
            for r in range(reps):
                proxy, true = model.sample(model.draw_prompts(P, rng), N, 0.0, rng)
                ci = goodhart_interval(bon_estimate(proxy, true, ns), ns, rng=r)
                hits += [
                    ci.n_low <= peak["n"] <= ci.n_high,
                    ci.kl_low <= peak["kl"] <= ci.kl_high,
                    ci.gain_low <= peak["gain"] <= ci.gain_high,
                ]
                widths.append((ci.n_low, ci.n_high))
            lo, hi = np.median(np.array(widths), axis=0)
            print(
                f"{'gamma=' + format(model.gamma, '.3g'):>16} {peak['n']:>9.1f} {P:>5} {N:>4}"
                f"{pct(hits[0], reps):>20}{pct(hits[1], reps):>20}{pct(hits[2], reps):>20}{f'[{lo:.3g}, {hi:.3g}]':>24}"
            )
            for name, k in zip(("n*", "KL*", "gain"), hits):
                if not 0.93 <= k / reps <= 0.97:
                    misses.append(f"coverage of {name}: {100 * k / reps:.1f} % at gamma={model.gamma:.3g} P={P} N={N}")
    return misses


def prediction(reps: int, models: list[SimulationModel], P: int = 256, N: int = 1024) -> list[str]:
    print(f"\n3. Prediction from small n: fit on n <= N/8 = {N // 8} of N = {N} samples, P = {P} prompts; {reps} reps")
    print("   error = predicted - exact (gain over n = 1); coverage of the 95 % prediction interval (prompt bootstrap)")
    print(f"{'model':>12} {'n':>5} {'exact true':>11}{'mean err':>10}{'rmse':>8}{'vs held-out':>12}{'cover exact':>20}")
    misses = []
    ns_all = default_ns(N)
    fit_ns = ns_all[ns_all <= N // 8]
    held = ns_all[ns_all > N // 8]
    for model in models:
        exact = model.bon_gain(held)[0]
        rng = np.random.default_rng(11)
        errs, errs_held, cover = [], [], []
        for r in range(reps):
            proxy, true = model.sample(model.draw_prompts(P, rng), N, 0.0, rng)
            true_pp = bon_estimate(proxy, true, ns_all)
            proxy_pp = bon_estimate(proxy, proxy, ns_all)
            cols = np.isin(ns_all, fit_ns)
            pred = predict_curve(true_pp[:, cols], proxy_pp[:, cols], fit_ns, held, rng=r, n_resamples=400)
            errs.append(pred.true_gain - exact)
            held_gain = (true_pp - true_pp[:, :1]).mean(axis=0)[~cols]
            errs_held.append(pred.true_gain - held_gain)
            cover.append((pred.true_gain_low <= exact) & (exact <= pred.true_gain_high))
        errs, errs_held, cover = np.array(errs), np.array(errs_held), np.array(cover)
        for j, n in enumerate(held):
            k = int(cover[:, j].sum())
            print(
                f"{'g=' + format(model.gamma, '.3g'):>12} {n:>5} {exact[j]:>11.3f}{errs[:, j].mean():>+10.3f}"
                f"{math.sqrt((errs[:, j] ** 2).mean()):>8.3f}{math.sqrt((errs_held[:, j] ** 2).mean()):>12.3f}"
                f"{pct(k, reps):>20}"
            )
            if k / reps < 0.90:
                misses.append(
                    f"prediction interval at n={n} (gamma={model.gamma:.3g}) covers the exact curve"
                    f" in {100 * k / reps:.1f} %"
                )
    return misses


def cost() -> None:
    print("\n4. Cost per eval (ms, best of 20; one core)")
    print(f"{'P x N':>12}{'bon_curve':>11}{'interval':>10}{'agreement':>11}{'monitor':>9}")
    rng = np.random.default_rng(0)
    for P, N in ((64, 16), (256, 64), (1000, 64), (1000, 256)):
        proxy = rng.normal(size=(P, N))
        true = proxy + rng.normal(size=(P, N)) - 0.3 * proxy**2
        ns = default_ns(N)
        true_pp = bon_estimate(proxy, true, ns)
        curve = bon_curve(proxy, true, ns)
        interval = goodhart_interval(true_pp, ns)
        summary = EvalSummary.from_curve(0, curve, policy_kl=1.0, interval=interval)

        def best(fn):
            times = []
            for _ in range(20):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return 1e3 * min(times)

        def monitor_step(summary=summary):
            AlertMonitor().update(summary)

        t_curve = best(lambda p=proxy, t=true, g=ns: bon_curve(p, t, g))
        t_int = best(lambda tp=true_pp, g=ns: goodhart_interval(tp, g))
        t_agree = best(lambda p=proxy, t=true: topq_agreement(p, t))
        t_mon = best(monitor_step)
        print(f"{P:>5} x {N:<5}{t_curve:>11.2f}{t_int:>10.2f}{t_agree:>11.2f}{t_mon:>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="60 runs per cell, for a smoke run")
    parser.add_argument(
        "--seed", type=int, default=3, help="detection runs: seed S (peaked) and S + 1 (rising); default 3 (fresh)"
    )
    args = parser.parse_args()
    start = time.perf_counter()
    n_runs = 60 if args.quick else 400
    cells = [(64, 16, 0.5), (64, 16, 1.0), (64, 16, 2.0), (256, 16, 1.0), (64, 64, 1.0)]
    misses = detection(n_runs, cells if not args.quick else cells[:2], seed=args.seed)
    models = [SimulationModel(gamma=0.8 / 3), SimulationModel(gamma=0.2)]
    cov_cells = [(64, 16), (64, 64), (256, 16), (256, 64), (1000, 64)]
    misses += coverage(100 if args.quick else 400, cov_cells if not args.quick else cov_cells[:2], models)
    misses += prediction(20 if args.quick else 100, [SimulationModel(gamma=0.2), SimulationModel(gamma=0.1)])
    cost()
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    print("\nWhere a goal is missed:" if misses else "\nEvery goal is met.")
    for line in misses:
        print(f"  MISSED: {line}")


if __name__ == "__main__":
    main()
