"""Two real processes on torch.distributed (gloo): every rank logs its own prompts, rank 0
alone computes and writes, and rank 1 touches no file, no run, no database.

Each rank watches itself with a Python audit hook (``sys.addaudithook``): every file opened
for writing, folder made, file renamed or removed, and database connected is reported
back, along with which tracking libraries it imported.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bon_tracker import bon_curve  # noqa: E402

STEPS = (10, 20, 30)
PROMPTS_PER_RANK = (3, 2)  # ranks hold different numbers of prompts ...
EMPTY_ON_RANK_1 = 30  # ... and at this step rank 1 has none at all
N = 8
WRITE_EVENTS = ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.symlink", "sqlite3.connect", "shutil.")


def scores(rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 * step + rank)
    prompts = 0 if (rank, step) == (1, EMPTY_ON_RANK_1) else PROMPTS_PER_RANK[rank]
    true = rng.normal(size=(prompts, N))
    return true + rng.standard_t(df=2, size=true.shape), true


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world_size: int, backend: str, root: str) -> None:
    import torch.distributed as dist

    from bon_tracker.tracking.tracker import BonTracker

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    writes: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[0], args[1], args[2]
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else flags & (os.O_WRONLY | os.O_RDWR)
            if writing:
                writes.append(f"open {path}")
        elif event.startswith(WRITE_EVENTS):
            writes.append(f"{event} {args[0] if args else ''}")

    sys.addaudithook(audit)
    options = {"root": root} if backend == "local" else {"tracking_uri": f"sqlite:///{root}/mlflow.db"}
    tracker = BonTracker(backend, run_name="dist", **options)
    for step in STEPS:
        proxy, true = scores(rank, step)
        if rank == 1:
            proxy = torch.tensor(proxy)  # scores may arrive as tensors
        tracker.log_scores(step, proxy, true, policy_kl=0.1 * step)
    tracker.save_state(root)
    tracker.finish()
    dist.barrier()
    dist.destroy_process_group()
    loaded = [name for name in ("mlflow", "wandb", "matplotlib") if name in sys.modules]
    print(json.dumps({"rank": rank, "writes": writes, "loaded": loaded}))


@pytest.mark.parametrize("backend", ["local", "mlflow"])
def test_two_ranks_one_writer(tmp_path, backend):
    if backend == "mlflow":
        pytest.importorskip("mlflow")
    root = tmp_path / "runs"
    root.mkdir()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    processes = []
    for rank in range(2):
        cwd = tmp_path / f"cwd{rank}"  # rank 1 runs in (and spools to) folders of its own
        cwd.mkdir()
        rank_env = {**env, "BON_TRACKER_SPOOL_DIR": str(tmp_path / f"spool{rank}"), "PYTHONPATH": os.getcwd()}
        command = [sys.executable, __file__, str(rank), "2", backend, str(root)]
        processes.append(
            subprocess.Popen(command, cwd=cwd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    reports = []
    for process in processes:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))

    assert any(str(root) in w for w in reports[0]["writes"])  # the hook sees rank 0 writing ...
    assert reports[1]["writes"] == []  # ... and rank 1: no file, no folder, no database
    assert reports[1]["loaded"] == []  # it never even imported a tracking library
    assert not any((tmp_path / "cwd1").iterdir()) and not (tmp_path / "spool1").exists()

    if backend == "local":
        from bon_tracker.backends.local import read_records

        (run_dir,) = [p for p in root.iterdir() if p.is_dir()]  # exactly one run folder
        records = read_records(run_dir)
    else:
        import mlflow

        from bon_tracker.backends.mlflow import record_path

        client = mlflow.MlflowClient(f"sqlite:///{root}/mlflow.db")
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])  # exactly one run
        from bon_tracker.record import EvalRecord

        records = [
            EvalRecord.from_json(json.loads(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/{record_path(s)}")))
            for s in STEPS
        ]
    assert [r.step for r in records] == list(STEPS)
    for record, step in zip(records, STEPS, strict=True):
        rows = [scores(rank, step) for rank in range(2)]
        expected = bon_curve(np.vstack([p for p, _ in rows]), np.vstack([t for _, t in rows]))
        both = 3 if step == EMPTY_ON_RANK_1 else 5
        assert record.curve.n_prompts.tolist() == [both] * len(expected.n)  # both ranks' prompts
        np.testing.assert_allclose(record.curve.true_mean, expected.true_mean)
        np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean)
        np.testing.assert_allclose(record.curve.true_se, expected.true_se)
        assert record.policy.kl == pytest.approx(0.1 * step)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
