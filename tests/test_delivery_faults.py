"""Faults as they happen, against real services and real file systems.

Each test proves two things: the training thread never waits for the fault (every
``log_scores`` returns in well under the service's own timeouts; nothing raises into
it), and afterwards every record is where it belongs exactly once (read back from the
service, or waiting in the write-ahead log for ``bon-tracker sync``).

Full and read-only disks are real: a small tmpfs mounted for the test (``mount -t tmpfs``,
which needs root). Where mounting is refused the same faults are injected into the one
write function every file of bon_tracker goes through (``bon_tracker.files._pwrite``),
which fails the way a full disk does (a short write, then ``ENOSPC``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from bon_tracker import Backend, BonTracker, EvalRecord, bon_curve
from bon_tracker.backends import ConfigurationError, RejectedRecord
from bon_tracker.backends.local import read_records
from bon_tracker.cli.main import main as cli_main
from bon_tracker.tracking.wal import WriteAheadLog

STALL = 5.0  # a log_scores call slower than this waited for the service (its timeouts are 10-90 s)


def _scores(rng, prompts=8, samples=8):
    true = rng.normal(size=(prompts, samples))
    return true + rng.normal(size=true.shape), true


def _timed_log(tracker, step, proxy, true):
    start = time.perf_counter()
    tracker.log_scores(step, proxy, true)
    return time.perf_counter() - start


# ---- file systems ---------------------------------------------------------------------------------------------


class TinyDisk:
    """A tmpfs of ``size`` bytes at ``path`` (root only); ``fill()`` leaves no space."""

    def __init__(self, path: Path, size: str = "16m"):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        self.mounted = result.returncode == 0

    def fill(self) -> None:
        fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
        with contextlib.suppress(OSError):
            os.write(fd, b"\0")  # the last bytes of a block
        os.close(fd)

    def free(self) -> None:
        (self.path / "filler").unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        subprocess.run(["mount", "-o", f"remount,{'ro' if on else 'rw'}", str(self.path)], check=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


@pytest.fixture
def tiny_disk(tmp_path):
    disk = TinyDisk(tmp_path / "disk")
    yield disk
    disk.unmount()


@pytest.fixture
def full_disk_injection(monkeypatch):
    """A switch that makes every bon_tracker file write behave as on a full disk."""
    import bon_tracker.files as files

    real = files._pwrite
    state = {"full": False}

    def pwrite(fd, data, offset):
        if state["full"]:
            if len(data) > 1:  # a short write first, as a nearly full disk gives
                return real(fd, bytes(data[: len(data) // 2]), offset)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(files, "_pwrite", pwrite)
    return state


def _no_torn_lines(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and path.suffix in (".jsonl", ".csv", ".acks") and path.stat().st_size:
            data = path.read_bytes()
            assert data.endswith(b"\n"), f"{path} ends mid-line"
            if path.suffix == ".jsonl":
                for line in data.decode().splitlines():
                    json.loads(line)  # every line parses: nothing glued to the next
    assert not [p for p in folder.rglob("*.tmp")], "temporary files left behind"


def test_local_run_folder_on_a_full_disk_loses_nothing_and_tears_nothing(tmp_path, tiny_disk, rng, caplog):
    if not tiny_disk.mounted:
        pytest.skip("mount -t tmpfs is not permitted here; test_injected_full_disk covers the same path")
    root = tiny_disk.path / "runs"
    tracker = BonTracker("local", root=root, run_name="r", spool_dir=tmp_path / "wal", backoff_max=0.05)
    logged = {}
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        for step in range(3):
            proxy, true = _scores(rng)
            logged[step] = bon_curve(proxy, true)
            assert _timed_log(tracker, step, proxy, true) < STALL
        assert tracker.flush(30)
        tiny_disk.fill()
        for step in range(3, 8):
            proxy, true = _scores(rng)
            logged[step] = bon_curve(proxy, true)
            assert _timed_log(tracker, step, proxy, true) < STALL  # nothing raised into training
        time.sleep(0.5)  # the worker meets the full disk and retries
        _no_torn_lines(root)
        tiny_disk.free()
        tracker.finish(timeout=30)
    records = read_records(root / "r")
    assert [r.step for r in records] == list(range(8))
    assert all(r.curve.to_dict() == logged[r.step].to_dict() for r in records)
    rows = [json.loads(line) for line in (root / "r" / "bon_curves.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [s for s in range(8) for _ in logged[s].n]  # each row once
    _no_torn_lines(root)


def test_injected_full_disk_for_the_local_folder_and_the_log(tmp_path, full_disk_injection, rng):
    tracker = BonTracker(
        "local", root=tmp_path / "runs", run_name="r", charts=False, spool_dir=tmp_path / "wal", backoff_max=0.05
    )
    tracker.log_scores(0, *_scores(rng))
    assert tracker.flush(10)
    full_disk_injection["full"] = True  # both the run folder and the write-ahead log refuse now
    for step in range(1, 6):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL
    time.sleep(0.3)
    _no_torn_lines(tmp_path)
    full_disk_injection["full"] = False
    tracker.finish(timeout=20)
    assert [r.step for r in read_records(tmp_path / "runs" / "r")] == list(range(6))
    assert tracker.delivery_stats.dropped == 0
    _no_torn_lines(tmp_path)


def test_write_ahead_log_on_a_read_only_disk_with_the_service_down(tmp_path, tiny_disk, rng):
    if not tiny_disk.mounted:
        pytest.skip("mount -t tmpfs is not permitted here; test_tracker's disk-full tests inject the fault")
    down = FlakyService(down_for_calls=10**6)
    tracker = BonTracker(down, spool_dir=tiny_disk.path, backoff_max=0.05, max_memory_records=5)
    tiny_disk.read_only(True)
    try:
        for step in range(8):  # more than the memory bound: the oldest are dropped, counted, reported
            assert _timed_log(tracker, step, *_scores(rng)) < STALL
        tracker.finish(timeout=0.5)
    finally:
        tiny_disk.read_only(False)
    stats = tracker.delivery_stats
    assert stats.dropped == 3 and stats.dropped_steps == [0, 1, 2]


# ---- services ---------------------------------------------------------------------------------------------------


class FlakyService(Backend):
    """A spec'd fake service: down for a number of calls, then up; rejects chosen steps."""

    name = "flaky"

    def __init__(self, down_for_calls: int = 0, reject: tuple[int, ...] = ()):
        self.down_for_calls, self.reject, self.calls = down_for_calls, reject, 0
        self.received: list[int] = []

    def log_eval(self, record: EvalRecord) -> None:
        self.calls += 1
        if self.calls <= self.down_for_calls:
            raise ConnectionError("service unavailable")
        if record.step in self.reject:
            raise RejectedRecord(f"step {record.step} is out of range for this service")
        self.received.append(record.step)


