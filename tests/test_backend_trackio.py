"""The trackio backend, read back from trackio's local SQLite store and compared with
bon_curve on the same scores. Nothing may reach the network or start a server."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import struct
import sys
import tempfile
import threading
import uuid
from pathlib import Path

import pytest

if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when first imported
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="bon_tracker_trackio_")

from bon_tracker.backends import ConfigurationError, RunNotFoundError, backend_class, backend_from_spec
from bon_tracker.core import bon_curve
from bon_tracker.record import TABLE_COLUMNS, EvalRecord

trackio = pytest.importorskip("trackio")
pytest.importorskip("matplotlib")

from trackio.sqlite_storage import SQLiteStorage  # noqa: E402
from trackio.utils import MEDIA_DIR, TRACKIO_DIR  # noqa: E402

from bon_tracker.backends.trackio import TrackioBackend, dashboard_url  # noqa: E402

STEPS = (10, 20, 30)
NS = [1, 2, 4, 8, 32]


@pytest.fixture(autouse=True)
def _local_only(monkeypatch):
    """trackio's store in a temporary folder; no Space, server or webhook; any attempt to
    open a network connection or listen on a port fails the test."""
    if not str(TRACKIO_DIR).startswith(tempfile.gettempdir()):
        pytest.skip(f"trackio was imported before TRACKIO_DIR was set: its store is {TRACKIO_DIR}")
    for key in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_WEBHOOK_URL", "TRACKIO_BUCKET_ID"):
        monkeypatch.delenv(key, raising=False)
    attempts = []
    for name in ("connect", "connect_ex", "bind"):
        original = getattr(socket.socket, name)

        def guard(self, address, *args, _original=original):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                attempts.append(address)
                raise OSError(f"bon_tracker tests: no network ({address})")
            return _original(self, address, *args)

        monkeypatch.setattr(socket.socket, name, guard)
    yield
    assert attempts == [], f"trackio tried to reach the network: {attempts}"


@pytest.fixture
def project() -> str:
    return f"bon-test-{uuid.uuid4().hex[:8]}"


def _records(rng, steps=STEPS):
    out = {}
    for step in steps:
        true = rng.normal(size=(24, 32))
        proxy = true + rng.standard_t(2, size=true.shape)
        record = EvalRecord.build(step, bon_curve(proxy, true, ns=NS), policy_kl=step / 10)
        out[step] = (record, bon_curve(proxy, true, ns=NS))
    return out


def _rows(project, run_name, run_id=None):
    logs = SQLiteStorage.get_logs(project, run=run_name, run_id=run_id)
    steps = [log["step"] for log in logs if "bon/eval_record" in log]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {log["step"]: log for log in logs if "bon/eval_record" in log}


def test_scalars_table_image_and_record_read_back(project, rng):
    records = _records(rng)
    backend = TrackioBackend(project=project, run_name="ppo")
    for record, _ in records.values():
        backend.log_eval(record)
    run_id, location = backend.run_id, backend.location
    backend.finish()  # a run it started: finished, so trackio has written everything

    rows = _rows(project, "ppo", run_id)
    assert sorted(rows) == list(STEPS)
    for step, (record, curve) in records.items():
        row = rows[step]
        for key, value in record.scalars().items():
            assert row[key] == value, key  # trackio stores float64: exact
        true_at_max = [k for k, v in record.scalars().items() if v == curve.true_mean[-1]]
        assert true_at_max and row[true_at_max[0]] == pytest.approx(curve.true_mean[-1], rel=1e-12)
        table = row["bon/bon_curves"]
        assert table["_type"] == "trackio.table"
        assert [list(r) for r in table["_value"]] == [list(TABLE_COLUMNS)] * len(NS)
        for got, n, true_mean, proxy_se in zip(table["_value"], NS, curve.true_mean, curve.proxy_se, strict=True):
            assert (got["step"], got["n"]) == (step, n)
            # shown to six significant digits (the dashboard shows every digit it is given)
            assert got["true_mean"] == float(f"{true_mean:.6g}") and got["proxy_se"] == float(f"{proxy_se:.6g}")
        for key, least_width in (("bon/0_curve", 600), ("bon/0_curve_full", 700)):  # compact, then full size
            image = row[key]
            assert image["_type"] == "trackio.image"
            png = (Path(MEDIA_DIR) / image["file_path"]).read_bytes()
            assert png.startswith(b"\x89PNG\r\n\x1a\n") and struct.unpack(">I", png[16:20])[0] >= least_width
    config = SQLiteStorage.get_run_config(project, "ppo", run_id=run_id)  # record.run_params()
    assert (config["N"], config["P"], config["ns"]) == ("32", "24", ",".join(map(str, NS)))
    assert dashboard_url(project).endswith("&smoothing=0") and dashboard_url(project) in location

    label, read = TrackioBackend.read_records(f"{project}/ppo")
    assert label == "ppo"
    assert [r.to_json() for r in read] == [records[s][0].to_json() for s in STEPS]


def test_alert_reaches_trackio(project, rng):
    records = _records(rng, steps=(10, 20))
    backend = TrackioBackend(project=project, run_name="ppo", charts=False)
    for record, _ in records.values():
        backend.log_eval(record)
    backend.alert("Goodhart point passed", "policy KL 2.1 nats > KL* 1.9 nats", "WARN")
    backend.finish()
    (alert,) = trackio.Api().alerts(project, run="ppo")
    assert alert["title"] == "Goodhart point passed"
    assert alert["text"] == "policy KL 2.1 nats > KL* 1.9 nats"
    assert (alert["level"], alert["step"]) == ("warn", 20)


def test_a_replayed_step_is_logged_once(project, rng):
    records = _records(rng, steps=(10, 20))
    (first, _), (second, _) = records.values()
    backend = TrackioBackend(project=project, run_name="ppo", charts=False)
    backend.log_eval(first)
    backend.log_eval(first)  # a retry
    backend.finish()
    spec = json.loads(json.dumps(backend.spec()))
    assert spec["resume"] == "must" and spec["run_name"] == "ppo"
    # `bon-tracker sync` in another process: rebuilt from the spec, replays both steps.
    replay = backend_from_spec(spec)
    replay.log_eval(first)
    replay.log_eval(second)
    assert replay.run_id == backend.run_id
    replay.finish()
    rows = _rows(project, "ppo", backend.run_id)
    assert sorted(rows) == [10, 20]
    assert rows[20]["bon/eval_record"] == json.dumps(second.to_json(), separators=(",", ":"))


def test_attaches_to_the_training_threads_run(project, rng):
    """transformers' trackio callback calls trackio.init on the training thread; records
    are written from the delivery thread, which does not see trackio's context."""
    records = _records(rng, steps=(10, 20))
    user_run = trackio.init(project=project, name="trainer", embed=False, auto_log_cpu=False, auto_log_gpu=False)
    try:
        user_run.log({"train/loss": 0.5}, step=5)
        backend = TrackioBackend(project="ignored", run_name="ignored", charts=False)
        backend.bind()  # on the training thread
        worker = threading.Thread(target=lambda: [backend.log_eval(r) for r, _ in records.values()])
        worker.start()
        worker.join()
        backend.finish()  # not its run: left open
        assert backend.run_id == user_run.id
        assert trackio.context_vars.current_run.get() is user_run
        user_run.log({"train/loss": 0.25}, step=25)
    finally:
        trackio.finish()
    logs = SQLiteStorage.get_logs(project, run="trainer", run_id=user_run.id)
    assert [log["step"] for log in logs if "train/loss" in log] == [5, 25]
    assert sorted(_rows(project, "trainer", user_run.id)) == [10, 20]
    assert SQLiteStorage.get_runs(project) == ["trainer"]


