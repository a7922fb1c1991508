"""The tracker judged against real overoptimization: the Goodhart lab over held-out seeds.

Runs the plain-torch lab (``bon_tracker.lab.loop``) on seeds never used to set anything
(HELDOUT_SEEDS), at the default settings, at two other K, and at a KL coefficient large
enough that nothing peaks; prints:

1. the share of seeds where the gold reward (held-out sample of 2,048) peaks and falls by
   >= 3 SE while the proxy rises (goal >= 80 %);
2. the first alert of the default ``AlertRules`` against that real peak, in evals (goal:
   0..+2 in >= 90 % of peaked seeds, never < -2; <= 5 % of the large-KL runs alert);
3. the Goodhart KL predicted from the first third of the evals — Gao et al.'s RL form
   ``d (alpha - beta log d)`` fitted to the policy's (KL, gold) points, interval from
   resampling those points within their SEs — and the tracker's best-of-n Goodhart KL of the
   first eval (the initial policy), against the KL where gold really peaks;
4. a table over K (gold labels): Gao et al.'s scaling in miniature;
5. alert rules other than the defaults, replayed on the same records, on the tuning seeds and
   the held-out seeds (retuning the defaults is the lead's call).

Seeds: TUNING_SEEDS (0-2) are the ones the lab's settings (learning rate, KL coefficients,
sizes) were chosen on and the quick mode's seed; the alert defaults were tuned on the
simulated family of ``benchmarks/bench_alerts.py``, never on a lab run. HELDOUT_SEEDS are
disjoint from both.

    nice -n 10 python benchmarks/bench_lab.py               # the whole benchmark, 2 worker processes
    python benchmarks/bench_lab.py --heldout 3 --k-seeds 2  # a shorter look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

import numpy as np

TUNING_SEEDS = (0, 1, 2)
HELDOUT_SEEDS = tuple(range(100, 110))
DEFAULT_K = 1000
OTHER_K = (250, 4000)
NO_PEAK_KL_COEF = 0.6  # at 0.6 the KL-regularised optimum stays where gold still rises (KL ~2.5 nats)
CANDIDATE_RULES = {  # replayed on the records; the first is the default
    "default": {},
    "fall_z=2.5": {"fall_z": 2.5},
    "fall_z=2.0": {"fall_z": 2.0},
    "window=2": {"window": 2},
    "window=5": {"window": 5},
    "fall_z=2.5,window=2": {"fall_z": 2.5, "window": 2},
    "fall_z=2.5,window=5": {"fall_z": 2.5, "window": 5},
}


def kl_text(kl: float) -> str:
    """A KL for the tables: three digits, or 'beyond 1000' for the RL fit's absurd extrapolations."""
    if not math.isfinite(kl) or kl > 1000:
        return "beyond 1000" if not math.isnan(kl) else "nan"
    return f"{kl:.3g}"


def run_one(settings: dict) -> dict:
    """One lab run in a worker process: what the benchmark needs of it, picklable."""
    from bon_tracker.core.alerts import EvalSummary
    from bon_tracker.lab.loop import LabConfig, run_lab

    config = LabConfig(**settings)
    cpu_started = time.process_time()
    with tempfile.TemporaryDirectory(prefix="bench-lab-") as tmp:
        result = run_lab(config, root=tmp, run_name="run", spool_dir=os.path.join(tmp, "spool"), charts=False)
    summaries = [
        EvalSummary.from_curve(r.step, r.curve, policy_kl=r.policy.kl, interval=r.interval).to_dict()
        for r in result.records
    ]
    reference = result.records[0].interval
    out = result.to_dict()
    out["summaries"] = summaries
    out["eval_true_se"] = [float(r.curve.true_se[0]) for r in result.records]
    out["reference_kl"] = None if reference is None else [reference.kl, reference.kl_low, reference.kl_high]
    out["cpu_seconds"] = time.process_time() - cpu_started
    return out


def first_alert_index(summaries: list[dict], rules: dict) -> int | None:
    """The eval index of the first alert onset when ``rules`` replace the defaults."""
    from bon_tracker.core.alerts import AlertMonitor, AlertRules, EvalSummary

    monitor = AlertMonitor(AlertRules(**rules))
    for index, data in enumerate(summaries):
        if any(event.kind == "onset" for event in monitor.update(EvalSummary.from_dict(data))):
            return index
    return None


def predicted_goodhart_kl(run: dict, rng: np.random.Generator, resamples: int = 400) -> tuple[float, float, float]:
    """Gao's RL form fitted to the first third of the evals (tracker's n = 1 gold means):
    the peak KL and a 95 % interval from resampling each point within its SE (inf: no peak)."""
    from bon_tracker.core.fit import fit_rl_overoptimization

    evals = run["evals"]
    count = max(3, math.ceil(len(evals) / 3))
    kl = np.array([e["policy_kl"] for e in evals[:count]])
    gold = np.array([e["eval_gold_mean"] for e in evals[:count]])
    se = np.array(run["eval_true_se"][:count])

    def peak(values: np.ndarray) -> float:
        fit = fit_rl_overoptimization(kl[1:], values[1:], baseline=values[0])
        if not fit.has_peak:
            return math.inf
        try:
            return fit.peak_kl
        except OverflowError:  # exp(alpha / beta - 1) ** 2 past float range: a peak far beyond anything
            return math.inf

    draws = np.array([peak(gold + se * rng.standard_normal(count)) for _ in range(resamples)])
    draws = np.minimum(draws, 1e300)  # no peak (inf) sorts last; quantiles of inf would be nan

    def quantile(q: float) -> float:
        value = float(np.quantile(draws, q))
        return math.inf if value >= 1e300 else value

    return peak(gold), quantile(0.025), quantile(0.975)