def test_a_rejected_record_is_dead_lettered_and_never_blocks_the_rest(tmp_path, rng, caplog):
    service = FlakyService(reject=(2,))
    with caplog.at_level(logging.ERROR, logger="bon_tracker"):
        tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05)
        for step in range(5):
            tracker.log_scores(step, *_scores(rng))
        tracker.finish(timeout=10)
    assert service.received == [0, 1, 3, 4]
    (dead,) = WriteAheadLog(tracker.wal_path).dead_letters()
    assert dead["record"]["step"] == 2 and "out of range" in dead["reason"]
    messages = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(messages) == 1 and str(tracker.wal_path.with_suffix(".dead.jsonl")) in messages[0]


@pytest.fixture
def mlflow_server(tmp_path):
    pytest.importorskip("mlflow")
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.thaw()
    server.stop()


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def test_mlflow_server_frozen_then_resumed(tmp_path, mlflow_server, rng):
    tracker = BonTracker(
        "mlflow",
        tracking_uri=mlflow_server.url,
        experiment="frozen",
        charts=False,
        timeout=3,
        spool_dir=tmp_path / "wal",
        backoff_max=0.5,
    )
    tracker.log_scores(0, *_scores(rng))
    assert tracker.flush(60)
    run_id = tracker.backend.run_id
    mlflow_server.freeze()  # the port stays open; nothing answers
    try:
        for step in (1, 2, 3):
            assert _timed_log(tracker, step, *_scores(rng)) < STALL  # was 20 s per step before the worker
        start = time.perf_counter()
        assert tracker.flush(timeout=2) is False  # still frozen: flush gives up when told
        assert time.perf_counter() - start < STALL
    finally:
        mlflow_server.thaw()
    tracker.finish(timeout=90)
    key = next(k for k in tracker.history[0].scalars() if "true" in k)
    assert _metric_steps(mlflow_server.url, run_id, key) == [0, 1, 2, 3]  # each step exactly once
    assert not tracker.wal_path.exists()