def test_spec_check_classify_and_errors(project):
    backend = TrackioBackend(project=project)
    assert backend.run_id is None
    assert not SQLiteStorage.get_project_db_path(project).exists()  # nothing touched yet
    assert backend.spec() == {
        "backend": "trackio",
        "project": project,
        "run_name": None,
        "run_id": None,
        "resume": "never",
    }
    assert backend_class("trackio") is TrackioBackend
    backend.check()
    with pytest.raises(ConfigurationError, match="reserved"):
        TrackioBackend(project="registry-models").check()
    assert backend.classify(sqlite3.OperationalError("database is locked")) == "transient"
    assert backend.classify(ValueError("Invalid value type")) == "rejected"
    with pytest.raises(RunNotFoundError):
        TrackioBackend.read_records(f"{project}/nothing")
    with pytest.raises(RunNotFoundError):
        TrackioBackend.read_records("no-slash")
    with pytest.raises(ValueError, match="resume"):
        TrackioBackend(resume="sometimes")


def test_a_replay_continues_the_run_of_its_own_id_when_a_later_run_has_the_same_name(project, rng):
    """trackio resumes the latest run of a name; a replay belongs to its own run."""
    records = _records(rng, steps=(10, 20))
    (first, _), (second, _) = records.values()
    older = TrackioBackend(project=project, run_name="ppo", charts=False)
    older.log_eval(first)
    older.finish()
    spec = json.loads(json.dumps(older.spec()))
    later = TrackioBackend(project=project, run_name="ppo", charts=False)  # another process, same name
    later.log_eval(first)
    later.log_eval(second)
    later.finish()
    assert later.run_id != older.run_id
    replay = backend_from_spec(spec)  # `bon-tracker sync` of the older run's log
    replay.log_eval(first)
    replay.log_eval(second)  # was: written to the later run, which has it: skipped, lost to the older one
    assert replay.run_id == older.run_id
    replay.finish()
    assert sorted(_rows(project, "ppo", older.run_id)) == [10, 20]
    assert sorted(_rows(project, "ppo", later.run_id)) == [10, 20]


