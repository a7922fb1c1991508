"""The main demo: watch Goodhart's law arrive in a simulated RL run.

A policy is trained against a proxy reward. Each sample has a real quality q and an
"exploit" e that the proxy likes but the true reward punishes:

    proxy = q + e + heavy-tailed error (Student t, 2 degrees of freedom)
    true  = q - 0.3 e^2

Training raises both q (real progress, which saturates) and e (reward hacking, which
keeps growing), so the policy's proxy score keeps rising while its true score peaks and
falls. At each eval step the demo samples N completions for each of P prompts, logs
them through BonTracker on the embedded local backend, and prints the best-of-n curve
and its Goodhart point: the n past which best-of-n selection lowers the true reward.

    python examples/demo.py [--root bon_runs] [--steps 8] [--prompts 256] [--samples 64]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from bon_tracker import BonTracker


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


def print_curve(step: int, record) -> None:
    c = record.curve
    print(f"\nstep {step}: {int(c.n_prompts[0])} prompts x N = {c.N} samples")
    print(f"{'n':>6}{'KL nats':>9}{'true':>9}{'± SE':>7}{'proxy':>9}{'± SE':>7}")
    for row in c.rows():
        print(
            f"{row['n']:>6}{row['kl']:>9.3f}{row['true_mean']:>9.3f}{row['true_se']:>7.3f}"
            f"{row['proxy_mean']:>9.3f}{row['proxy_se']:>7.3f}"
        )
    g = record.goodhart
    if g is None:
        print("Goodhart point: none (true reward still rises with n)")
    else:
        where = "" if g.within_range else " (extrapolated beyond n = N)"
        print(f"Goodhart point: n* ≈ {g.n:.1f}, KL* = {g.kl:.2f} nats{where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="bon_runs", help="folder for local runs (default: bon_runs)")
    parser.add_argument("--steps", type=int, default=8, help="number of eval steps")
    parser.add_argument("--prompts", type=int, default=256, help="eval prompts per step")
    parser.add_argument("--samples", type=int, default=64, help="samples per prompt (N)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    with BonTracker("local", root=args.root, run_name="demo") as tracker:
        for i in range(args.steps):
            step = 100 * i
            proxy, true, policy_kl = sample_scores(rng, i / max(1, args.steps - 1), args.prompts, args.samples)
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
            print_curve(step, tracker.history[-1])
        run_dir = Path(tracker.backend.run_dir)

    print("\nPolicy over training (n = 1): proxy keeps rising, true peaks and falls")
    print(f"{'step':>6}{'policy KL':>11}{'true':>8}{'proxy':>8}{'n*':>8}")
    for r in tracker.history:
        n_star = f"{r.goodhart.n:.1f}" if r.goodhart else "–"
        print(f"{r.step:>6}{r.policy.kl:>11.2f}{r.policy.true_mean:>8.3f}{r.policy.proxy_mean:>8.3f}{n_star:>8}")
    print(f"\nRun folder: {run_dir}")
    print(f"  report:  {run_dir / 'report.html'}")
    print(f"  charts:  {run_dir / 'charts'} (curve_step_*.png, overlay.png, trend.png, rl.png)")
    print(f"  tables:  {run_dir / 'bon_curves.csv'}")


if __name__ == "__main__":
    main()