def test_mlflow_server_gone_at_finish_then_sync_finishes_the_run(tmp_path, mlflow_server, rng, capsys):
    import mlflow

    tracker = BonTracker(
        "mlflow",
        tracking_uri=mlflow_server.url,
        experiment="gone",
        charts=False,
        timeout=2,
        max_retries=0,
        spool_dir=tmp_path / "wal",
        backoff_max=0.2,
    )
    tracker.log_scores(0, *_scores(rng))
    assert tracker.flush(60)
    run_id = tracker.backend.run_id
    mlflow_server.stop()
    for step in (1, 2):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL
    start = time.perf_counter()
    tracker.finish(timeout=2)
    assert time.perf_counter() - start < 15  # bounded by the timeout (plus one request in flight)
    wal = tracker.wal_path
    assert [e.record.step for e in WriteAheadLog(wal).pending() if e.record] == [1, 2]
    assert WriteAheadLog(wal).spec()["run_id"] == run_id  # sync finds the same run
    mlflow_server.start()  # back on the same port
    assert cli_main(["sync", str(wal)]) == 0
    assert "replayed 2 of 2" in capsys.readouterr().out
    client = mlflow.MlflowClient(mlflow_server.url)
    assert client.get_run(run_id).info.status == "FINISHED"  # sync ended the run the tracker started
    key = next(k for k in tracker.history[0].scalars() if "true" in k)
    assert _metric_steps(mlflow_server.url, run_id, key) == [0, 1, 2]
    assert "bon_curves.json" in [f.path for f in client.list_artifacts(run_id)]  # the cumulative table
    assert not wal.exists()


def test_mlflow_down_and_the_log_disk_full(tmp_path, full_disk_injection, rng):
    pytest.importorskip("mlflow")
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path / "server")  # not started yet: the service is down
    tracker = BonTracker(
        "mlflow",
        tracking_uri=server.url,
        experiment="down_full",
        charts=False,
        timeout=2,
        max_retries=0,
        spool_dir=tmp_path / "wal",
        backoff_max=0.5,
    )
    full_disk_injection["full"] = True
    try:
        for step in range(40):
            assert _timed_log(tracker, step, *_scores(rng, 4, 4)) < STALL  # was: 33 of 40 raised OSError
    finally:
        full_disk_injection["full"] = False
    server.start()
    try:
        tracker.finish(timeout=120)
        key = next(k for k in tracker.history[0].scalars() if "true" in k)
        assert _metric_steps(server.url, tracker.backend.run_id, key) == list(range(40))
        assert tracker.delivery_stats.dropped == 0
    finally:
        server.stop()


def test_mlflow_errors_are_classified_from_real_responses(shared_mlflow_server):
    import mlflow

    from bon_tracker.backends.mlflow import MlflowBackend
    from tests.mlflow_server import free_port

    backend = MlflowBackend(tracking_uri=shared_mlflow_server.url)
    client = mlflow.MlflowClient(shared_mlflow_server.url)
    with pytest.raises(mlflow.exceptions.MlflowException) as missing:
        client.get_run("0" * 32)
    assert backend.classify(missing.value) == "config"  # a run_id that does not exist
    run = client.create_run(client.create_experiment("classify"))
    client.log_param(run.info.run_id, "N", "16")
    with pytest.raises(mlflow.exceptions.MlflowException) as changed:
        client.log_param(run.info.run_id, "N", "32")  # MLflow refuses to change a param: 400
    assert backend.classify(changed.value) == "rejected"
    start = time.perf_counter()
    with pytest.raises(mlflow.exceptions.MlflowException) as down:  # a port nothing listens on: a server down
        MlflowBackend(tracking_uri=f"http://127.0.0.1:{free_port()}", max_retries=0, timeout=2)._open()
    assert time.perf_counter() - start < 30  # the backend's bounds, not MLflow's defaults (~244 s of back-off)
    assert backend.classify(down.value) == "transient"


