"""One contract for every backend: what was written, read back from the real service,
equals bon_curve on the same scores."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when first imported
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="bon_tracker_trackio_")

from bon_tracker import BonTracker, bon_curve
from bon_tracker.record import TABLE_COLUMNS

STEPS = (10, 20, 30)
NS = [1, 2, 4, 8, 32]


def _read_local(tracker: BonTracker, tmp_path: Path):
    from bon_tracker.backends import local

    run_dir = tracker.backend.run_dir
    scalars = {row.pop("step"): row for row in map(json.loads, (run_dir / "scalars.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (run_dir / "bon_curves.jsonl").read_text().splitlines()]
    return local.read_records(run_dir), scalars, rows


def _read_mlflow(tracker: BonTracker, tmp_path: Path):
    from mlflow import MlflowClient

    from bon_tracker.backends import mlflow as mlflow_backend

    spec = tracker.backend.spec()
    client = MlflowClient(spec["tracking_uri"])
    run = client.get_run(spec["run_id"])
    scalars: dict[int, dict[str, float]] = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(spec["run_id"], key):
            assert key not in scalars.get(metric.step, {}), f"{key} logged twice at step {metric.step}"
            scalars.setdefault(metric.step, {})[key] = metric.value
    # The cumulative table holds every digit; the per-step previews are rounded for the UI.
    path = client.download_artifacts(spec["run_id"], mlflow_backend.CUMULATIVE_TABLE, str(tmp_path / "dl"))
    table = json.loads(Path(path).read_text())
    rows = [dict(zip(table["columns"], values)) for values in table["data"]]
    for step in STEPS:
        path = client.download_artifacts(spec["run_id"], mlflow_backend.step_table_path(step), str(tmp_path / "dl"))
        preview = json.loads(Path(path).read_text())
        exact = [r for r in rows if r["step"] == step]
        assert len(preview["data"]) == len(exact)
        for values, row in zip(preview["data"], exact):
            for column, value in zip(preview["columns"], values):
                if isinstance(value, float):
                    assert value == pytest.approx(row[column], rel=1e-5), (step, column)
    return mlflow_backend.read_records(spec["run_id"], spec["tracking_uri"]), scalars, rows


def _read_wandb(tracker: BonTracker, tmp_path: Path):
    from bon_tracker.backends import wandb_transaction_log

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    history = wandb_transaction_log.read_history(run_dir)
    scalars = {
        int(row["bon/step"]): {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for row in history
    }
    rows = []
    for row in history:
        rows += wandb_transaction_log.read_table(run_dir, row["bon/bon_curves"])
    return wandb_transaction_log.read_records(run_dir), scalars, rows


def _read_tensorboard(tracker: BonTracker, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    from bon_tracker.backends.tensorboard import TensorBoardBackend

    log_dir = tracker.backend.spec()["log_dir"]
    accumulator = EventAccumulator(log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    scalars: dict[int, dict[str, float]] = {}
    for tag in accumulator.Tags()["tensors"]:
        for event in accumulator.Tensors(tag):
            value = tensor_util.make_ndarray(event.tensor_proto)
            if value.dtype.kind == "f":
                assert tag not in scalars.get(event.step, {}), f"{tag} logged twice at step {event.step}"
                scalars.setdefault(event.step, {})[tag] = value.item()
    _, records = TensorBoardBackend.read_records(log_dir)
    rows = [row for record in records for row in record.table_rows()]  # TensorBoard has no tables
    return records, scalars, rows


def _read_trackio(tracker: BonTracker, tmp_path: Path):
    from trackio.sqlite_storage import SQLiteStorage

    from bon_tracker.backends.trackio import TrackioBackend

    spec = tracker.backend.spec()
    scalars: dict[int, dict[str, float]] = {}
    rows = []
    for log in SQLiteStorage.get_logs(spec["project"], run=spec["run_name"], run_id=spec["run_id"]):
        assert log["step"] not in scalars, f"step {log['step']} logged twice"
        scalars[log["step"]] = {
            k: v for k, v in log.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        rows += log["bon/bon_curves"]["_value"]
    _, records = TrackioBackend.read_records(f"{spec['project']}/{spec['run_name']}", run_id=spec["run_id"])
    return records, scalars, rows


BACKENDS = {
    "local": (lambda tmp: {"root": tmp / "runs"}, _read_local),
    "mlflow": (lambda tmp: {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "contract"}, _read_mlflow),
    "wandb": (lambda tmp: {"project": "contract", "dir": str(tmp), "mode": "offline"}, _read_wandb),
    "tensorboard": (lambda tmp: {"log_dir": tmp / "tb"}, _read_tensorboard),
    "trackio": (lambda tmp: {"project": f"contract-{tmp.name}"}, _read_trackio),
}
SCALAR_REL = {"tensorboard": 1e-6}  # TensorBoard keeps scalars as float32, as its own writers do
# trackio's dashboard shows every digit of a table: its tables hold 6 significant digits (the
# records, read back above, every digit).
TABLE_REL = {"trackio": 1e-5}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_writes_the_same_values(backend, tmp_path, rng):
    pytest.importorskip(backend if backend != "local" else "numpy")
    options, read_back = BACKENDS[backend]
    expected = {}
    with BonTracker(backend, ns=NS, run_name="contract", spool_dir=tmp_path / "spool", **options(tmp_path)) as tracker:
        for step in STEPS:
            true = rng.normal(size=(24, 32))
            proxy = true + rng.standard_t(2, size=true.shape)
            tracker.log_scores(step, proxy, true, policy_kl=step / 10)
            expected[step] = tracker.history[-1]
            assert expected[step].curve.to_dict() == bon_curve(proxy, true, ns=NS).to_dict()
    assert tracker.wal_path is not None and not tracker.wal_path.exists()  # all delivered: the log is gone

    records, scalars, rows = read_back(tracker, tmp_path)
    assert [r.step for r in records] == list(STEPS)
    for record in records:
        assert record.to_json() == expected[record.step].to_json()
    assert sorted(scalars) == list(STEPS)
    rel = SCALAR_REL.get(backend, 1e-12)
    for step, record in expected.items():
        for key, value in record.scalars().items():
            assert scalars[step][key] == pytest.approx(value, rel=rel, abs=1e-12), (backend, step, key)
        assert scalars[step]["bon/1_true/n0032"] == pytest.approx(float(record.curve.true_mean[-1]), rel=rel)
        assert scalars[step]["bon/5_policy/kl"] == pytest.approx(step / 10)
    assert len(rows) == len(STEPS) * len(NS)
    for row in rows:
        assert set(TABLE_COLUMNS) <= set(row)
        want = next(r for r in expected[int(row["step"])].table_rows() if r["n"] == int(row["n"]))
        for column in ("kl", "true_mean", "true_se", "proxy_mean", "proxy_se"):
            rel_table = TABLE_REL.get(backend, 1e-12)
            assert float(row[column]) == pytest.approx(want[column], rel=rel_table), (backend, column)
    assert np.isfinite([r.goodhart.kl for r in records if r.goodhart]).all()
