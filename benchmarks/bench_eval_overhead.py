"""What an eval costs the training thread (``log_scores``, rank 0) beside the curve itself,
and what the statistics worker computes off it.

    python benchmarks/bench_eval_overhead.py [--repeat 5]

1. Training thread: at 64 x 16, 1000 x 64 and 10000 x 256 (prompts x samples), the
   best-of-``repeat`` time of ``bon_curve`` alone and of ``tracker.log_scores`` on the local
   backend with every statistic on (validation, the curve, the write-ahead append; its fsync
   and the statistics are the worker's), both timed right after the worker's run of the
   previous eval, and their ratio (issue 18 goal: <= 1.3x at every size); and bon_curve in a
   warm loop, with the ratio against it, and at 1000 x 64 an ensemble of 5 members (rules mean, worst, uwo) with 2
   true rewards against one proxy and one true reward (issue 15 goal: <= 3x). Between two
   evals the tracker's background threads finish (``flush``), as training between evals lets
   them; that time is not the training thread's.
2. Off the training thread (the statistics worker): the time of each part it computes, with
   the bootstrap draws it keeps between evals of one size (``first``: what an eval adds when it
   draws them, the first of its size or one past the kept bound).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from bon_tracker import BonTracker
from bon_tracker.core import (
    AlertRules,
    BootstrapDraws,
    bon_curve,
    bon_estimate,
    goodhart_interval,
    predict_curve,
    topq_agreement,
)
from bon_tracker.core.threads import thread_count
from bon_tracker.tracking.alerting import (
    MAX_AGREEMENT_PROMPTS,
    AlertReporter,
    eval_statistics,
    prediction_ns,
    resamples_for,
)
from bon_tracker.tracking.tracker import KEPT_DRAW_BYTES

SIZES = ((64, 16), (1000, 64), (10_000, 256))


def best_ms(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"core threads: {thread_count()}; best of {args.repeat}; milliseconds")
    print("1. training thread: log_scores (local backend, every statistic on) / bon_curve alone (goal <= 1.3),")
    print("   both timed right after the statistics worker's run; 'warm': bon_curve in a tight loop")
    print("".join(f"{h:>14}" for h in ("P x N", "bon_curve", "log_scores", "ratio", "warm", "ratio warm")))
    for P, N in SIZES:
        curve_ms, log_ms, warm_ms = training_thread(P, N, args.repeat)
        print(
            f"{f'{P} x {N}':>14}{curve_ms:>14.2f}{log_ms:>14.2f}{log_ms / curve_ms:>14.2f}"
            f"{warm_ms:>14.2f}{log_ms / warm_ms:>14.2f}"
        )
    plain_ms, ensemble_ms = ensemble_call(1000, 64, args.repeat)
    print(
        "   1000 x 64, 5 members x 3 ensemble rules x 2 true rewards: log_scores "
        f"{ensemble_ms:.2f} ms / plain log_scores {plain_ms:.2f} ms = {ensemble_ms / plain_ms:.2f} (issue 15 goal <= 3)"
    )
    print("2. off the training thread (the statistics worker)")
    header = ("P x N", "curve", "estimates", "interval", "predict", "agreement", "alerts", "added", "first", "B")
    print("".join(f"{h:>12}" for h in header))
    for P, N in SIZES:
        times, B = measure(P, N, args.repeat)
        print(f"{f'{P} x {N}':>12}" + "".join(f"{times[h]:>12.2f}" for h in header[1:-1]) + f"{B:>12}")
    print(
        "added: all that the worker computes for an eval (interval, predictions, agreement, alerts; the per-prompt "
        "estimates come with the curve), with its kept draws; first: the same, drawing them"
    )


def ensemble_call(P: int, N: int, repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` ms of log_scores with one proxy and one true reward, and with five
    members (rules mean, worst, uwo) and two true rewards; the background idle before each call."""
    rng = np.random.default_rng(1)
    true = rng.normal(size=(P, N))
    members = {f"rm{k}": true + rng.normal(size=(P, N)) for k in range(5)}
    trues = {"helpful": true, "harmless": rng.normal(size=(P, N))}
    out = []
    for proxy, gold in ((members["rm0"], true), (members, trues)):
        with tempfile.TemporaryDirectory() as root:
            tracker = BonTracker(
                "local",
                root=root,
                run_name="ensemble",
                spool_dir=f"{root}/spool",
                charts=False,
                selection={"rules": ["mean", "worst", "uwo"]},
            )
            times = []
            for step in range(repeat + 1):
                tracker.flush(600)
                start = time.perf_counter()
                tracker.log_scores(step, proxy, gold)
                times.append(time.perf_counter() - start)
            tracker.finish(600)
        out.append(1000 * min(times[1:]))
    return out[0], out[1]