def test_mlflow_run_id_that_does_not_exist_is_reported_loudly_not_spooled_silently(tmp_path, rng, caplog):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = BonTracker("mlflow", tracking_uri=uri, run_id="0" * 32, spool_dir=tmp_path / "wal")
    with caplog.at_level(logging.ERROR, logger="bon_tracker"):
        tracker.log_scores(0, *_scores(rng))
        tracker.flush(30)
    assert tracker.delivery_stats.config_error is not None
    assert any("not set up correctly" in r.getMessage() and "0" * 32 in r.getMessage() for r in caplog.records)
    tracker.finish(timeout=1)


# ---- W&B ----------------------------------------------------------------------------------------------------------


def test_wandb_online_without_network_never_holds_up_training(tmp_path, rng):
    wandb = pytest.importorskip("wandb")
    from tests.mlflow_server import free_port

    # Given to wandb.init itself: W&B keeps the settings of its first use in the process (offline in tests).
    unreachable = wandb.Settings(init_timeout=5, base_url=f"http://127.0.0.1:{free_port()}", api_key="x" * 40)
    tracker = BonTracker(
        "wandb",
        project="offline-net",
        mode="online",
        dir=str(tmp_path / "w"),
        images=False,
        init_kwargs={"settings": unreachable},
        spool_dir=tmp_path / "wal",
        backoff_max=1.0,
    )
    for step in range(3):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL  # was 90 s per call
    start = time.perf_counter()
    tracker.finish(timeout=3)
    assert time.perf_counter() - start < 12  # was 90 s; at most the timeout plus the call in flight
    assert [e.record.step for e in WriteAheadLog(tracker.wal_path).pending() if e.record] == [0, 1, 2]


def test_wandb_invalid_settings_are_an_error_at_construction(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "")  # not a boolean: W&B itself refuses it
    with pytest.raises(ConfigurationError, match="silent"):
        BonTracker("wandb", project="p", spool_dir=tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.iterdir())  # nothing spooled as if W&B were down


# ---- two writers ----------------------------------------------------------------------------------------------------


def _open_same_run(root: str, barrier, steps: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    tracker = BonTracker("local", root=root, run_name="same", charts=False, spool_dir=os.path.join(root, f"wal{seed}"))
    barrier.wait()  # both processes open the run folder at the same instant
    for step in steps:
        tracker.log_scores(step, *_scores(rng))
    tracker.finish(timeout=30)


def test_two_processes_opening_the_same_run_name_get_a_folder_each(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_open_same_run, args=(str(tmp_path), barrier, [0, 1, 2], seed)) for seed in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    folders = sorted(p for p in tmp_path.iterdir() if (p / "records").is_dir())
    assert len(folders) == 2 and folders[0].name == "same" and folders[1].name.startswith("same-")
    for folder in folders:
        assert [r.step for r in read_records(folder)] == [0, 1, 2]  # each step once per folder
        assert len((folder / "scalars.jsonl").read_text().splitlines()) == 3


def test_a_second_writer_of_a_live_run_folder_gets_an_error_naming_the_holder(tmp_path, rng):
    first = BonTracker("local", root=tmp_path, run_name="held", charts=False, spool_dir=tmp_path / "wal")
    first.log_scores(0, *_scores(rng))
    assert first.flush(10)
    with pytest.raises(ConfigurationError, match=f"being written by process {os.getpid()}"):
        BonTracker("local", root=tmp_path, run_id="held", spool_dir=tmp_path / "wal2")
    first.finish()
    second = BonTracker("local", root=tmp_path, run_id="held", charts=False, spool_dir=tmp_path / "wal2")
    second.log_scores(1, *_scores(rng))
    second.finish()
    assert [r.step for r in read_records(tmp_path / "held")] == [0, 1]
