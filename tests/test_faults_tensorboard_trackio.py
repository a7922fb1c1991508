"""Faults as they happen, for the TensorBoard and trackio backends: the same ones
``test_delivery_faults`` drives through MLflow and the local run folder.

* a training process killed (SIGKILL) in the middle of logging, then ``bon-tracker sync``;
* two processes writing one log dir (TensorBoard) or one project and run name (trackio) at once;
* a full disk (a real tmpfs, ``TinyDisk``) under the log dir or trackio's store, then freed.

Every test reads back from the real store (TensorBoard's EventAccumulator and event-file
loader; trackio's local SQLite store through ``SQLiteStorage``) and checks that each step
is there exactly once, with the values the training process logged.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when first imported
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="bon_tracker_trackio_")

from bon_tracker import BonTracker, EvalRecord
from bon_tracker.backends import ConfigurationError
from bon_tracker.cli.main import main as cli_main
from bon_tracker.tracking.wal import WriteAheadLog, wal_files
from tests.test_delivery_faults import STALL, TinyDisk, _scores, _timed_log, full_disk_injection  # noqa: F401

CHILD_TIMEOUT = 120  # seconds a child process may take (a spawn imports numpy, tensorboard, trackio)


# ---- helpers ----------------------------------------------------------------------------------------------------


def _spawn(target, *args):
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    return process


def _join(*processes):
    for process in processes:
        process.join(CHILD_TIMEOUT)
        if process.is_alive():
            process.kill()
        assert process.exitcode == 0, f"child exited with {process.exitcode}"


def _wait_for(condition, timeout=CHILD_TIMEOUT, what="a condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _logged_records(spool: Path) -> dict[int, EvalRecord]:
    """Every record a (killed) tracker appended to its write-ahead log, by step: what its
    log_scores calls accepted, delivered or not."""
    (path,) = wal_files(spool)
    records = {e.record.step: e.record for e in WriteAheadLog(path).entries() if e.record is not None}
    assert records, f"{path} holds no records"
    return records


def _pending_steps(spool: Path) -> list[int]:
    (path,) = wal_files(spool)
    return [e.record.step for e in WriteAheadLog(path).pending() if e.record is not None]


def _child_result(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_result(path: str, tracker: BonTracker) -> None:
    stats = tracker.delivery_stats
    result = {
        "records": [r.to_json() for r in tracker.history],
        "config_error": stats.config_error,
        "spec": tracker.backend.spec(),
        "pid": os.getpid(),
    }
    Path(path).write_text(json.dumps(result), encoding="utf-8")


# ---- TensorBoard: reading back ------------------------------------------------------------------------------------


def _tb_accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )

    return EventAccumulator(str(log_dir), size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()


def _tb_values(acc, tag: str) -> dict[int, float]:
    from tensorboard.util import tensor_util

    events = acc.Tensors(tag)
    steps = [e.step for e in events]
    assert len(set(steps)) == len(steps), f"{tag} logged twice at a step: {sorted(steps)}"
    return {e.step: tensor_util.make_ndarray(e.tensor_proto).item() for e in events}


def _assert_tb_holds_exactly(log_dir, records: dict[int, EvalRecord]) -> None:
    """The log dir holds these records and nothing else: every scalar of each at its step,
    once (read with TensorBoard's own EventAccumulator), and the exact record."""
    from bon_tracker.backends.tensorboard import TensorBoardBackend

    acc = _tb_accumulator(log_dir)
    keys = {key for record in records.values() for key in record.scalars()}
    for key in keys:  # some scalars exist only at some steps (a fitted Goodhart point)
        values = _tb_values(acc, key)
        expected = {step: r.scalars()[key] for step, r in records.items() if key in r.scalars()}
        assert sorted(values) == sorted(expected), key
        for step, value in expected.items():
            assert values[step] == np.float32(value), (key, step)
    _, read = TensorBoardBackend.read_records(str(log_dir))
    assert [r.to_json() for r in read] == [records[s].to_json() for s in sorted(records)]
    _assert_tb_not_torn(log_dir)


def _assert_tb_not_torn(log_dir, retrying: bool = False) -> None:
    """Every event file is whole (header and one step event, checksums valid), and no
    temporary file is left: TensorBoard never sees half a step."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    log_dir = Path(log_dir)
    for path in log_dir.iterdir():
        if "tfevents" in path.name and "bon_tracker" in path.name:
            events = [event_pb2.Event.FromString(raw) for raw in RawEventFileLoader(str(path)).Load()]
            assert len(events) == 2 and events[0].file_version == "brain.Event:2", path
            assert events[1].summary.value, path
    if not retrying:  # while the worker retries every 50 ms, its attempt in flight has a temporary file
        assert not [p.name for p in log_dir.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


# ---- TensorBoard: one writer per log dir ---------------------------------------------------------------------------


def _tb_writer(cwd: str, barrier, seed: int, steps: list[int], out: str, options: dict) -> None:
    os.chdir(cwd)
    import tensorboard.compat.proto.event_pb2  # noqa: F401  (imported before the race, not during it)

    rng = np.random.default_rng(seed)
    tracker = BonTracker(
        "tensorboard", charts=False, spool_dir=os.path.join(cwd, f"wal{seed}"), backoff_max=0.2, **options
    )
    barrier.wait()  # both processes log at the same instant
    for step in steps:
        tracker.log_scores(step, *_scores(rng))
        time.sleep(0.05)  # the two processes overlap for a while
    tracker.finish(timeout=30)
    _write_result(out, tracker)


def test_tensorboard_two_processes_with_the_same_run_name_get_a_log_dir_each(tmp_path):
    pytest.importorskip("tensorboard")
    barrier = multiprocessing.get_context("spawn").Barrier(2)
    outs = [tmp_path / f"out{seed}.json" for seed in (1, 2)]
    procs = [
        _spawn(_tb_writer, str(tmp_path), barrier, seed, list(range(10)), str(out), {"run_name": "same"})
        for seed, out in zip((1, 2), outs, strict=True)
    ]
    _join(*procs)
    folders = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    # Was: one folder, and 10 of the 20 steps overwritten by the other process.
    assert len(folders) == 2 and folders[0].name == "same" and folders[1].name.startswith("same-")
    by_dir = {}
    for out in outs:
        result = _child_result(out)
        assert result["config_error"] is None
        by_dir[Path(result["spec"]["log_dir"])] = {r["step"]: EvalRecord.from_json(r) for r in result["records"]}
    assert sorted(by_dir) == [f.resolve() for f in folders]
    for folder, records in by_dir.items():
        assert sorted(records) == list(range(10))
        _assert_tb_holds_exactly(folder, records)  # every step of that process, exactly once


def test_tensorboard_two_processes_on_one_log_dir_lose_no_step(tmp_path, capsys):
    """Two writers given the same log dir: one holds it, the other's delivery stops with an
    error naming the holder and keeps its records for ``bon-tracker sync``; nothing is lost."""
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "shared"
    barrier = multiprocessing.get_context("spawn").Barrier(2)
    outs = [tmp_path / f"out{seed}.json" for seed in (1, 2)]
    procs = [
        _spawn(_tb_writer, str(tmp_path), barrier, seed, steps, str(out), {"log_dir": str(log_dir)})
        for seed, steps, out in zip((1, 2), (list(range(0, 10)), list(range(10, 20))), outs, strict=True)
    ]
    _join(*procs)
    results = [_child_result(out) for out in outs]
    refused = [r for r in results if r["config_error"]]
    assert len(refused) == 1, [r["config_error"] for r in results]
    holder = next(r for r in results if not r["config_error"])
    assert f"being written by process {holder['pid']}" in refused[0]["config_error"]
    assert cli_main(["sync", "--spool-dir", str(tmp_path / f"wal{1 + results.index(refused[0])}")]) == 0
    assert "replayed 10 record(s); 0 remain" in capsys.readouterr().out
    records = {r["step"]: EvalRecord.from_json(r) for result in results for r in result["records"]}
    assert sorted(records) == list(range(20))
    _assert_tb_holds_exactly(log_dir, records)  # both processes' steps, each once


def _tb_hold_then_die(log_dir: str, record: dict) -> None:
    from bon_tracker.backends.tensorboard import TensorBoardBackend

    backend = TensorBoardBackend(log_dir=log_dir, charts=False)
    backend.log_eval(EvalRecord.from_json(record))
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding the log dir: its lock file stays behind


def _records(rng, steps, prompts=8, samples=8) -> dict[int, EvalRecord]:
    from bon_tracker.core import bon_curve

    out = {}
    for step in steps:
        proxy, true = _scores(rng, prompts, samples)
        out[step] = EvalRecord.build(step, bon_curve(proxy, true), policy_kl=step / 10)
    return out


def test_tensorboard_a_live_writer_holds_its_log_dir_and_a_dead_ones_lock_is_taken_over(tmp_path, rng):
    pytest.importorskip("tensorboard")
    from bon_tracker.backends.tensorboard import LOCK_FILE, TensorBoardBackend

    records = _records(rng, range(4))
    log_dir = tmp_path / "tb"
    first = TensorBoardBackend(log_dir=log_dir, charts=False)
    first.log_eval(records[0])
    held = f"being written by process {os.getpid()}"
    with pytest.raises(ConfigurationError, match=held):
        TensorBoardBackend(log_dir=log_dir).check()
    second = TensorBoardBackend(log_dir=log_dir, charts=False)
    with pytest.raises(ConfigurationError, match=held):
        second.log_eval(records[1])
    first.finish()  # lets go of the log dir
    second.log_eval(records[1])
    second.finish()

    child = _spawn(_tb_hold_then_die, str(log_dir), records[2].to_json())
    child.join(CHILD_TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    assert (log_dir / LOCK_FILE).read_text().strip() == str(child.pid)  # the dead process's lock file
    third = TensorBoardBackend(log_dir=log_dir, charts=False)
    third.check()  # a lock nobody holds: taken over, no error
    third.log_eval(records[3])
    assert (log_dir / LOCK_FILE).read_text().strip() == str(os.getpid())
    third.finish()
    _assert_tb_holds_exactly(log_dir, records)


# ---- TensorBoard: run names ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_name", "problem"),
    [
        ("..", "'.' or '..'"),
        (".", "'.' or '..'"),
        ("/", "path separator"),
        ("a/../..", "path separator"),
        ("../escape", "path separator"),
        ("/tmp/elsewhere", "path separator"),
        ("C:\\runs\\x", "path separator"),
        ("", "empty"),
        ("   ", "empty"),
        ("a\0b", "control character"),
        ("line\nbreak", "control character"),
        ("x" * 201, "201 characters"),
    ],
)
def test_tensorboard_run_name_that_is_not_one_folder_name_is_refused_at_construction(tmp_path, run_name, problem):
    pytest.importorskip("tensorboard")
    from bon_tracker.backends.tensorboard import TensorBoardBackend

    with pytest.raises(ValueError, match="run_name") as error:
        TensorBoardBackend(run_name=run_name)
    assert problem in str(error.value)
    with pytest.raises(ValueError, match="run_name"):
        BonTracker("tensorboard", run_name=run_name, spool_dir=tmp_path / "wal")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, here or anywhere


def test_tensorboard_run_name_must_be_a_string():
    pytest.importorskip("tensorboard")
    from bon_tracker.backends.tensorboard import TensorBoardBackend

    with pytest.raises(TypeError, match="run_name must be a string, got int"):
        TensorBoardBackend(run_name=7)


def test_tensorboard_run_names_that_are_one_folder_name_are_kept(tmp_path, rng):
    pytest.importorskip("tensorboard")
    from bon_tracker.backends.tensorboard import TensorBoardBackend

    record = _records(rng, [0])[0]
    for name, folder in (("ppo lr=1e-5", "ppo-lr-1e-5"), ("...", "..."), ("x" * 200, "x" * 200)):
        backend = TensorBoardBackend(run_name=name, charts=False)
        backend.log_eval(record)
        backend.finish()
        assert Path(backend.spec()["log_dir"]) == (tmp_path / "runs" / folder).resolve()
    again = TensorBoardBackend(run_name="ppo lr=1e-5", charts=False)  # a name in use: a folder of its own
    again.log_eval(record)
    again.finish()
    assert Path(again.spec()["log_dir"]).name.startswith("ppo-lr-1e-5-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing outside runs/


# ---- killed in the middle of logging, then `bon-tracker sync` ------------------------------------------------------


def _train_until_killed(
    cwd: str, env: dict, backend: str, options: dict, spool: str, progress: str, slow_delivery: float
):
    """Logs up to 200 steps (a few a second), noting each step log_scores returned; the
    test kills this process somewhere in the middle."""
    os.chdir(cwd)
    os.environ.update(env)  # before trackio is imported: its folder is the test process's
    if slow_delivery and backend == "tensorboard":  # a slow disk under the log dir: delivery lags behind
        import bon_tracker.backends.tensorboard as tb

        write = tb.atomic_write_bytes

        def slow_write(path, data):
            time.sleep(slow_delivery)
            write(path, data)

        tb.atomic_write_bytes = slow_write
    rng = np.random.default_rng(7)
    tracker = BonTracker(backend, spool_dir=spool, backoff_max=0.2, **options)
    for step in range(200):
        tracker.log_scores(step, *_scores(rng))
        with open(progress, "a", encoding="utf-8") as f:
            f.write(f"{step}\n")
        time.sleep(0.01)
    time.sleep(CHILD_TIMEOUT)  # not reached: killed before


def _kill_mid_logging(
    tmp_path: Path, backend: str, options: dict, *, slow_delivery: float = 0.0, env: dict | None = None
) -> Path:
    spool, progress = tmp_path / "wal", tmp_path / "progress"
    args = (str(tmp_path), env or {}, backend, options, str(spool), str(progress), slow_delivery)
    child = _spawn(_train_until_killed, *args)
    try:

        def delivered_some() -> bool:
            paths = list(wal_files(spool)) if spool.is_dir() else []
            return bool(paths) and _lines(WriteAheadLog(paths[0]).acks_path) >= 3 and _lines(progress) >= 8

        _wait_for(delivered_some, what="the child to log and deliver a few steps")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.join(CHILD_TIMEOUT)
    assert child.exitcode == -signal.SIGKILL
    assert _lines(progress) < 200  # killed in the middle of logging
    return spool


def test_tensorboard_killed_mid_logging_then_sync_loses_nothing_and_duplicates_nothing(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    spool = _kill_mid_logging(tmp_path, "tensorboard", {"run_name": "killed", "charts": False}, slow_delivery=0.05)
    logged = _logged_records(spool)
    pending = _pending_steps(spool)
    assert pending, "the kill came after everything was delivered: nothing for sync to do"
    (wal,) = wal_files(spool)
    assert cli_main(["sync", str(wal)]) == 0
    assert f"replayed {len(pending)} record(s); 0 remain" in capsys.readouterr().out
    assert not wal.exists()
    _assert_tb_holds_exactly(tmp_path / "runs" / "killed", logged)  # 0 lost, 0 duplicated


# ---- full disk -----------------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path):
    disk = TinyDisk(tmp_path / "disk")
    if not disk.mounted:
        pytest.skip("mount -t tmpfs is not permitted here")
    yield disk
    disk.unmount()


def test_tensorboard_log_dir_on_a_full_disk_never_raises_tears_nothing_and_loses_nothing(tmp_path, tiny_disk, rng):
    pytest.importorskip("tensorboard")
    log_dir = tiny_disk.path / "tb"
    tracker = BonTracker("tensorboard", log_dir=log_dir, charts=False, spool_dir=tmp_path / "wal", backoff_max=0.05)
    for step in range(3):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL
    assert tracker.flush(30)
    tiny_disk.fill()
    for step in range(3, 8):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL  # nothing raised into training
    time.sleep(0.5)  # the worker meets the full disk and retries
    assert tracker.backend.run_id is not None
    _assert_tb_not_torn(log_dir, retrying=True)  # the worker retries every 50 ms: one attempt may be in flight
    tiny_disk.free()
    tracker.finish(timeout=30)
    assert tracker.delivery_stats.dropped == 0
    _assert_tb_not_torn(log_dir)
    _assert_tb_holds_exactly(log_dir, {r.step: r for r in tracker.history})


def test_tensorboard_with_the_log_dir_and_the_write_ahead_log_on_one_full_disk(tiny_disk, rng):
    pytest.importorskip("tensorboard")
    log_dir = tiny_disk.path / "tb"
    tracker = BonTracker(
        "tensorboard", log_dir=log_dir, spool_dir=tiny_disk.path / "wal", backoff_max=0.05, charts=False
    )
    tracker.log_scores(0, *_scores(rng))
    assert tracker.flush(30)
    tiny_disk.fill()  # the log dir and the write-ahead log refuse now: records wait in memory
    for step in range(1, 6):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL
    time.sleep(0.3)
    _assert_tb_not_torn(log_dir, retrying=True)
    tiny_disk.free()
    tracker.finish(timeout=30)
    assert tracker.delivery_stats.dropped == 0
    _assert_tb_holds_exactly(log_dir, {r.step: r for r in tracker.history})
    _assert_tb_not_torn(log_dir)  # and nothing left behind once delivered


def test_tensorboard_injected_full_disk_for_the_log_dir_and_the_write_ahead_log(tmp_path, request, rng):
    """The same without mounting (no root needed): every bon_tracker write fails as on a full
    disk (a short write, then ENOSPC), through test_delivery_faults' fixture."""
    pytest.importorskip("tensorboard")
    disk_full = request.getfixturevalue("full_disk_injection")
    log_dir = tmp_path / "tb"
    tracker = BonTracker("tensorboard", log_dir=log_dir, spool_dir=tmp_path / "wal", backoff_max=0.05, charts=False)
    tracker.log_scores(0, *_scores(rng))
    assert tracker.flush(30)
    disk_full["full"] = True
    for step in range(1, 6):
        assert _timed_log(tracker, step, *_scores(rng)) < STALL
    time.sleep(0.3)
    _assert_tb_not_torn(log_dir, retrying=True)  # the worker retries every 50 ms: one attempt may be in flight
    disk_full["full"] = False
    tracker.finish(timeout=30)
    assert tracker.delivery_stats.dropped == 0
    _assert_tb_not_torn(log_dir)
    _assert_tb_holds_exactly(log_dir, {r.step: r for r in tracker.history})


# ---- trackio ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def trackio_store():
    """trackio, with its store in a temporary folder (nothing of the user's touched)."""
    trackio = pytest.importorskip("trackio")
    from trackio.utils import TRACKIO_DIR

    if not str(TRACKIO_DIR).startswith(tempfile.gettempdir()):
        pytest.skip(f"trackio was imported before TRACKIO_DIR was set: its store is {TRACKIO_DIR}")
    for key in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_WEBHOOK_URL", "TRACKIO_BUCKET_ID"):
        os.environ.pop(key, None)  # restored after the test by conftest
    yield Path(TRACKIO_DIR)
    with contextlib.suppress(Exception):
        trackio.context_vars.current_run.set(None)


@pytest.fixture
def project() -> str:
    return f"bon-faults-{uuid.uuid4().hex[:8]}"


def _trackio_rows(project: str, run_name: str, run_id: str) -> dict[int, dict]:
    """The rows bon_tracker wrote to one trackio run, by step; a step stored twice fails."""
    from trackio.sqlite_storage import SQLiteStorage

    logs = [log for log in SQLiteStorage.get_logs(project, run=run_name, run_id=run_id) if "bon/eval_record" in log]
    steps = [log["step"] for log in logs]
    assert len(steps) == len(set(steps)), f"a step stored twice: {sorted(steps)}"
    return {log["step"]: log for log in logs}


def _assert_trackio_holds_exactly(project: str, run_name: str, run_id: str, records: dict[int, EvalRecord]) -> None:
    from bon_tracker.backends.trackio import TrackioBackend

    rows = _trackio_rows(project, run_name, run_id)
    assert sorted(rows) == sorted(records), f"missing {sorted(set(records) - set(rows))}"
    for step, record in records.items():
        row = rows[step]
        for key, value in record.scalars().items():
            assert row[key] == value, (step, key)  # trackio stores float64: exact
        assert len(row["bon/bon_curves"]["_value"]) == len(record.curve.n)  # the whole table
        assert row["bon/eval_record"] == json.dumps(record.to_json(), separators=(",", ":"))
    _, read = TrackioBackend.read_records(f"{project}/{run_name}", run_id=run_id)
    assert [r.to_json() for r in read] == [records[s].to_json() for s in sorted(records)]


def test_trackio_killed_mid_logging_then_sync_loses_nothing_and_duplicates_nothing(
    tmp_path, trackio_store, project, capsys
):
    options = {"project": project, "run_name": "killed", "charts": False}
    spool = _kill_mid_logging(tmp_path, "trackio", options, env={"TRACKIO_DIR": str(trackio_store)})
    logged = _logged_records(spool)
    (wal,) = wal_files(spool)
    spec = WriteAheadLog(wal).spec()
    assert spec["run_id"] and spec["resume"] == "must"  # the run was opened before the kill
    assert cli_main(["sync", str(wal)]) == 0, capsys.readouterr().err
    assert not wal.exists()
    # Was: the steps trackio still held in memory when the process died (acknowledged, not
    # yet in its store) were lost, and sync skipped them as delivered.
    _assert_trackio_holds_exactly(project, "killed", spec["run_id"], logged)


def _trackio_writer(cwd: str, store: str, barrier, seed: int, out: str, project: str) -> None:
    os.chdir(cwd)
    os.environ["TRACKIO_DIR"] = store  # before trackio is imported: the test process's folder
    rng = np.random.default_rng(seed)
    tracker = BonTracker(
        "trackio",
        project=project,
        run_name="shared",
        charts=False,
        spool_dir=os.path.join(cwd, f"wal{seed}"),
        backoff_max=0.2,
    )
    barrier.wait()  # both processes write the same project's store at once
    for step in range(8):
        tracker.log_scores(step, *_scores(rng))
    tracker.finish(timeout=60)
    _write_result(out, tracker)


def test_trackio_two_processes_on_one_project_and_run_name_lose_no_step(tmp_path, trackio_store, project):
    barrier = multiprocessing.get_context("spawn").Barrier(2)
    outs = [tmp_path / f"out{seed}.json" for seed in (1, 2)]
    procs = [
        _spawn(_trackio_writer, str(tmp_path), str(trackio_store), barrier, seed, str(out), project)
        for seed, out in zip((1, 2), outs, strict=True)
    ]
    _join(*procs)
    results = [_child_result(out) for out in outs]
    assert [r["config_error"] for r in results] == [None, None]
    run_ids = [r["spec"]["run_id"] for r in results]
    assert len(set(run_ids)) == 2  # trackio makes two runs of that name; each process writes its own
    for result in results:
        records = {r["step"]: EvalRecord.from_json(r) for r in result["records"]}
        assert sorted(records) == list(range(8))
        _assert_trackio_holds_exactly(project, "shared", result["spec"]["run_id"], records)
    assert not [p for seed in (1, 2) for p in wal_files(tmp_path / f"wal{seed}")]  # everything delivered


def test_trackio_store_on_a_full_disk_never_raises_tears_nothing_and_loses_nothing(
    tmp_path, trackio_store, project, rng, caplog
):
    """trackio's whole folder on a tmpfs that fills up: trackio itself only warns when its
    store refuses a write; the backend finds the step missing and retries until the disk
    has room again."""
    disk = TinyDisk(trackio_store)  # mounted over trackio's folder for this test only
    if not disk.mounted:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        tracker = BonTracker("trackio", project=project, run_name="full", spool_dir=tmp_path / "wal", backoff_max=0.05)
        for step in range(3):
            assert _timed_log(tracker, step, *_scores(rng)) < STALL
        assert tracker.flush(60)
        run_id = tracker.backend.run_id
        disk.fill()
        with caplog.at_level(logging.WARNING, logger="bon_tracker"):
            for step in range(3, 8):
                assert _timed_log(tracker, step, *_scores(rng)) < STALL  # nothing raised into training
            time.sleep(1.5)  # the worker meets the full disk (trackio cannot even read its store now)
        assert "trackio backend is unreachable" in caplog.text  # and retries, in the background
        assert tracker.delivery_stats.config_error is None
        disk.free()
        tracker.finish(timeout=60)
        assert tracker.delivery_stats.dropped == 0
        # Was: steps lost (trackio only warns when its store refuses a row, and the step was
        # acknowledged), and a chart the disk refused dropped from its row.
        _assert_trackio_holds_exactly(project, "full", run_id, {r.step: r for r in tracker.history})
        rows = _trackio_rows(project, "full", run_id)
        for step in range(8):  # every row whole: its chart is in the store too
            image = rows[step]["bon/0_curve"]
            assert (trackio_store / "media" / image["file_path"]).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    finally:
        disk.unmount()