def mean(values: list[float]) -> float:
    return float(np.mean(values))


def describe(runs: list[dict], label: str, rng: np.random.Generator) -> None:
    peaked = [r for r in runs if r["peaked"]]
    delays = [r["first_alert_index"] - r["peak_index"] for r in peaked if r["first_alert_index"] is not None]
    missed = sum(r["first_alert_index"] is None for r in peaked)
    within = sum(0 <= d <= 2 for d in delays)
    early = sum(d < -2 for d in delays)
    print(f"\n== {label}: {len(runs)} seeds ==")
    print(
        f"gold peaks and falls >= 3 SE while proxy rises: {len(peaked)}/{len(runs)} "
        f"({100 * len(peaked) / len(runs):.0f} %)"
    )
    if peaked:
        print(
            f"first alert - real peak (evals): {sorted(delays)}; no alert: {missed}; "
            f"within 0..+2: {within}/{len(peaked)} ({100 * within / len(peaked):.0f} %, goal >= 90 %); "
            f"more than 2 before: {early} (goal 0)"
        )
        rules = {}
        for r in peaked:
            first = r["first_alert_index"]
            if first is not None:
                step = r["evals"][first]["step"]
                for rule in sorted({a["rule"] for a in r["alerts"] if a["step"] == step}):
                    rules[rule] = rules.get(rule, 0) + 1
        print(f"rules of the first alert: {rules}")
    errors, covered, bon_errors, bon_covered, bon_count = [], 0, [], 0, 0
    for r in peaked:
        true_kl = r["evals"][r["peak_index"]]["policy_kl"]
        estimate, low, high = predicted_goodhart_kl(r, rng)
        r["predicted_kl"] = [estimate, low, high]
        errors.append(math.log(estimate / true_kl) if math.isfinite(estimate) and estimate > 0 else math.inf)
        covered += low <= true_kl <= high
        if r["reference_kl"] is not None and math.isfinite(r["reference_kl"][0]) and r["reference_kl"][0] > 0:
            bon_count += 1
            bon_errors.append(math.log(r["reference_kl"][0] / true_kl))
            bon_covered += r["reference_kl"][1] <= true_kl <= r["reference_kl"][2]
    if peaked:
        finite = [e for e in errors if math.isfinite(e)]
        factor = math.exp(min(np.median(np.abs(finite)), 700)) if finite else math.nan
        print(
            f"Goodhart KL from the first third of evals (RL fit): median factor off {kl_text(factor)}, "
            f"no peak predicted: {len(errors) - len(finite)}/{len(errors)}, "
            f"95 % interval covers: {covered}/{len(peaked)}"
        )
        print(
            "  per seed (true KL at peak, predicted [interval]): "
            + "; ".join(
                f"{r['evals'][r['peak_index']]['policy_kl']:.1f} vs {kl_text(r['predicted_kl'][0])} "
                f"[{kl_text(r['predicted_kl'][1])}, {kl_text(r['predicted_kl'][2])}]"
                for r in peaked
            )
        )
        if bon_count:
            print(
                f"Goodhart KL of the first eval's best-of-16 curve (tracker): median factor off "
                f"{math.exp(np.median(np.abs(bon_errors))):.2f} "
                f"(median signed log ratio {np.median(bon_errors):+.2f}), "
                f"interval covers {bon_covered}/{bon_count} "
                f"(resolved in {bon_count}/{len(peaked)} seeds)"
            )
        else:
            print(f"Goodhart KL of the first eval's best-of-16 curve (tracker): resolved in 0/{len(peaked)} seeds")


