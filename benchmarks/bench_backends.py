"""Wall time per eval step for each backend, and whether it grows with the run's length.

    python benchmarks/bench_backends.py [--steps 200] [--backends local mlflow wandb]

Logs `--steps` eval steps (P = 64 prompts x N = 32 samples, charts on) through
BonTracker to each backend in a temporary folder (MLflow on a sqlite file, W&B in
offline mode) and prints the mean time per step, the mean of steps 11-20 and of the
last 10 steps, last / early (goal: about 1, i.e. the per-step cost does not grow with
the run's length; step 1 opens the run and is left out), and how long finish() takes
(it waits for the charts drawn on the background thread).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bon_tracker import BonTracker


def options_for(backend: str, folder: str) -> dict:
    if backend == "local":
        return {"root": os.path.join(folder, "runs")}
    if backend == "mlflow":
        return {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench"}
    return {"project": "bench", "dir": folder, "mode": "offline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["local", "mlflow", "wandb"])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    rng = np.random.default_rng(0)
    header = f"{'backend':<8}{'steps':>7}{'mean s/step':>13}{'steps 11-20':>13}{'last 10':>10}"
    print(header + f"{'last/early':>12}{'finish s':>10}")
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as folder:
            times = []
            tracker = BonTracker(
                backend, run_name="bench", spool_dir=os.path.join(folder, "spool"), **options_for(backend, folder)
            )
            for step in range(args.steps):
                true = rng.normal(size=(64, 32))
                proxy = true + rng.standard_t(2, size=true.shape)
                start = time.perf_counter()
                tracker.log_scores(step, proxy, true)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            tracker.finish()
            finish = time.perf_counter() - start
            early, last = np.mean(times[10:20]), np.mean(times[-10:])  # step 1 opens the run
            print(
                f"{backend:<8}{len(times):>7}{np.mean(times):>13.3f}{early:>13.3f}{last:>10.3f}"
                f"{last / early:>12.2f}{finish:>10.1f}"
            )


if __name__ == "__main__":
    main()
