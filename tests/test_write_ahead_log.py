"""The write-ahead log under the faults a campaign found in 0.2: threads, damaged lines,
scripts that never call finish(), a save_state during an outage, records a service
cannot take, locks left behind, and kills that split a run in two.

Every test uses the real parts: real processes killed with SIGKILL, a real MLflow (on
sqlite, or as an ``mlflow server`` process), the local run folder read back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from bon_tracker import BonTracker, EvalRecord, bon_curve
from bon_tracker.backends.local import LocalBackend, read_records
from bon_tracker.cli.main import main as cli_main
from bon_tracker.tracking.wal import Entry, WriteAheadLog

REPO = Path(__file__).resolve().parents[1]


def _scores(seed: int, prompts: int = 6, samples: int = 8):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(prompts, samples))
    return true + rng.normal(size=true.shape), true


def _record(step: int) -> EvalRecord:
    return EvalRecord.build(step, bon_curve(*_scores(step)))


def _closed_port_uri() -> str:
    from tests.mlflow_server import free_port

    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("server"))
    server.start()
    yield server
    with contextlib.suppress(Exception):
        server.thaw()
    server.stop()


def _metric_steps(uri: str, run_id: str, key: str = "bon/1_true/n0001") -> list[int]:
    import mlflow

    return sorted(m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, key))


def _runs(uri: str, experiment: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


# ---- 1. log_scores from several threads ---------------------------------------------------------------------


def _four_threads_then_killed(uri: str, spool: str, done: str) -> None:
    tracker = BonTracker(
        "mlflow", tracking_uri=uri, experiment="threads", charts=False, timeout=2, max_retries=0, spool_dir=spool
    )
    lock, steps = threading.Lock(), iter(range(40))

    def work() -> None:
        for _ in range(10):
            with lock:
                step = next(steps)
                proxy, true = _scores(step)
                tracker.log_scores(step, proxy, true)  # steps must increase: handed out and logged in order

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(done).write_text(str(tracker.wal_path))
    os.kill(os.getpid(), signal.SIGKILL)


def _four_threads_unordered(spool: str, root: str, out: str) -> None:
    """Each thread logs its own steps without coordination: the tracker's own lock orders them."""
    tracker = BonTracker("local", root=root, run_name="threads", charts=False, spool_dir=spool)
    barrier = threading.Barrier(4)

    def work(offset: int) -> None:
        barrier.wait()
        for i in range(10):
            tracker.log_scores(1000 * offset + i, *_scores(i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Path(out).write_text(json.dumps({"wal": str(tracker.wal_path), "logged": [r.step for r in tracker.history]}))
    os.kill(os.getpid(), signal.SIGKILL)


def test_four_threads_with_mlflow_down_then_a_kill_then_sync_lose_nothing(tmp_path, mlflow_server):
    mlflow_server.stop()  # down while the threads log
    ctx = multiprocessing.get_context("spawn")
    done = tmp_path / "wal_path"
    proc = ctx.Process(target=_four_threads_then_killed, args=(mlflow_server.url, str(tmp_path / "wal"), str(done)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    wal = WriteAheadLog(done.read_text())
    entries, bad = wal.read()
    assert bad == []  # the appends of four threads never overwrite one another
    assert sorted(e.record.step for e in entries) == list(range(40))
    mlflow_server.start()
    assert cli_main(["sync", str(wal.path)]) == 0
    (run,) = _runs(mlflow_server.url, "threads")
    assert _metric_steps(mlflow_server.url, run.info.run_id) == list(range(40))  # each step exactly once


def test_unsynchronised_threads_each_record_whole_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "out.json"
    proc = ctx.Process(target=_four_threads_unordered, args=(str(tmp_path / "wal"), str(tmp_path / "runs"), str(out)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    result = json.loads(out.read_text())
    logged = result["logged"]
    assert logged == sorted(logged) and len(set(logged)) == len(logged)  # what was accepted, in order
    if Path(result["wal"]).exists():
        assert WriteAheadLog(result["wal"]).read()[1] == []
        assert cli_main(["sync", result["wal"]]) == 0
    assert [r.step for r in read_records(tmp_path / "runs" / "threads")] == logged


# ---- 2 and 15. damaged lines -----------------------------------------------------------------------------------


def _log_of_five(tmp_path: Path, name: str = "local-0123456789ab") -> WriteAheadLog:
    wal = WriteAheadLog(tmp_path / "wal" / f"{name}.jsonl")
    wal.write_spec(LocalBackend(root=tmp_path / "runs", run_name=name, charts=False).spec())
    for step in range(5):
        wal.append(Entry(seq=step, record=_record(step)))
    wal.close()
    return wal


def _rewrite_line(path: Path, number: int, change) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = change(lines[number - 1])
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda line: line[:40] + bytes(b ^ 0x5A for b in line[40:48]) + line[48:], id="flipped-bytes"),
        pytest.param(lambda line: b"[1, 2, 3]", id="json-not-a-record"),
        pytest.param(lambda line: line.replace(b'"curve"', b'"cuxve"', 1), id="renamed-key"),
        pytest.param(lambda line: line.replace(b'"step":2', b'"step":7', 1), id="flipped-digit"),
    ],
)
def test_a_damaged_line_is_set_aside_by_number_and_every_good_record_delivered(tmp_path, capsys, damage):
    wal = _log_of_five(tmp_path)
    _rewrite_line(wal.path, 3, damage)  # step 2
    damaged = wal.path.read_bytes().split(b"\n")[2].decode(errors="replace")
    assert cli_main(["sync", str(wal.path)]) == 1  # done, but something needs a look
    err = capsys.readouterr().err
    assert f"{wal.path}: line 3:" in err and str(wal.bad_path) in err
    folder = tmp_path / "runs" / "local-0123456789ab"
    assert [r.step for r in read_records(folder)] == [0, 1, 3, 4]  # never step 7, never a crash
    (kept,) = wal.bad_lines()
    assert kept["line"] == 3 and kept["text"] == damaged
    assert not wal.path.exists()  # delivered; the bad line lives on beside it


def _framed(entry: dict) -> bytes:
    body = json.dumps(entry, separators=(",", ":")).encode()
    return b'{"crc32":"%08x","entry":%s}' % (zlib.crc32(body), body)


def test_a_lines_curve_is_packed_bit_for_bit_and_older_lines_with_numbers_still_read():
    """The curve's float arrays travel as the hex of their float64 bytes (no float is formatted on the
    training thread): read back bit for bit, NaN and inf included; a line that holds them as JSON
    numbers (written before) gives the same record; a malformed packing is a damaged line."""
    from bon_tracker.tracking.wal import PACKED_CURVE_FIELDS, parse_line

    curve = bon_curve(*_scores(3, prompts=1))  # one prompt: every standard error is NaN
    assert np.isnan(curve.true_se).all() and len(curve.n) == 4
    curve = dataclasses.replace(
        curve, proxy_mean=np.array([np.inf, -np.inf, 5e-324, -0.0]), true_mean=curve.true_mean / 3
    )
    record = EvalRecord.build(4, curve, fit=False)
    line = Entry(seq=7, record=record).to_line()
    entry = json.loads(line)["entry"]
    assert set(entry["curve_f64"]) == set(PACKED_CURVE_FIELDS)
    assert not set(PACKED_CURVE_FIELDS) & set(entry["record"]["curve"])  # no float formatted for them
    back = parse_line(line.rstrip(b"\n")).record
    for name in PACKED_CURVE_FIELDS:
        assert getattr(back.curve, name).tobytes() == getattr(record.curve, name).tobytes(), name
    assert json.dumps(back.to_json()) == json.dumps(record.to_json())  # NaN is written as NaN on both sides
    older = {"seq": 7, "record": json.loads(json.dumps(record.to_json(), allow_nan=True))}  # numbers in the record
    for old_line in (_framed(older), json.dumps(older).encode()):
        assert parse_line(old_line).record.curve.to_dict().keys() == back.curve.to_dict().keys()
        for name in PACKED_CURVE_FIELDS:
            np.testing.assert_array_equal(getattr(parse_line(old_line).record.curve, name), getattr(back.curve, name))
    for bad, message in (
        ("abc", "not the hex of float64 values"),
        ("zz" * 8, "not a valid eval record"),
        (3, "not the hex"),
    ):
        broken = {**entry, "curve_f64": {**entry["curve_f64"], "kl": bad}}
        with pytest.raises(ValueError, match=message):
            parse_line(_framed(broken))


def test_the_training_threads_line_is_byte_for_byte_the_generic_encoders():
    """The curve-only line (formatted directly on the training thread) is exactly what the
    generic encoder writes for it: ties, NaN and inf, no policy, any context and names; a
    record with anything more, or an int timestamp, takes the generic path."""
    from bon_tracker.tracking.wal import _curve_only_body

    tied = bon_curve([[1.0, 1.0, 2.0], [0.5, 3.0, 3.0]], [[0.0, 1.0, 2.0], [1.0, 2.0, 0.5]])
    odd = dataclasses.replace(tied, proxy_mean=np.array([np.nan, np.inf, -np.inf]))
    cases = [
        EvalRecord.build(3, tied, policy_kl=0.25, fit=False),
        EvalRecord.build(2**62, odd, fit=False, context={"lr": 1e-5, "tag": 'a "q"\n\u00e9\u2603', "x": None}),
        EvalRecord.build(5, bon_curve(*_scores(9)), fit=False, key_prefix="\u00e9/p", proxy_name="r\\m", true_name="t"),
        dataclasses.replace(EvalRecord.build(6, tied, policy_kl=0.5, fit=False), timestamp=float("nan")),
    ]
    assert tied.has_ties
    for record in cases:
        entry = Entry(seq=11, record=record)
        body = _curve_only_body(entry)
        assert body is not None and body == entry._body()
        assert json.loads(entry.to_line())["entry"] == json.loads(body)
    for record in (
        dataclasses.replace(cases[0], predictions=({"n": 4, "true_mean": 0.5},)),
        dataclasses.replace(cases[0], timestamp=12),  # json writes an int as one
        dataclasses.replace(cases[0], alert_states={"gap": 1}),
    ):
        assert _curve_only_body(Entry(seq=1, record=record)) is None
        line = Entry(seq=1, record=record).to_line()
        assert json.loads(line)["entry"]["record"]["step"] == record.step


def test_a_garbled_spec_or_a_bad_log_never_stops_the_other_logs(tmp_path, capsys):
    broken = _log_of_five(tmp_path, "local-aaaaaaaaaaaa")
    broken.spec_path.write_text('{"backend"')  # garbled
    good = _log_of_five(tmp_path, "local-bbbbbbbbbbbb")
    assert cli_main(["sync", "--spool-dir", str(tmp_path / "wal")]) == 1
    captured = capsys.readouterr()
    assert "backend spec" in captured.err and "5 record(s) kept" in captured.err
    assert [r.step for r in read_records(tmp_path / "runs" / "local-bbbbbbbbbbbb")] == [0, 1, 2, 3, 4]
    assert broken.path.exists() and not good.path.exists()  # kept for a sync once the spec is restored


def test_a_tracker_resumed_on_a_damaged_log_never_raises_and_delivers_the_rest(tmp_path, caplog):
    wal = _log_of_five(tmp_path)
    _rewrite_line(wal.path, 2, lambda line: b"[1, 2, 3]")
    state = {"backend": wal.spec(), "last_step": 4, "wal": str(wal.path), "alerts": None}
    tracker = BonTracker("local", resume=state, spool_dir=tmp_path / "wal")
    tracker.log_scores(5, *_scores(5))  # adopts the log: no exception into training
    tracker.finish(timeout=30)
    assert "line 2 of the write-ahead log" in caplog.text
    assert [r.step for r in read_records(tmp_path / "runs" / "local-0123456789ab")] == [0, 2, 3, 4, 5]
    assert wal.bad_lines()[0]["line"] == 2


# ---- 3. a script that ends without finish() ---------------------------------------------------------------------

_SCRIPT = """
import sys, numpy as np
from bon_tracker import BonTracker
tracker = BonTracker({backend!r}, spool_dir={spool!r}, finish_timeout={timeout}, charts=False, **{options!r})
rng = np.random.default_rng(0)
for step in range(5):
    true = rng.normal(size=(4, 8))
    tracker.log_scores(step, true + rng.normal(size=true.shape), true)
print("logged", flush=True)
"""


def _run_script(
    tmp_path: Path, backend: str, finish_timeout: float, **options
) -> tuple[subprocess.CompletedProcess, float]:
    script = _SCRIPT.format(backend=backend, spool=str(tmp_path / "wal"), timeout=finish_timeout, options=options)
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=dict(os.environ)
    )
    return result, time.monotonic() - start


def test_a_script_that_never_calls_finish_delivers_every_record_at_exit(tmp_path):
    result, _ = _run_script(tmp_path, "local", 30, root=str(tmp_path / "runs"), run_name="script")
    assert result.returncode == 0, result.stderr
    assert [r.step for r in read_records(tmp_path / "runs" / "script")] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "wal").glob("*.jsonl"))  # nothing left for a sync


