"""What the tracker costs training, per backend and situation, as ratios measured in one run.

    python benchmarks/bench_delivery.py [--evals 10] [--train-steps 200] [--quick]

A real training loop: the transformers example's tiny GPT-2 (built on the spot, CPU),
`--train-steps` optimizer steps between evaluations (about 1 s of training: evaluations far
more often than in a real run, so a worst case). One evaluation is logged before the clock
starts (the run opened, the service client imported, the chart process started: once per
run). At each evaluation it samples 16
completions for each of 20 prompts and scores them with both rewards (what the callback
does), then calls ``log_scores``. Charts are on everywhere (W&B images too).

Two figures per row:

* **share**: the tracker's time on the training thread per evaluation (``log_scores``:
  validation, curve, fit, the write-ahead log append with fsync) as a fraction of that
  evaluation's sampling and scoring time. Goal <= 2 %.
* **slowdown**: wall time of the whole loop with the tracker (its delivery worker and chart
  process drawing and uploading on the same 2 cores) against the same loop without a
  tracker, run just before and just after (the faster of the two). Goal <= 5 %.
  ``finish`` (bounded at 10 s here; what is left stays in the log for ``bon-tracker sync``)
  is printed apart: a run waits for it once, at its end.

Situations: the service answering; an MLflow server frozen (SIGSTOP: the port open,
nothing answering); the service absent (MLflow: nothing listens on the port; W&B online
with no network); and the write-ahead log's disk full while the service is absent (every
write of bon_tracker refuses, as ``ENOSPC`` does, by injection into ``bon_tracker.files``).
The sampling is far faster than a real policy's, so the share is a worst case.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers_example import EVAL_PROMPTS, proxy_reward, tiny_model, true_reward  # noqa: E402

from bon_tracker import BonTracker  # noqa: E402
from bon_tracker.integrations._sampling import sample_completions  # noqa: E402


class Loop:
    """Training steps and evaluations of the tiny model; the same work with or without a tracker."""

    def __init__(self, samples: int, new_tokens: int):
        torch.manual_seed(0)
        self.model, self.tokenizer = tiny_model()
        self.prompts = EVAL_PROMPTS * 4  # 20 prompts
        self.samples, self.new_tokens = samples, new_tokens
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        batch = self.tokenizer(["the cat sat on the mat and the dog"] * 8, return_tensors="pt")
        self.batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}

    def train_step(self) -> None:
        self.model.train()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def evaluate(self) -> tuple[float, np.ndarray, np.ndarray]:
        start = time.perf_counter()
        completions = sample_completions(
            self.model,
            self.tokenizer,
            self.prompts,
            self.samples,
            generation_kwargs={"max_new_tokens": self.new_tokens},
        )
        repeated = [p for p in self.prompts for _ in range(self.samples)]
        shape = (len(self.prompts), self.samples)
        proxy = np.reshape(proxy_reward(repeated, completions), shape)
        true = np.reshape(true_reward(repeated, completions), shape)
        return time.perf_counter() - start, proxy, true

    def run(self, evals: int, train_steps: int, tracker: BonTracker | None) -> tuple[float, float, float, float]:
        """(wall seconds of the loop, sampling seconds, tracker seconds on this thread, finish seconds)."""
        if tracker is not None:  # steady state: the run opened, clients imported, the chart process up
            _, proxy, true = self.evaluate()
            tracker.log_scores(0, proxy, true)
            tracker.flush(timeout=3)
        start = time.perf_counter()
        sampling = tracked = 0.0
        for e in range(1, evals + 1):
            for _ in range(train_steps):
                self.train_step()
            seconds, proxy, true = self.evaluate()
            sampling += seconds
            if tracker is not None:
                t0 = time.perf_counter()
                tracker.log_scores(e * train_steps, proxy, true)
                tracked += time.perf_counter() - t0
        wall = time.perf_counter() - start
        finish = time.perf_counter()
        if tracker is not None:
            tracker.finish(timeout=10)  # bounded: what is left waits in the log for `bon-tracker sync`
        return wall, sampling, tracked, time.perf_counter() - finish


@contextlib.contextmanager
def mlflow_server(root: Path, state: str) -> Iterator[str]:
    """A real ``mlflow server`` in the given state: ``up``, ``frozen`` or ``absent``."""
    from tests.mlflow_server import MlflowServer, free_port

    if state == "absent":
        yield f"http://127.0.0.1:{free_port()}"
        return
    server = MlflowServer(root)
    server.start()
    try:
        if state == "frozen":
            server.freeze()
        yield server.url
    finally:
        if state == "frozen":
            server.thaw()
        server.stop()


@contextlib.contextmanager
def log_disk_full() -> Iterator[None]:
    import bon_tracker.files as files

    real = files._pwrite

    def refuse(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    files._pwrite = refuse
    try:
        yield
    finally:
        files._pwrite = real


@contextlib.contextmanager
def situation(backend: str, state: str, folder: Path) -> Iterator[dict]:
    """The backend's options for one situation (and the situation itself, while it lasts)."""
    if backend == "mlflow-server":
        server_state = "absent" if state == "disk full" else state
        disk = log_disk_full() if state == "disk full" else contextlib.nullcontext()
        with mlflow_server(folder / "server", server_state) as url, disk:
            yield {"backend": "mlflow", "tracking_uri": url, "timeout": 5, "max_retries": 1}
        return
    if backend == "wandb" and state in ("absent", "disk full"):
        import wandb

        from tests.mlflow_server import free_port

        # Given to wandb.init itself: W&B keeps the settings of its first use in the process (offline here).
        unreachable = wandb.Settings(base_url=f"http://127.0.0.1:{free_port()}", api_key="x" * 40)
        with log_disk_full() if state == "disk full" else contextlib.nullcontext():
            yield {"backend": "wandb", "project": "bench", "dir": str(folder), "mode": "online",
                   "init_kwargs": {"settings": unreachable}}  # fmt: skip
        return
    options = {
        "local": {"root": str(folder)},
        "mlflow-sqlite": {"backend": "mlflow", "tracking_uri": f"sqlite:///{folder}/mlflow.db"},
        "wandb": {"project": "bench", "dir": str(folder)},
        "tensorboard": {"log_dir": str(folder / "tb")},
        "trackio": {"project": "bench"},
    }[backend]
    with log_disk_full() if state == "disk full" else contextlib.nullcontext():
        yield {"backend": options.pop("backend", backend), **options}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", type=int, default=10)
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="3 evals, 4 train steps, fewer situations")
    args = parser.parse_args()
    if args.quick:
        args.evals, args.train_steps = 3, 4
    torch.set_num_threads(1)  # the training thread: one core; the other core is left to the worker
    loop = Loop(args.samples, args.new_tokens)
    loop.run(1, 1, None)  # warm up
    base_wall, base_sampling, _, _ = loop.run(args.evals, args.train_steps, None)
    print(f"{len(loop.prompts)} prompts x N = {args.samples}, {args.new_tokens} new tokens, tiny GPT-2 on CPU;")
    print(f"torch threads 1, {os.cpu_count()} cores; {args.evals} evals x {args.train_steps} train steps; charts on")
    print(f"loop without a tracker: {base_wall:.2f} s, sampling + scoring {base_sampling / args.evals:.3f} s per eval")
    rows = [
        ("local", "normal"),
        ("local", "disk full"),
        ("mlflow-sqlite", "normal"),
        ("mlflow-server", "normal"),
        ("mlflow-server", "frozen"),
        ("mlflow-server", "absent"),
        ("mlflow-server", "disk full"),
        ("wandb", "normal"),
        ("wandb", "absent"),
        ("wandb", "disk full"),
        ("tensorboard", "normal"),
        ("trackio", "normal"),
    ]
    if args.quick:
        rows = [r for r in rows if r[0] in ("local", "mlflow-server")]
    print(f"{'backend':<15}{'situation':<11}{'tracker ms/eval':>16}{'share':>8}{'(goal 2%)':>10}"
          f"{'slowdown':>10}{'(goal 5%)':>10}{'delivered':>11}{'finish s':>10}")  # fmt: skip
    for backend, state in rows:
        base_wall = loop.run(args.evals, args.train_steps, None)[0]  # the same loop, no tracker, just before
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            try:
                with situation(backend, state, folder) as options:
                    name = options.pop("backend")
                    tracker = BonTracker(name, spool_dir=folder / "wal", backoff_max=2.0, **options)
                    wall, sampling, tracked, finish = loop.run(args.evals, args.train_steps, tracker)
            except Exception as err:  # a missing extra: say so, keep going
                print(f"{backend:<15}{state:<11}  not measured: {type(err).__name__}: {err}")
                continue
        base_wall = min(base_wall, loop.run(args.evals, args.train_steps, None)[0])  # paired: drift between rows
        share = tracked / sampling
        slowdown = wall / base_wall - 1
        delivered = f"{tracker.delivery_stats.delivered - 1 if tracker.delivery_stats.delivered else 0}/{args.evals}"
        print(
            f"{backend:<15}{state:<11}{1000 * tracked / args.evals:>16.2f}{share:>8.2%}"
            f"{'ok' if share <= 0.02 else 'MISSED':>10}{slowdown:>10.1%}{'ok' if slowdown <= 0.05 else 'MISSED':>10}"
            f"{delivered:>11}{finish:>10.1f}"
        )


if __name__ == "__main__":
    main()