def test_a_row_trackio_drops_is_retried_and_stored_once(project, rng, monkeypatch):
    """trackio's run.log never raises: a row its store refuses is dropped with a warning.
    The backend reads the step back, raises a retryable error, and stores it on the retry."""
    from bon_tracker.backends.trackio import NotStoredError

    records = _records(rng, steps=(10, 20))
    (first, _), (second, _) = records.values()
    backend = TrackioBackend(project=project, run_name="ppo", charts=False)
    backend.log_eval(first)
    real = SQLiteStorage.bulk_log

    def refuse(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(refuse))
    with pytest.warns(UserWarning, match="database or disk is full"), pytest.raises(NotStoredError) as error:
        backend.log_eval(second)  # was: returned, and the step was never stored
    assert backend.classify(error.value) == "transient"
    assert sorted(_rows(project, "ppo", backend.run_id)) == [10]
    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(real))
    backend.log_eval(second)  # the delivery worker's retry
    backend.log_eval(second)  # and a replay: skipped
    backend.finish()
    assert sorted(_rows(project, "ppo", backend.run_id)) == [10, 20]


def test_spec_of_a_run_that_holds_nothing_yet_does_not_insist_on_resuming_it(project, rng, monkeypatch):
    """A process killed between opening its run and storing a first row: trackio knows no
    such run, so a replay must start it, not fail on ``resume="must"``."""
    (record, _), *_ = _records(rng, steps=(10,)).values()
    from bon_tracker.backends.trackio import NotStoredError

    backend = TrackioBackend(project=project, run_name="fresh", charts=False)
    real = SQLiteStorage.bulk_log
    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(lambda *a, **k: None))  # nothing reaches the store
    with pytest.raises(NotStoredError, match="did not store step 10"):
        backend.log_eval(record)
    spec = json.loads(json.dumps(backend.spec()))
    assert spec["resume"] == "allow" and spec["run_name"] == "fresh"  # was "must": sync failed, run not found
    monkeypatch.setattr(SQLiteStorage, "bulk_log", staticmethod(real))
    backend.finish()  # (the process that wrote this spec is gone)
    replay = backend_from_spec(spec)
    replay.log_eval(record)
    replay.finish()
    _, read = TrackioBackend.read_records(f"{project}/fresh")
    assert [r.step for r in read] == [10]