def test_at_exit_with_the_service_down_the_sync_command_is_printed_within_the_timeout(tmp_path):
    pytest.importorskip("mlflow")
    uri = _closed_port_uri()
    result, seconds = _run_script(tmp_path, "mlflow", 2, tracking_uri=uri, timeout=1, max_retries=0)
    assert result.returncode == 0, result.stderr
    assert "bon-tracker sync" in result.stderr and "5 eval record(s) did not reach mlflow" in result.stderr
    assert seconds < 60  # the exit waits about finish_timeout (plus imports), never for the service
    (log,) = (tmp_path / "wal").glob("mlflow-*.jsonl")
    assert [e.record.step for e in WriteAheadLog(log).pending() if e.record] == [0, 1, 2, 3, 4]


# ---- 4. save_state during an outage ------------------------------------------------------------------------------


def test_save_state_never_waits_for_a_service_that_is_down(tmp_path):
    pytest.importorskip("mlflow")
    tracker = BonTracker(
        "mlflow", tracking_uri=_closed_port_uri(), charts=False, timeout=1, finish_timeout=30, spool_dir=tmp_path
    )
    tracker.log_scores(0, *_scores(0))
    start = time.monotonic()
    path = tracker.save_state(tmp_path / "checkpoint")
    assert time.monotonic() - start < 2.0  # was the whole finish_timeout (30 s)
    state = json.loads(path.read_text())
    assert state["backend"]["run_key"] == tracker.backend.run_key and state["wal"] == str(tracker.wal_path)
    tracker.finish(timeout=0.5)


