"""The main demo: watch Goodhart's law arrive in a simulated RL run.

A policy is trained against a proxy reward. Each sample has a real quality q and an
"exploit" e that the proxy likes but the true reward punishes:

    proxy = q + e + heavy-tailed error (Student t, 2 degrees of freedom)
    true  = q - 0.3 e^2

Training raises both q (real progress, which saturates) and e (reward hacking, which
keeps growing), so the policy's proxy score keeps rising while its true score peaks and
falls. At each eval step the demo samples N completions for each of P prompts, logs
them through BonTracker on the embedded local backend, and prints the best-of-n curve
and its Goodhart point: the n past which best-of-n selection lowers the true reward, with
its 95 % interval. Once the true reward turns, the tracker's alerts fire (printed below,
and in the report's Alerts section).

    python examples/demo.py [--root bon_runs] [--steps 8] [--prompts 256] [--samples 64] [--new-run]
                            [--members K] [--frontier-step STEP] [--frontier-png PATH]

Each run replaces the folder of the previous one (bon_runs/demo) unless --new-run is given.

With --members K (K >= 2) the proxy is an ensemble of K reward models,

    rm_k = q + e + its own heavy-tailed error (the same law, drawn independently per member)

sharing the exploit e (the correlated part of the hack) and not their errors. Each eval
then carries the selection statistics of every rule (each member, mean, worst, uwo;
docs/selection.md), the deployed rule (mean) gives the curve and the alerts, and after the
run the demo prints each rule's optimum at one eval: --frontier-step (default: the eval
where the policy's true reward peaked, the checkpoint one would keep). --frontier-png PATH
writes that eval's frontier chart (bon_tracker.reports.selection_charts.frontier_chart) to PATH.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np

from bon_tracker import BonTracker
from bon_tracker.reports.text import curve_table, where_to_look


def _policy_samples(rng: np.random.Generator, progress: float, prompts: int, samples: int):
    """Quality q, exploit e and the policy's KL after `progress` (0..1) of training."""
    quality_mean = 1.5 * (1 - math.exp(-3 * progress))  # real skill: saturates
    exploit_mean = 2.0 * progress  # reward hacking: keeps growing
    difficulty = rng.normal(0.0, 0.5, size=(prompts, 1))  # some prompts are harder
    quality = quality_mean + difficulty + rng.normal(size=(prompts, samples))
    exploit = np.abs(exploit_mean + 0.5 * rng.normal(size=(prompts, samples)))
    policy_kl = 0.5 * (quality_mean**2 + exploit_mean**2)  # KL of the shifted Gaussians from the start
    return quality, exploit, policy_kl


def _reward_model_error(rng: np.random.Generator, prompts: int, samples: int) -> np.ndarray:
    """A reward model's own error: heavy-tailed (Student t, 2 degrees of freedom, scale 0.7)."""
    return 0.7 * rng.standard_t(2, size=(prompts, samples))


def sample_scores(rng: np.random.Generator, progress: float, prompts: int, samples: int):
    """Proxy and true scores of the policy after `progress` (0..1) of training."""
    quality, exploit, policy_kl = _policy_samples(rng, progress, prompts, samples)
    proxy = quality + exploit + _reward_model_error(rng, prompts, samples)
    true = quality - 0.3 * exploit**2
    return proxy, true, policy_kl


def sample_member_scores(rng: np.random.Generator, progress: float, prompts: int, samples: int, members: int):
    """``({"rm0": ..., "rm1": ...}, true, policy_kl)``: `members` reward models scoring the same
    samples. Every member sees the same quality and exploit (the exploit fools them all); each
    adds its own independent error, of the single proxy's law (rm0 draws the single proxy's)."""
    quality, exploit, policy_kl = _policy_samples(rng, progress, prompts, samples)
    scores = {f"rm{k}": quality + exploit + _reward_model_error(rng, prompts, samples) for k in range(members)}
    true = quality - 0.3 * exploit**2
    return scores, true, policy_kl


def fresh_run_folder(root: Path, name: str) -> None:
    """Remove the run folder a previous demo left at ``root/name`` (only a bon_tracker run
    folder: it holds run.json and records/), so that the demo does not pile up runs."""
    folder = root / name
    if (folder / "run.json").is_file() and (folder / "records").is_dir():
        shutil.rmtree(folder)


def selection_lines(record) -> list[str]:
    """Each rule's best-of-n optimum at one eval (``record.selection``, ``stats.table()``): the exact
    curve's argmax n* with the true reward and KL there, HedgeTune's root with its 95 % interval,
    and Gao et al.'s fitted n*; the sentence naming the best rule under it."""
    from bon_tracker.reports.selection_tables import selection_summary

    stats = record.selection
    rows = [r for r in stats.table() if r["family"] == "bon"]
    by = {(r["rule"], r["method"]): r for r in rows}
    lines = [
        f"Selection rules at step {record.step} ({stats.n_prompts} prompts x N = {stats.N}; best-of-n):",
        f"{'rule':<7}{'n*':>5}{'true':>8}{'KL':>7}   {'root n*':>7}  {'95 % interval':<13}{'Gao n*':>8}",
    ]

    def number(value: float, digits: int = 1, beyond: str = "> N") -> str:
        if math.isnan(value):
            return "–"
        return f"{value:.{digits}f}" if math.isfinite(value) else beyond

    for rule in stats.rules:
        best, root = by[(rule, "curve_argmax")], by[(rule, "derivative_root")]
        span = "> N" if root["low"] == math.inf else f"{number(root['low'])}–{number(root['high'])}"
        lines.append(
            f"{rule:<7}{number(best['optimum'], 0):>5}{best['true_mean']:>8.3f}{best['kl']:>7.2f}   "
            f"{number(root['optimum']):>7}  {span:<13}{number(root['gao_n'], beyond='no peak'):>8}"
        )
    lines.append(
        "n*: the argmax of the exact curve (true and KL there; n* = N: still rising at N); root n*: HedgeTune's "
        "root of d/dn true, with its interval from resampling prompts (> N: still rising at N); Gao n*: Gao et "
        "al.'s fitted Goodhart point."
    )
    lines.append(selection_summary(record))
    leaders, leader = [], None  # the chart's black steps: where the best rule within the KL budget changes
    for p in stats.frontier.get(stats.true_names[0], []):
        if "rule" in p and p["rule"] != leader:
            leader = p["rule"]
            knob = "n" if p["family"] == "bon" else "mu"
            leaders.append(
                f"  from {p['kl_budget']:.2f} nats: {leader} ({p['family']} {knob} = {p['value']:g}, "
                f"KL {p['kl']:.2f}, true {p['true_mean']:.3f} ± {p['true_se']:.3f})"
            )
    lines += ["Best rule within a KL budget (the chart's black steps):", *leaders]
    return lines


