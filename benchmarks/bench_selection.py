"""Cost of the selection statistics (issue 15) against today's plain best-of-n call, in one run.

    python benchmarks/bench_selection.py            # 1,000 prompts x 64 samples, 5 members, 2 true rewards
    python benchmarks/bench_selection.py --repeats 5

Every ratio has both sides timed in turn in the same process (best of ``--repeats``):

1. On the training thread: ``check_members`` (validation of 5 members, the only selection work
   ``log_scores`` does there) and ``check_members`` + the plain ``bon_curve`` of one proxy,
   each against one plain ``bon_curve`` (goal: the whole training-thread cost <= 3x the plain call).
2. Off the training thread: ``selection_statistics`` for 5 members x 3 rules (mean, worst, uwo)
   x 2 true rewards (curves, Best-of-Poisson, soft best-of-n, optima with intervals, frontier),
   against one plain ``bon_curve``; and its parts (one rule and one true reward).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from bon_tracker.core import bon_curve
from bon_tracker.core.threads import thread_count
from bon_tracker.tracking.selection import check_members, selection_statistics


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    P, N, K = args.prompts, args.samples, args.members
    rng = np.random.default_rng(0)
    true = rng.standard_normal((P, N))
    members = {f"rm{k}": true + rng.standard_normal((P, N)) for k in range(K)}
    trues = {"gold": true, "verifier": (true > 0.5).astype(np.float64)}
    stacked = np.stack(list(members.values()))
    proxy = members["rm0"]
    print(
        f"{P} prompts x {N} samples, {K} members, 2 true rewards; core threads {thread_count()} "
        f"(BON_TRACKER_THREADS={os.environ.get('BON_TRACKER_THREADS', 'unset')}), {os.cpu_count()} cores; "
        f"best of {args.repeats}"
    )
    plain = best_time(lambda: bon_curve(proxy, true), args.repeats * 5)
    check_map = best_time(lambda: check_members(members), args.repeats * 5)
    check_arr = best_time(lambda: check_members(stacked), args.repeats * 5)
    both = best_time(lambda: (check_members(members), bon_curve(proxy, true)), args.repeats * 5)
    print("\ntraining thread (goal: <= 3x the plain call)")
    print(f"  plain bon_curve(proxy, true)                 {1e3 * plain:8.2f} ms   1.00x")
    print(f"  check_members(mapping of {K})                  {1e3 * check_map:8.2f} ms   {check_map / plain:5.2f}x")
    print(f"  check_members(array ({K}, {P}, {N}))          {1e3 * check_arr:8.2f} ms   {check_arr / plain:5.2f}x")
    print(f"  check_members + plain bon_curve              {1e3 * both:8.2f} ms   {both / plain:5.2f}x")
    full = best_time(lambda: selection_statistics(members, trues, rules=["mean", "worst", "uwo"]), max(1, args.repeats))
    one = best_time(lambda: selection_statistics(members, true, rules=["mean"]), max(1, args.repeats))
    no_soft = best_time(
        lambda: selection_statistics(members, true, rules=["mean"], lambdas=[0.0, np.inf]), max(1, args.repeats)
    )
    print("\noff the training thread (statistics path; defaults: 500 resamples, 32 subsets, 9 lambdas)")
    print(f"  selection_statistics 3 rules x 2 trues       {1e3 * full:8.1f} ms   {full / plain:7.0f}x plain")
    print(f"  selection_statistics 1 rule x 1 true         {1e3 * one:8.1f} ms   {one / plain:7.0f}x plain")
    print(f"    of which soft best-of-n (7 finite lambdas) {1e3 * (one - no_soft):8.1f} ms")


if __name__ == "__main__":
    main()