def test_a_tracker_resumed_from_an_early_state_continues_the_same_mlflow_run(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = BonTracker("mlflow", tracking_uri=uri, experiment="resume", charts=False, spool_dir=tmp_path / "wal")
    first.log_scores(0, *_scores(0))
    state = first.state()  # before the run exists, perhaps: the run key names it anyway
    first.finish()
    second = BonTracker("mlflow", resume=state, spool_dir=tmp_path / "wal")
    second.log_scores(1, *_scores(1))
    second.finish()
    (run,) = _runs(uri, "resume")
    assert _metric_steps(uri, run.info.run_id) == [0, 1]
    # a local store has a page too: the one `mlflow ui` serves, and the command that serves it
    url = second.backend.ui_url
    assert url.startswith("http://127.0.0.1:5000/#/experiments/") and run.info.run_id in url
    assert "workflowType=machine_learning" in url
    assert f"mlflow ui --backend-store-uri {uri}, then {url}" in second.backend.location


# ---- 5 and 16. records a service cannot take ------------------------------------------------------------------


def test_context_values_are_checked_on_the_training_thread(tmp_path):
    tracker = BonTracker("local", root=tmp_path, charts=False, spool_dir=tmp_path / "wal")
    with pytest.raises(ValueError, match="context value big is too large for a float"):
        tracker.log_scores(0, *_scores(0), big=10**400)
    with pytest.raises(ValueError, match="context value loss must be finite"):
        tracker.log_scores(0, *_scores(0), loss=float("nan"))
    with pytest.raises(TypeError, match="context value cfg must be a number"):
        tracker.log_scores(0, *_scores(0), cfg={"a": 1})
    with pytest.raises(ValueError, match="at most 1000"):
        tracker.log_scores(0, *_scores(0), note="x" * 1001)
    with pytest.raises(ValueError, match="policy_kl is too large for a float"):
        tracker.log_scores(0, *_scores(0), policy_kl=10**400)
    tracker.log_scores(0, *_scores(0), lr=np.float32(1e-4), epoch=np.int64(2), tag="a")
    tracker.finish()


def test_a_record_the_worker_cannot_encode_is_dead_lettered_and_never_blocks_the_next(tmp_path, caplog):
    tracker = BonTracker("local", root=tmp_path, run_name="enc", charts=False, spool_dir=tmp_path / "wal")
    bad = EvalRecord.build(0, bon_curve(*_scores(0)), context={"big": 10**400})  # past the training-thread check
    assert tracker.log_record(bad)
    tracker.log_scores(1, *_scores(1))
    assert tracker.flush(30)
    tracker.finish()
    assert tracker.delivery_stats.dead_lettered == 1 and tracker.delivery_stats.delivered == 1
    assert [r.step for r in read_records(tmp_path / "enc")] == [1]
    assert "rejected the record of step 0 (OverflowError" in caplog.text
    assert "unreachable" not in caplog.text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"run_name": "r" * 300}, "run_name is 300 characters long"),
        ({"key_prefix": "bon\0x"}, "key_prefix must not contain control characters"),
        ({"proxy_name": "line\n" * 100_000}, "proxy_name is 500000 characters long"),
        ({"true_name": "a\nb"}, "true_name must not contain control characters"),
    ],
)
def test_names_and_prefixes_are_checked_at_construction(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        BonTracker("local", root=tmp_path, spool_dir=tmp_path / "wal", **options)


def test_backend_settings_of_the_wrong_type_name_the_setting(tmp_path):
    from bon_tracker.backends.mlflow import MlflowBackend

    with pytest.raises(ValueError, match=r"timeout must be a number of seconds, got '10' \(str\)"):
        MlflowBackend(timeout="10")
    with pytest.raises(TypeError, match="root must be a folder path"):
        LocalBackend(root=5)


# ---- 6. finish() gives back every lock --------------------------------------------------------------------------


class _LocalOutage(LocalBackend):
    """A local run folder whose writes fail while ``down`` is set (the folder is open, its lock held)."""

    down = True

    def log_eval(self, record: EvalRecord) -> None:
        self._open()
        if self.down:
            raise ConnectionError("simulated outage")
        super().log_eval(record)


def test_the_sync_command_finish_prints_works_in_the_same_process(tmp_path, caplog):
    backend = _LocalOutage(root=tmp_path / "runs", run_name="held", charts=False)
    tracker = BonTracker(backend, spool_dir=tmp_path / "wal", backoff_max=0.1)
    for step in range(3):
        tracker.log_scores(step, *_scores(step))
    tracker.finish(timeout=0.5)
    assert "replay them later with: bon-tracker sync" in caplog.text
    assert cli_main(["sync", str(tracker.wal_path)]) == 0  # no lock of this live process in the way
    assert [r.step for r in read_records(tmp_path / "runs" / "held")] == [0, 1, 2]


# ---- 7 and 14. a kill never splits a run ------------------------------------------------------------------------


def _killed_at_create_run(uri: str, spool: str, when: str) -> None:
    import mlflow

    real = mlflow.MlflowClient.create_run

    def create_run(self, *args, **kwargs):
        if when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, *args, **kwargs)
        if when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ConnectionError("the response to create_run was lost")  # "lost": the worker retries

    mlflow.MlflowClient.create_run = create_run
    tracker = BonTracker("mlflow", tracking_uri=uri, experiment="split", charts=False, spool_dir=spool, backoff_max=0.2)
    tracker.log_scores(0, *_scores(0))
    if when == "lost":  # every create_run "loses" its response: the run key finds the one created
        assert tracker.flush(60)
        tracker.log_scores(1, *_scores(1))
        tracker.finish()
        return
    time.sleep(60)  # the worker kills this process inside create_run