def main(argv: list[str] | None = None) -> list:
    """Run the demo (``argv``: the command line's arguments; default ``sys.argv[1:]``) and return
    the tracker's records."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="bon_runs", help="folder for local runs (default: bon_runs)")
    parser.add_argument("--steps", type=int, default=8, help="number of eval steps")
    parser.add_argument("--prompts", type=int, default=256, help="eval prompts per step")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt (N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--new-run", action="store_true", help="keep earlier demo runs (default: replace <root>/demo from the last run)"
    )
    parser.add_argument(
        "--members",
        type=int,
        default=0,
        help="reward models in the proxy ensemble (default 0: one proxy, as 1; K >= 2: K members rm0..rm<K-1>)",
    )
    parser.add_argument(
        "--frontier-step",
        type=int,
        default=None,
        help="with --members: the eval step (0, 100, ...) whose selection rules are printed and charted "
        "(default: the step where the policy's true reward peaked)",
    )
    parser.add_argument(
        "--frontier-png", default=None, metavar="PATH", help="with --members: write that step's frontier chart to PATH"
    )
    args = parser.parse_args(argv)
    if args.members < 0:
        parser.error(f"--members must be 0 or more, got {args.members}")
    ensemble = args.members >= 2
    if not ensemble and (args.frontier_step is not None or args.frontier_png is not None):
        parser.error("--frontier-step and --frontier-png need --members K with K >= 2 (selection statistics)")
    if args.frontier_step is not None and args.frontier_step not in range(0, 100 * args.steps, 100):
        parser.error(f"--frontier-step must be an eval step, 0, 100, ..., {100 * (args.steps - 1)}")
    if not args.new_run:
        fresh_run_folder(Path(args.root), "demo")

    rng = np.random.default_rng(args.seed)
    with BonTracker("local", root=args.root, run_name="demo") as tracker:
        for i in range(args.steps):
            step = 100 * i
            progress = i / max(1, args.steps - 1)
            if ensemble:
                proxy, true, policy_kl = sample_member_scores(rng, progress, args.prompts, args.samples, args.members)
            else:
                proxy, true, policy_kl = sample_scores(rng, progress, args.prompts, args.samples)
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
            if ensemble:
                print(f"\nthe deployed rule, {tracker.selection_rule} of {args.members} reward models:")
            print(("" if ensemble else "\n") + curve_table(tracker.history[-1]))

    records = tracker.history
    print("\nPolicy over training (n = 1): proxy keeps rising, true peaks and falls")
    print(f"{'step':>6}{'policy KL':>11}{'true':>8}{'proxy':>8}{'n*':>8}  {'95 % interval':<15}alerts")
    # an ensemble's fitted n* can lie far past N (its curve bends late): short numbers keep the columns
    n_text = (lambda n: f"{n:.1f}" if n < 1e4 else f"{n:.1e}") if ensemble else (lambda n: f"{n:.1f}")
    for r in records:
        n_star = n_text(r.goodhart.n) if r.goodhart else "–"
        span = f"{n_text(r.interval.n_low)}–{n_text(r.interval.n_high)}" if r.interval is not None else "–"
        fired = ", ".join(a.rule for a in r.onsets)
        print(
            f"{r.step:>6}{r.policy.kl:>11.2f}{r.policy.true_mean:>8.3f}{r.policy.proxy_mean:>8.3f}{n_star:>8}  "
            f"{span:<15}{fired}"
        )
    print(f"\nAlerts ({len(tracker.alerts)}):" if tracker.alerts else "\nNo alert fired.")
    for alert in tracker.alerts:
        print(f"  [{alert.rule}] {alert.message}")
    if ensemble:
        if args.frontier_step is None:  # the checkpoint one would keep: the policy's true reward at its peak
            record = max(records, key=lambda r: r.policy.true_mean)
        else:
            record = next(r for r in records if r.step == args.frontier_step)
        step = record.step
        if record.selection is None:
            raise SystemExit(f"the selection statistics of step {step} failed (see the warning above)")
        print()
        print("\n".join(selection_lines(record)))
        if args.frontier_png is not None:
            from bon_tracker.reports.selection_charts import frontier_chart

            path = Path(args.frontier_png)
            path.parent.mkdir(parents=True, exist_ok=True)
            frontier_chart(record).savefig(path, format="png")
            print(f"Frontier chart of step {step}: {path}")
    print()
    print("\n".join(where_to_look(tracker.backend)))
    return records


if __name__ == "__main__":
    main()
