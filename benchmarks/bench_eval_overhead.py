"""What the alerts, the interval, the agreement and the predictions add per eval on the
training thread (``log_scores``, rank 0), beside the curve itself.

    python benchmarks/bench_eval_overhead.py [--repeat 5]

Prints, at 64 x 16, 1000 x 64 and 10000 x 256 (prompts x samples), the best-of-``repeat``
time of ``bon_curve`` and of each part that ``log_scores`` adds after it, in milliseconds.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bon_tracker.core import AlertRules, bon_curve, bon_estimate, goodhart_interval, predict_curve, topq_agreement
from bon_tracker.tracking.alerting import (
    MAX_AGREEMENT_PROMPTS,
    AlertReporter,
    eval_statistics,
    prediction_ns,
    resamples_for,
)

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
    header = ("P x N", "curve", "estimates", "interval", "predict", "agreement", "alerts", "added", "B")
    print("".join(f"{h:>12}" for h in header))
    for P, N in SIZES:
        times, B = measure(P, N, args.repeat)
        print(f"{f'{P} x {N}':>12}" + "".join(f"{times[h]:>12.2f}" for h in header[1:-1]) + f"{B:>12}")
    print("added: all that log_scores computes after the curve (estimates, interval, predictions, agreement, alerts)")


def measure(P: int, N: int, repeat: int) -> tuple[dict[str, float], int]:
    rng = np.random.default_rng(0)
    proxy = rng.normal(size=(P, N))
    true = proxy + rng.normal(size=(P, N))
    curve = bon_curve(proxy, true)
    ns, B = curve.n, resamples_for(P)
    true_pp, proxy_pp = bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns)
    interval = goodhart_interval(true_pp, ns, kl=curve.kl, n_resamples=B)
    reporter = AlertReporter(AlertRules())
    steps = iter(range(10**9))
    parts = {
        "curve": lambda: bon_curve(proxy, true),
        "estimates": lambda: (bon_estimate(proxy, true, ns), bon_estimate(proxy, proxy, ns)),
        "interval": lambda: goodhart_interval(true_pp, ns, kl=curve.kl, n_resamples=B),
        "predict": lambda: predict_curve(true_pp, proxy_pp, ns, prediction_ns(curve, interval), n_resamples=B),
        "agreement": lambda: topq_agreement(proxy[:MAX_AGREEMENT_PROMPTS], true[:MAX_AGREEMENT_PROMPTS]),
        "alerts": lambda: reporter.update(next(steps), curve, 1.0, interval),
        "added": lambda: (eval_statistics(proxy, true, curve), reporter.update(next(steps), curve, 1.0, interval)),
    }
    return {name: best_ms(fn, repeat) for name, fn in parts.items()}, B


if __name__ == "__main__":
    main()