@pytest.mark.parametrize("when", ["before", "after", "lost"])
def test_a_kill_or_a_lost_response_during_the_first_delivery_never_makes_a_second_run(tmp_path, when):
    pytest.importorskip("mlflow")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_killed_at_create_run, args=(uri, str(tmp_path / "wal"), when))
    proc.start()
    proc.join(120)
    assert proc.exitcode == (0 if when == "lost" else -signal.SIGKILL)
    for log in (tmp_path / "wal").glob("mlflow-*.jsonl"):
        assert cli_main(["sync", str(log)]) == 0
    (run,) = _runs(uri, "split")  # one run, whatever the kill point
    assert _metric_steps(uri, run.info.run_id) == ([0, 1] if when == "lost" else [0])


def _killed_in_first_local_delivery(root: str, spool: str) -> None:
    import bon_tracker.backends.local as local

    real = local._append_lines

    def append_then_die(path, lines):
        real(path, lines)
        os.kill(os.getpid(), signal.SIGKILL)  # the record file and one table are written, nothing else

    local._append_lines = append_then_die
    tracker = BonTracker("local", root=root, run_name="killed", charts=False, spool_dir=spool)
    tracker.log_scores(0, *_scores(0))
    time.sleep(60)


def test_a_kill_during_the_first_local_delivery_is_continued_in_the_same_folder(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    proc = ctx.Process(target=_killed_in_first_local_delivery, args=(str(tmp_path / "runs"), str(tmp_path / "wal")))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    (log,) = (tmp_path / "wal").glob("local-*.jsonl")
    assert cli_main(["sync", str(log)]) == 0
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["killed"]  # no "killed-1a2b3c"
    folder = tmp_path / "runs" / "killed"
    assert [r.step for r in read_records(folder)] == [0]
    assert len((folder / "scalars.jsonl").read_text().splitlines()) == 1  # the torn tables were rebuilt once


# ---- issue 20: where the run went; a local folder is complete when finish() returns ----------------------------


class _SlowCharts(LocalBackend):
    """A run folder whose per-step chart takes 0.3 s (as matplotlib does on a busy machine)."""

    def _draw_step(self, record: EvalRecord) -> None:
        time.sleep(0.3)


def test_finish_completes_a_local_folder_however_long_its_charts_take_and_names_it(tmp_path, capsys, caplog):
    tracker = BonTracker(_SlowCharts(root=tmp_path, run_name="slow", charts=False), spool_dir=tmp_path / "wal")
    for step in range(8):
        tracker.log_scores(step, *_scores(step))
    tracker.finish(timeout=0.5)  # 8 x 0.3 s of charts: more than the timeout, still complete
    assert [r.step for r in read_records(tmp_path / "slow")] == list(range(8))
    assert "did not reach" not in caplog.text and not tracker.wal_path.exists()
    assert f"bon_tracker: 8 eval step(s) logged to {tmp_path / 'slow'}" in capsys.readouterr().err


def test_a_second_run_with_a_taken_name_says_where_it_writes(tmp_path, caplog):
    for _ in range(2):
        with BonTracker("local", root=tmp_path, run_name="my-run", charts=False, spool_dir=tmp_path / "wal") as t:
            t.log_scores(0, *_scores(0))
    (other,) = [p for p in tmp_path.iterdir() if p.name.startswith("my-run-")]
    assert f"the run folder {tmp_path / 'my-run'} holds another run; this run is written to {other}" in caplog.text
    assert "pass run_id='my-run'" in caplog.text


_THREAD_SCRIPT = """
import threading, time, numpy as np
from bon_tracker import BonTracker
tracker = BonTracker("local", root={root!r}, run_name="thread", charts=False, spool_dir={spool!r})
first = {first}
if first:  # the tracker's exit hook is registered while the main thread lives
    tracker.log_scores(0, np.ones((2, 4)), np.ones((2, 4)))
def train():
    rng = np.random.default_rng(0)
    for step in range(first, 4):
        time.sleep(0.5)  # still training after the main thread has ended
        true = rng.normal(size=(4, 8))
        tracker.log_scores(step, true + rng.normal(size=true.shape), true)
threading.Thread(target=train).start()
"""


@pytest.mark.parametrize("first", [0, 1])
def test_training_in_a_thread_that_outlives_the_main_thread_is_finished_after_it(tmp_path, first):
    script = _THREAD_SCRIPT.format(root=str(tmp_path / "runs"), spool=str(tmp_path / "wal"), first=first)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [r.step for r in read_records(tmp_path / "runs" / "thread")] == [0, 1, 2, 3]


def test_write_spec_rewrites_the_spec_only_when_it_changes_even_if_the_caller_mutates_its_dict(tmp_path):
    wal = WriteAheadLog(tmp_path / "log.jsonl")
    spec = {"backend": "local", "options": {"root": "a"}}
    wal.write_spec(spec)
    first = wal.spec_path.stat().st_mtime_ns
    wal.spec_path.write_text(json.dumps({"backend": "local", "options": {"root": "a"}}))  # same content, new stamp
    stamp = wal.spec_path.stat().st_mtime_ns
    wal.write_spec({"backend": "local", "options": {"root": "a"}})  # equal: not written again
    assert wal.spec_path.stat().st_mtime_ns == stamp and stamp >= first
    spec["options"]["root"] = "b"  # the caller changes the dict it passed before
    wal.write_spec(spec)
    assert wal.spec() == {"backend": "local", "options": {"root": "b"}}
    wal.write_spec({"backend": "local", "options": {"root": "a"}})
    assert wal.spec() == {"backend": "local", "options": {"root": "a"}}
