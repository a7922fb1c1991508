"""A plain training loop: call ``tracker.log_scores(step, proxy, true)`` at each eval.

The "policy" picks one of K canned answers per prompt (a softmax over logits) and is
trained by REINFORCE on a proxy reward that overrates some answers (proxy = true + a
heavy-tailed error). Every ``--eval-every`` steps the loop samples N answers per eval
prompt, scores them with both rewards and hands them to the tracker, with the policy's
exact KL to its starting point. Runs in seconds on a CPU, numpy only:

    python examples/plain_loop_example.py [--steps 300] [--root examples/output]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from bon_tracker import BonTracker
from bon_tracker.reports.text import curve_table, where_to_look

PROMPTS, ANSWERS, N = 64, 32, 32


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def sample(rng: np.random.Generator, probs: np.ndarray, n: int) -> np.ndarray:
    """``n`` answer indices per prompt drawn from ``probs`` (prompts x answers)."""
    cumulative = probs.cumsum(axis=1)
    draws = rng.random((probs.shape[0], n, 1))
    return (draws > cumulative[:, None, :]).sum(axis=2).clip(max=probs.shape[1] - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--root", default=str(Path(__file__).parent / "output"), help="folder for local runs")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    true_table = rng.normal(size=(PROMPTS, ANSWERS))  # what each answer is really worth
    proxy_table = true_table + 0.8 * rng.standard_t(df=2, size=(PROMPTS, ANSWERS))  # what the reward model says
    logits = np.zeros((PROMPTS, ANSWERS))
    rows = np.arange(PROMPTS)[:, None]

    with BonTracker("local", root=args.root, run_name="plain-loop") as tracker:
        for step in range(args.steps + 1):
            probs = softmax(logits)
            if step % args.eval_every == 0:
                answers = sample(rng, probs, N)  # N samples per eval prompt
                kl = float(np.sum(probs * np.log(probs * ANSWERS), axis=1).mean())  # KL(policy || uniform start)
                tracker.log_scores(step, proxy_table[rows, answers], true_table[rows, answers], policy_kl=kl)
                p = tracker.history[-1].policy
                print(f"step {step:4d}  KL {kl:5.2f}  policy true {p.true_mean:+.3f}  proxy {p.proxy_mean:+.3f}")
            # one REINFORCE step on the proxy, 8 samples per prompt, mean baseline
            answers = sample(rng, probs, 8)
            reward = proxy_table[rows, answers]
            advantage = reward - reward.mean(axis=1, keepdims=True)
            grad = np.zeros_like(logits)
            for j in range(answers.shape[1]):
                onehot = np.zeros_like(logits)
                onehot[rows[:, 0], answers[:, j]] = 1.0
                grad += advantage[:, j : j + 1] * (onehot - probs)
            logits += 0.05 * grad / answers.shape[1]

    print("\n" + curve_table(tracker.history[-1]))
    print()
    print("\n".join(where_to_look(tracker.backend)))


if __name__ == "__main__":
    main()