def replay_rules(groups: dict[str, list[dict]], no_peak: list[dict]) -> None:
    print("\n== alert rules replayed on the same records (first alert - peak, peaked seeds; alerts at large KL) ==")
    for name, rules in CANDIDATE_RULES.items():
        parts = []
        for label, runs in groups.items():
            peaked = [r for r in runs if r["peaked"]]
            delays = [first_alert_index(r["summaries"], rules) for r in peaked]
            delays = [None if d is None else d - r["peak_index"] for d, r in zip(delays, peaked, strict=True)]
            within = sum(d is not None and 0 <= d <= 2 for d in delays)
            early = sum(d is not None and d < -2 for d in delays)
            parts.append(f"{label}: within 0..+2 {within}/{len(peaked)}, < -2: {early}")
        alarms = sum(first_alert_index(r["summaries"], rules) is not None for r in no_peak)
        parts.append(f"large KL alerting {alarms}/{len(no_peak)}")
        print(f"{name:>12}: " + "; ".join(parts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=len(HELDOUT_SEEDS), help="held-out seeds at the defaults")
    parser.add_argument("--k-seeds", type=int, default=5, help="held-out seeds for each other K")
    parser.add_argument("--no-peak-seeds", type=int, default=10, help="held-out seeds at the large KL coefficient")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--evals", type=int, default=16, help="evals per run (the figures in docs/lab.md: 16)")
    parser.add_argument("--json", metavar="FILE", help="write every run's summary there (before the analysis)")
    parser.add_argument("--from-json", metavar="FILE", help="analyse the runs of an earlier --json instead of running")
    parser.add_argument("--smoke", action="store_true", help="tiny runs that only check the script (no figures)")
    args = parser.parse_args()
    from bon_tracker.lab.loop import LabConfig

    base = LabConfig(labels=DEFAULT_K, evals=args.evals, threads=1)
    if args.smoke:
        base = replace(base, evals=4, steps_per_eval=2, heldout=256)
    heldout = HELDOUT_SEEDS[: args.heldout]
    jobs: dict[str, list[dict]] = {
        "tuning seeds (defaults)": [replace(base, seed=s).__dict__ for s in TUNING_SEEDS],
        f"K={DEFAULT_K} (defaults)": [replace(base, seed=s).__dict__ for s in heldout],
        **{
            f"K={k}": [replace(base, labels=k, seed=s).__dict__ for s in HELDOUT_SEEDS[: args.k_seeds]] for k in OTHER_K
        },
        f"kl_coef={NO_PEAK_KL_COEF}": [
            replace(base, kl_coef=NO_PEAK_KL_COEF, seed=s).__dict__ for s in HELDOUT_SEEDS[: args.no_peak_seeds]
        ],
    }
    if args.from_json:
        with open(args.from_json) as fh:
            saved = json.load(fh)
        results, wall = saved["results"], saved["wall_seconds"]
    else:
        started = time.perf_counter()
        flat = [(label, settings) for label, group in jobs.items() for settings in group]
        print(f"{len(flat)} lab runs on {args.workers} worker processes (1 torch thread each); held-out seeds "
              f"{heldout}, tuning seeds {TUNING_SEEDS}", flush=True)  # fmt: skip
        with ProcessPoolExecutor(args.workers) as pool:
            outputs = list(pool.map(run_one, [settings for _, settings in flat]))
        results = {label: [] for label in jobs}
        for (label, _), out in zip(flat, outputs, strict=True):
            results[label].append(out)
        wall = time.perf_counter() - started
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"results": results, "wall_seconds": wall}, fh)
    runs_flat = [r for group in results.values() for r in group]
    print(
        f"wall {wall / 60:.1f} min; one run: {np.median([r['seconds'] for r in runs_flat]):.0f} s wall, "
        f"{np.median([r['cpu_seconds'] for r in runs_flat]):.0f} s CPU (medians; load average now "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)"
    )

    rng = np.random.default_rng(0)
    for label, runs in results.items():
        if not label.startswith("kl_coef"):
            describe(runs, label, rng)
    no_peak = results[f"kl_coef={NO_PEAK_KL_COEF}"]
    alarms = sum(r["first_alert_index"] is not None for r in no_peak)
    peaked_anyway = sum(r["peaked"] for r in no_peak)
    print(f"\n== kl_coef={NO_PEAK_KL_COEF}: {len(no_peak)} seeds ==")
    print(
        f"runs with any alert: {alarms}/{len(no_peak)} ({100 * alarms / len(no_peak):.0f} %, goal <= 5 %); "
        f"runs whose gold peaked anyway: {peaked_anyway}; final KL "
        f"{np.median([r['evals'][-1]['policy_kl'] for r in no_peak]):.2f} nats (median)"
    )

    print("\n== Gao et al.'s scaling in miniature (held-out seeds; means over the peaked seeds) ==")
    print(
        f"{'K':>6} {'seeds':>6} {'peaked':>7} {'proxy R2':>9} {'peak eval':>10} {'KL at peak':>11} "
        f"{'gold at peak':>13} {'gold gain':>10}"
    )
    for k in sorted((DEFAULT_K, *OTHER_K)):
        runs = results[f"K={k} (defaults)" if k == DEFAULT_K else f"K={k}"]
        peaked = [r for r in runs if r["peaked"]] or runs

        print(
            f"{k:>6} {len(runs):>6} {sum(r['peaked'] for r in runs):>7} "
            f"{mean([r['proxy_fit_r2'] for r in runs]):>9.2f} "
            f"{mean([r['peak_index'] for r in peaked]):>10.1f} "
            f"{mean([r['evals'][r['peak_index']]['policy_kl'] for r in peaked]):>11.2f} "
            f"{mean([r['evals'][r['peak_index']]['gold_mean'] for r in peaked]):>13.3f} "
            f"{mean([r['evals'][r['peak_index']]['gold_mean'] - r['evals'][0]['gold_mean'] for r in peaked]):>10.3f}"
        )
    replay_rules({k: v for k, v in results.items() if not k.startswith("kl_coef")}, no_peak)


if __name__ == "__main__":
    main()
