"""Speed and variance of the core estimators, as ratios measured in one run.

    python benchmarks/bench_core.py            # full sizes (about a minute)
    python benchmarks/bench_core.py --quick    # smaller sizes, for a smoke run

1. bon_curve (standard errors, default grid) / one np.argsort of the same proxy matrix,
   for P = 10,000 x N = 256 and for one prompt with N = 10^6 (goals <= 1.5 and <= 2.5).
2. bon_weights against a straightforward exact-binomial implementation (exact integer
   binomials per weight, as in public reference code) at N = 12,600, n = 1, 2, 4, ..., 8192:
   largest difference of the estimates, and the speedup.
3. Variance of the all-subsets estimator against naive Monte Carlo at equal N.
Timings are the best of several repeats (least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np

from bon_tracker import bon_curve, bon_estimate, bon_weights, mc_bon_estimate


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def exact_binomial_estimate(sorted_scores: np.ndarray, n: int) -> float:
    """Reference: every weight as a ratio of exact Python integer binomials."""
    N = len(sorted_scores)
    total = math.comb(N, n)
    weights = [math.comb(k - 1, n - 1) / total for k in range(1, N + 1)]  # int / int: correctly rounded
    return float(np.dot(weights, sorted_scores))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    repeats = 3 if args.quick else 9
    print(f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}")

    print("\n1. bon_curve / np.argsort (same proxy matrix, same run)")
    print(f"{'case':<22}{'argsort s':>12}{'bon_curve s':>14}{'ratio':>8}{'goal':>7}")
    cases = [("P=10,000 x N=256", (10_000, 256), 1.5), ("P=1 x N=1,000,000", (1, 1_000_000), 2.5)]
    if args.quick:
        cases = [("P=1,000 x N=256", (1_000, 256), 1.5), ("P=1 x N=100,000", (1, 100_000), 2.5)]
    for name, shape, goal in cases:
        proxy = rng.normal(size=shape)
        true = proxy + rng.standard_t(2, size=shape)
        t_sort = best_time(lambda p=proxy: np.argsort(p, axis=1), repeats)
        t_curve = best_time(lambda p=proxy, t=true: bon_curve(p, t), repeats)
        print(f"{name:<22}{t_sort:>12.4f}{t_curve:>14.4f}{t_curve / t_sort:>8.2f}{goal:>7}")

    N = 2_000 if args.quick else 12_600
    ns = [2**i for i in range(14) if 2**i <= N]
    print(f"\n2. against exact integer binomials, N = {N}, n = 1, 2, ..., {ns[-1]}")
    sorted_scores = np.sort(rng.normal(size=N))
    start = time.perf_counter()
    reference = [exact_binomial_estimate(sorted_scores, n) for n in ns]
    t_exact = time.perf_counter() - start
    t_ours = best_time(lambda: [bon_weights(N, n) @ sorted_scores for n in ns], repeats)
    ours = bon_estimate(sorted_scores, sorted_scores, ns)
    diff = float(np.max(np.abs(np.array(reference) - ours)))
    print(
        f"largest |difference| {diff:.2e} (goal <= 1e-9); exact binomials {t_exact:.2f} s, "
        f"bon_weights {t_ours:.4f} s: speedup {t_exact / t_ours:,.0f}x"
    )

    print("\n3. variance over 2,000 simulated prompts, N = 64, proxy = true + t(2) noise")
    true = rng.normal(size=(2_000, 64))
    proxy = true + rng.standard_t(2, size=true.shape)
    print(f"{'n':>5}{'all-subsets var':>18}{'MC var (N/n draws)':>22}{'MC / all-subsets':>18}")
    for n in (2, 4, 16, 32):
        exact = bon_estimate(proxy, true, n)
        mc = mc_bon_estimate(proxy, true, n, trials=64 // n, rng=1)
        print(f"{n:>5}{exact.var(ddof=1):>18.4f}{mc.var(ddof=1):>22.4f}{mc.var(ddof=1) / exact.var(ddof=1):>18.2f}")


if __name__ == "__main__":
    main()