def training_thread(P: int, N: int, repeat: int) -> tuple[float, float, float]:
    """Best-of-``repeat`` ms of bon_curve and of log_scores, each timed in the same state: right
    after the statistics worker finished the previous eval (as training between evals lets it),
    alternately; and of bon_curve repeated in a tight loop (warm caches, for reference).

    The worker's run leaves the training thread's caches cold (a 64 x 16 bon_curve takes about
    3x longer right after it than in a loop), and training itself does the same between evals,
    so the goal's ratio compares log_scores with bon_curve in that state, not with a warm loop."""
    rng = np.random.default_rng(0)
    evals = [(rng.normal(size=(P, N)), rng.normal(size=(P, N))) for _ in range(2)]
    warm_ms = best_ms(lambda: bon_curve(*evals[0]), repeat)
    curve_times, log_times = [], []
    with tempfile.TemporaryDirectory() as root:
        tracker = BonTracker("local", root=root, run_name="overhead", spool_dir=f"{root}/spool", charts=False)
        for step in range(2 * repeat + 2):
            proxy, true = evals[step % 2]
            proxy = proxy + 0.1 * step  # the curve moves: the alert rules see a run, not one eval again
            tracker.flush(600)
            start = time.perf_counter()
            if step % 2:
                bon_curve(proxy, true)
                curve_times.append(time.perf_counter() - start)
                tracker.log_scores(step, proxy, true, policy_kl=0.1 * step)  # the worker's next run
            else:
                tracker.log_scores(step, proxy, true, policy_kl=0.1 * step)
                log_times.append(time.perf_counter() - start)
        tracker.finish(600)
    # the first call also opens the run folder and the log
    return 1000 * min(curve_times), 1000 * min(log_times[1:]), warm_ms


def measure(P: int, N: int, repeat: int) -> tuple[dict[str, float], int]:
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(P, N))
    true = proxy + rng.normal(size=(P, N))
    curve = bon_curve(proxy, true)
    ns, B = curve.n, resamples_for(P)
    true_pp, proxy_pp = bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns)
    draws = BootstrapDraws(max_bytes=KEPT_DRAW_BYTES)  # the worker's, kept between evals of one size
    interval = goodhart_interval(true_pp, ns, kl=curve.kl, n_resamples=B, draws=draws)
    predict_curve(true_pp, proxy_pp, ns, prediction_ns(curve, interval), n_resamples=B, draws=draws)
    reporter = AlertReporter(AlertRules())
    steps = iter(range(10**9))
    parts = {
        "curve": lambda: bon_curve(proxy, true),
        "estimates": lambda: (bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns)),
        "interval": lambda: goodhart_interval(true_pp, ns, kl=curve.kl, n_resamples=B, draws=draws),
        "predict": lambda: predict_curve(
            true_pp, proxy_pp, ns, prediction_ns(curve, interval), n_resamples=B, draws=draws
        ),
        "agreement": lambda: topq_agreement(proxy[:MAX_AGREEMENT_PROMPTS], true[:MAX_AGREEMENT_PROMPTS]),
        "alerts": lambda: reporter.update(next(steps), curve, 1.0, interval),
        "added": lambda: (
            eval_statistics(proxy, true, curve, (true_pp, proxy_pp), draws=draws),
            reporter.update(next(steps), curve, 1.0, interval),
        ),
        "first": lambda: (
            eval_statistics(proxy, true, curve, (true_pp, proxy_pp)),
            reporter.update(next(steps), curve, 1.0, interval),
        ),
    }
    return {name: best_ms(fn, repeat) for name, fn in parts.items()}, B


if __name__ == "__main__":
    main()
