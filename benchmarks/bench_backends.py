"""The delivery worker's time per eval step for each backend, and whether it grows with the run.

    python benchmarks/bench_backends.py [--steps 200] [--backends local mlflow wandb tensorboard trackio]

Builds `--steps` eval records (P = 64 prompts x N = 32 samples) and delivers each one the way
the delivery worker does: `backend.log_eval(record)` (scalars, tables, the step's chart drawn
in the chart process), then `backend.refresh_views()` (overview charts) — in a temporary
folder (MLflow on a sqlite file, W&B offline). This is the work that runs off the training
thread (`benchmarks/bench_delivery.py` measures what training pays). It prints the mean time
per step, the mean of steps 11-20 and of the last 10 steps, and last / early (goal: about 1,
i.e. the per-step cost does not grow with the run's length; step 1 opens the run and is left
out), and how long finish() takes.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bon_tracker import EvalRecord, bon_curve
from bon_tracker.backends import make_backend


def options_for(backend: str, folder: str) -> dict:
    return {
        "local": {"root": os.path.join(folder, "runs")},
        "mlflow": {"tracking_uri": f"sqlite:///{folder}/mlflow.db", "experiment": "bench"},
        "wandb": {"project": "bench", "dir": folder, "mode": "offline"},
        "tensorboard": {"log_dir": os.path.join(folder, "tb")},
        "trackio": {"project": "bench"},
    }[backend]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", nargs="+", default=["local", "mlflow", "wandb", "tensorboard", "trackio"])
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("WANDB_SILENT", "true")
    rng = np.random.default_rng(0)
    records = []
    for step in range(args.steps):
        true = rng.normal(size=(64, 32)) + 0.002 * step
        records.append(EvalRecord.build(step, bon_curve(true + rng.standard_t(2, size=true.shape), true)))
    header = f"{'backend':<12}{'steps':>7}{'mean s/step':>13}{'steps 11-20':>13}{'last 10':>10}"
    print(header + f"{'last/early':>12}{'finish s':>10}")
    for backend in args.backends:
        with tempfile.TemporaryDirectory() as folder:
            if backend == "trackio":
                os.environ["TRACKIO_DIR"] = os.path.join(folder, "trackio")
            sink = make_backend(backend, run_name="bench", **options_for(backend, folder))
            times = []
            for record in records:
                start = time.perf_counter()
                sink.log_eval(record)
                sink.refresh_views()  # the worker draws the overview when its queue is empty
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            sink.finish()
            finish = time.perf_counter() - start
            early, last = np.mean(times[10:20]), np.mean(times[-10:])  # step 1 opens the run
            print(
                f"{backend:<12}{len(times):>7}{np.mean(times):>13.3f}{early:>13.3f}{last:>10.3f}"
                f"{last / early:>12.2f}{finish:>10.1f}"
            )


if __name__ == "__main__":
    main()
