"""Kill campaign: SIGKILL a training process at a random moment of MLflow delivery, then
``bon-tracker sync``, and count what reached MLflow.

Each trial starts a real training process (spawn) that logs ``--steps`` eval steps to a real
MLflow store (sqlite) from ``--threads`` threads, writing each step to a side file once
``log_scores`` returned (the record is then promised durable), and is killed after a random
delay. The benchmark then syncs what the process left and reads MLflow back:

* lost: steps ``log_scores`` returned for that are not in MLflow;
* duplicated: metric points beyond one per step;
* split: trials whose steps ended up in more than one MLflow run;
* the slowest ``log_scores`` call seen in any trial.

    python benchmarks/bench_kills.py --trials 24
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

KEY = "bon/1_true/n0001"


def _train(uri: str, spool: str, side: str, experiment: str, steps: int, threads: int, seed: int) -> None:
    from bon_tracker import BonTracker

    tracker = BonTracker("mlflow", tracking_uri=uri, experiment=experiment, charts=False, spool_dir=spool)
    rng = np.random.default_rng(seed)
    lock, counter = threading.Lock(), iter(range(steps))
    out = open(side, "a", buffering=1)  # noqa: SIM115 - one line per returned call, killed at any point

    def work() -> None:
        while True:
            with lock:
                step = next(counter, None)
                if step is None:
                    return
                true = rng.normal(size=(16, 16))
                start = time.perf_counter()
                tracker.log_scores(step, true + rng.normal(size=true.shape), true)
                out.write(json.dumps({"step": step, "seconds": time.perf_counter() - start}) + "\n")
            time.sleep(rng.uniform(0.0, 0.1))

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    tracker.finish()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from bon_tracker.cli.main import main as cli_main

    root = Path(tempfile.mkdtemp(prefix="bon_kills_"))
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.search_experiments()  # creates the database before the first child races for it
    ctx = multiprocessing.get_context("spawn")
    chooser = random.Random(args.seed)
    totals = {"acknowledged": 0, "lost": 0, "duplicated": 0, "split": 0, "worst": 0.0, "killed": 0}
    for trial in range(args.trials):
        spool, side, experiment = root / f"wal{trial}", root / f"side{trial}.jsonl", f"kill{trial}"
        proc = ctx.Process(
            target=_train, args=(uri, str(spool), str(side), experiment, args.steps, args.threads, trial)
        )
        proc.start()
        time.sleep(chooser.uniform(2.5, 9.0))  # imports take ~2-3 s: kills land before, during and after delivery
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            totals["killed"] += 1
        proc.join()
        for log in sorted(spool.glob("mlflow-*.jsonl")):
            cli_main(["sync", str(log)])
        calls = [json.loads(line) for line in side.read_text().splitlines()] if side.exists() else []
        promised = {c["step"] for c in calls}
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        points = [m.step for run in runs for m in client.get_metric_history(run.info.run_id, KEY)]
        totals["acknowledged"] += len(promised)
        totals["lost"] += len(promised - set(points))
        totals["duplicated"] += len(points) - len(set(points))
        totals["split"] += int(
            len({run.info.run_id for run in runs if client.get_metric_history(run.info.run_id, KEY)}) > 1
        )
        totals["worst"] = max([totals["worst"], *(c["seconds"] for c in calls)])
        print(
            f"trial {trial:2d}: {len(promised):2d} steps returned, {len(set(points)):2d} in MLflow, {len(runs)} run(s)"
        )
    print(
        f"\n{args.trials} trials ({totals['killed']} killed by SIGKILL mid-run), {args.threads} threads each: "
        f"{totals['acknowledged']} steps returned by log_scores, {totals['lost']} lost, "
        f"{totals['duplicated']} duplicated, {totals['split']} runs split; "
        f"slowest log_scores {totals['worst'] * 1000:.0f} ms"
    )
    return 0 if totals["lost"] == totals["duplicated"] == totals["split"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
