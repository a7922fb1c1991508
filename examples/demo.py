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

Each run replaces the folder of the previous one (bon_runs/demo) unless --new-run is given.
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np

from bon_tracker import BonTracker
from bon_tracker.reports.text import curve_table, where_to_look


def sample_scores(rng: np.random.Generator, progress: float, prompts: int, samples: int):
    """Proxy and true scores of the policy after `progress` (0..1) of training."""
    quality_mean = 1.5 * (1 - math.exp(-3 * progress))  # real skill: saturates
    exploit_mean = 2.0 * progress  # reward hacking: keeps growing
    difficulty = rng.normal(0.0, 0.5, size=(prompts, 1))  # some prompts are harder
    quality = quality_mean + difficulty + rng.normal(size=(prompts, samples))
    exploit = np.abs(exploit_mean + 0.5 * rng.normal(size=(prompts, samples)))
    proxy = quality + exploit + 0.7 * rng.standard_t(2, size=(prompts, samples))
    true = quality - 0.3 * exploit**2
    policy_kl = 0.5 * (quality_mean**2 + exploit_mean**2)  # KL of the shifted Gaussians from the start
    return proxy, true, policy_kl


def fresh_run_folder(root: Path, name: str) -> None:
    """Remove the run folder a previous demo left at ``root/name`` (only a bon_tracker run
    folder: it holds run.json and records/), so that the demo does not pile up runs."""
    folder = root / name
    if (folder / "run.json").is_file() and (folder / "records").is_dir():
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="bon_runs", help="folder for local runs (default: bon_runs)")
    parser.add_argument("--steps", type=int, default=8, help="number of eval steps")
    parser.add_argument("--prompts", type=int, default=256, help="eval prompts per step")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt (N)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--new-run", action="store_true", help="keep earlier demo runs (default: replace <root>/demo from the last run)"
    )
    args = parser.parse_args()
    if not args.new_run:
        fresh_run_folder(Path(args.root), "demo")

    rng = np.random.default_rng(args.seed)
    with BonTracker("local", root=args.root, run_name="demo") as tracker:
        for i in range(args.steps):
            step = 100 * i
            proxy, true, policy_kl = sample_scores(rng, i / max(1, args.steps - 1), args.prompts, args.samples)
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
            print("\n" + curve_table(tracker.history[-1]))

    print("\nPolicy over training (n = 1): proxy keeps rising, true peaks and falls")
    print(f"{'step':>6}{'policy KL':>11}{'true':>8}{'proxy':>8}{'n*':>8}  {'95 % interval':<15}alerts")
    for r in tracker.history:
        n_star = f"{r.goodhart.n:.1f}" if r.goodhart else "–"
        span = f"{r.interval.n_low:.1f}–{r.interval.n_high:.1f}" if r.interval is not None else "–"
        fired = ", ".join(a.rule for a in r.onsets)
        print(
            f"{r.step:>6}{r.policy.kl:>11.2f}{r.policy.true_mean:>8.3f}{r.policy.proxy_mean:>8.3f}{n_star:>8}  "
            f"{span:<15}{fired}"
        )
    print(f"\nAlerts ({len(tracker.alerts)}):" if tracker.alerts else "\nNo alert fired.")
    for alert in tracker.alerts:
        print(f"  [{alert.rule}] {alert.message}")
    print()
    print("\n".join(where_to_look(tracker.backend)))


if __name__ == "__main__":
    main()
