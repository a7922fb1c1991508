"""BonTracker on the local backend: values read back, durability, resuming, bad input."""

from __future__ import annotations

import csv
import json
import logging
import time

import numpy as np
import pytest

from bon_tracker import Backend, BonTracker, EvalRecord, bon_curve
from bon_tracker.backends.local import LocalBackend, read_records
from bon_tracker.tracking.wal import WriteAheadLog


def _scores(rng, prompts=16, samples=16):
    true = rng.normal(size=(prompts, samples))
    return true + rng.standard_t(2, size=true.shape), true


def test_local_run_folder_holds_exactly_the_curves(tmp_path, rng):
    logged = []
    with BonTracker("local", root=tmp_path, run_name="exp 1", ns=[1, 2, 4, 16]) as tracker:
        for step in (0, 50, 100):
            proxy, true = _scores(rng)
            tracker.log_scores(step, proxy, true, lr=0.1)
            logged.append((step, bon_curve(proxy, true, ns=[1, 2, 4, 16])))
    run_dir = tmp_path / "exp-1"
    records = read_records(run_dir)
    assert [r.step for r in records] == [0, 50, 100]
    for record, (step, curve) in zip(records, logged):
        assert record.step == step
        assert record.curve.to_dict() == curve.to_dict()
    scalars = [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert [s["step"] for s in scalars] == [0, 50, 100]
    for row, (_, curve) in zip(scalars, logged):
        assert row["bon/1_true/n0016"] == curve.true_mean[-1]
        assert row["bon/2_proxy/n0004"] == curve.proxy_mean[2]
        assert row["bon/3_gap/n0002"] == curve.proxy_mean[1] - curve.true_mean[1]
        assert row["bon/context/lr"] == 0.1
    with open(run_dir / "bon_curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 4
    assert float(rows[5]["true_mean"]) == logged[1][1].true_mean[1]
    assert {int(r["step"]) for r in rows} == {0, 50, 100}
    jsonl = [json.loads(line) for line in (run_dir / "bon_curves.jsonl").read_text().splitlines()]
    assert jsonl[11]["proxy_se"] == logged[2][1].proxy_se[3]
    for name in ("curve_step_000000050.png", "overlay.png", "trend.png"):
        assert (run_dir / "charts" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64" in html and "Curve at step 100" in html
    meta = json.loads((run_dir / "run.json").read_text())
    assert meta["N"] == 16 and meta["P"] == 16 and meta["ns"] == [1, 2, 4, 16]


def test_scores_as_lists_tensors_and_ragged_rows(tmp_path, rng):
    torch = pytest.importorskip("torch")
    proxy, true = _scores(rng, 4, 8)
    ragged_p = [proxy[0, :5], proxy[1], proxy[2, :3], proxy[3]]
    ragged_t = [true[0, :5], true[1], true[2, :3], true[3]]
    with BonTracker("local", root=tmp_path) as tracker:
        a = tracker.log_scores(1, torch.tensor(proxy), torch.tensor(true))
        b = tracker.log_scores(2, proxy.tolist(), true.tolist())
        c = tracker.log_scores(3, [torch.tensor(r) for r in ragged_p], ragged_t)
    assert a.to_dict() == bon_curve(proxy, true).to_dict() == b.to_dict()
    assert c.to_dict() == bon_curve(ragged_p, ragged_t).to_dict()
    assert c.n_prompts.tolist() == [4, 4, 3, 2]


def test_bad_input_raises_and_writes_nothing(tmp_path, rng):
    proxy, true = _scores(rng)
    proxy[3, 4] = np.nan
    tracker = BonTracker("local", root=tmp_path)
    with pytest.raises(ValueError, match=r"step 7: proxy has 1 non-finite value\(s\) .*\(3, 4\)"):
        tracker.log_scores(7, proxy, true)
    with pytest.raises(ValueError, match=r"same shape, got \(16, 16\) and \(16, 15\)"):
        tracker.log_scores(7, true, true[:, :15])
    with pytest.raises(TypeError, match="step must be an integer"):
        tracker.log_scores(1.5, true, true)
    with pytest.raises(ValueError, match="exceed the number of samples"):
        BonTracker("local", root=tmp_path, ns=[64]).log_scores(0, true, true)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="unknown backend 'no-such-service'"):
        BonTracker("no-such-service")


def test_input_is_bounded_and_errors_name_what_is_wrong(tmp_path, rng, caplog):
    torch = pytest.importorskip("torch")
    proxy, true = _scores(rng, 4, 8)
    tracker = BonTracker("local", root=tmp_path, charts=False)
    for step in (-1, 2**63):
        with pytest.raises(ValueError, match=r"step must be an integer from 0 to 2\*\*63 - 1"):
            tracker.log_scores(step, proxy, true)
    tracker.log_scores(2**63 - 1 - 10, proxy, true)  # the largest steps are fine
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        assert tracker.log_scores(5, proxy, true) is None
    assert f"step 5 is not after the last logged step {2**63 - 11}" in caplog.text
    with pytest.raises(TypeError, match="policy_kl must be a real number"):
        tracker.log_scores(2**63 - 2, proxy, true, policy_kl="high")
    with pytest.raises(ValueError, match="policy_kl must be finite"):
        tracker.log_scores(2**63 - 2, proxy, true, policy_kl=float("inf"))
    with pytest.raises(TypeError, match="real"):
        tracker.log_scores(2**63 - 2, proxy + 1j, true)
    with pytest.raises(TypeError, match="complex"):
        tracker.log_scores(2**63 - 2, torch.tensor(proxy + 1j), torch.tensor(true))
    with pytest.raises(ValueError, match="overflows"):
        tracker.log_scores(2**63 - 2, proxy, np.full_like(true, 1.5e308) * np.sign(rng.normal(size=true.shape)))
    tracker.finish()
    assert BonTracker("local", root=tmp_path, ns=[8, 1, 2, 2, 4]).ns == [1, 2, 4, 8]  # sorted, de-duplicated
    with pytest.raises(ValueError, match="at most 4096 points"):
        BonTracker("local", root=tmp_path, ns=list(range(1, 5000)))


def test_nan_policy_omit_drops_samples(tmp_path, rng):
    proxy, true = _scores(rng)
    proxy[3, 4] = np.nan
    with BonTracker("local", root=tmp_path, nan_policy="omit") as tracker:
        curve = tracker.log_scores(0, proxy, true)
    assert curve.to_dict() == bon_curve(proxy, true, nan_policy="omit").to_dict()
    assert curve.n_prompts[-1] == 15  # the prompt with 15 samples has no n = 16


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_omitted_samples_reach_the_statistics_as_omitted(tmp_path, rng, bad):
    """One process with float64 matrices: finiteness is found by the curve's own pass; a
    non-finite sample then sends the eval through full validation, so every statistic (not
    only the curve) is that of the rows with the sample dropped."""
    proxy, true = _scores(rng, 24, 16)
    proxy[3, 4] = bad
    true[5, 0] = bad
    ragged_p = [np.delete(row, [4] if i == 3 else [0] if i == 5 else []) for i, row in enumerate(proxy)]
    ragged_t = [np.delete(row, [4] if i == 3 else [0] if i == 5 else []) for i, row in enumerate(true)]
    records = []
    for k, (p, t) in enumerate([(proxy, true), (ragged_p, ragged_t)]):
        with BonTracker("local", root=tmp_path / str(k), nan_policy="omit", charts=False) as tracker:
            tracker.log_scores(0, p, t)
            records.append(tracker.history[0].to_json())
    for record in records:
        record.pop("timestamp")
    assert records[0] == records[1]
    assert records[0]["interval"] is not None


class FlakyService(Backend):
    """A spec'd fake service that is down for a while: raises, then accepts."""

    name = "flaky"

    def __init__(self, down_for_calls: int):
        self.down_for_calls = down_for_calls
        self.calls = 0
        self.received: list[int] = []

    def log_eval(self, record: EvalRecord) -> None:
        self.calls += 1
        if self.calls <= self.down_for_calls:
            raise ConnectionError("service unavailable")
        self.received.append(record.step)


def test_outage_is_retried_in_the_background_and_each_record_arrives_once_in_order(tmp_path, rng, caplog):
    service = FlakyService(down_for_calls=3)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05)
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        for step in range(1, 6):
            start = time.perf_counter()
            tracker.log_scores(step, *_scores(rng))  # never raises into training, never waits
            assert time.perf_counter() - start < 5
        wal = tracker.wal_path
        assert [e.record.step for e in WriteAheadLog(wal).entries()] == [1, 2, 3, 4, 5]  # durable first
        tracker.finish()
    assert service.received == [1, 2, 3, 4, 5]
    assert not wal.exists()
    failures = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(failures) == 1  # reported once per outage, not once per retry


def test_still_down_at_finish_keeps_the_log_for_sync(tmp_path, rng, caplog):
    service = FlakyService(down_for_calls=10**6)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05)
    for step in (10, 20):
        tracker.log_scores(step, *_scores(rng))
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="bon_tracker"):
        tracker.finish(timeout=0.3)
    assert time.perf_counter() - start < 5  # finish(timeout) waits at most about that long
    wal = WriteAheadLog(tracker.wal_path)
    pending = wal.pending()
    assert [e.record.step for e in pending if e.record is not None] == [10, 20]
    assert pending[-1].finish  # sync ends the run once it delivered them
    assert wal.spec() == {"backend": "flaky"}
    assert any(f"bon-tracker sync {wal.path}" in r.getMessage() for r in caplog.records)


def test_resume_continues_the_run_and_never_logs_a_step_twice(tmp_path, rng):
    with BonTracker("local", root=tmp_path, run_name="resumable") as first:
        first.log_scores(10, *_scores(rng))
        first.log_scores(20, *_scores(rng))
        first.save_state(tmp_path / "checkpoint")
    with BonTracker("local", resume=tmp_path / "checkpoint") as second:
        assert second.log_scores(20, *_scores(rng)) is None  # replayed by the trainer: skipped
        assert second.log_scores(30, *_scores(rng)) is not None
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "checkpoint"] == ["resumable"]
    assert [r.step for r in read_records(tmp_path / "resumable")] == [10, 20, 30]
    assert len((tmp_path / "resumable" / "bon_curves.csv").read_text().splitlines()) == 1 + 3 * 5


def test_local_backend_rebuilds_tables_after_a_torn_write(tmp_path, rng):
    backend = LocalBackend(root=tmp_path, run_id="run")
    tracker = BonTracker(backend)
    tracker.log_scores(1, *_scores(rng))
    tracker.log_scores(2, *_scores(rng))
    tracker.finish()
    table = tmp_path / "run" / "bon_curves.jsonl"
    table.write_bytes(table.read_bytes()[:-25])  # a crash mid-append
    reopened = BonTracker(LocalBackend(root=tmp_path, run_id="run"))
    reopened.log_scores(3, *_scores(rng))
    reopened.finish()
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 5 + [2] * 5 + [3] * 5


def test_log_eval_is_idempotent_per_step(tmp_path, rng):
    backend = LocalBackend(root=tmp_path, run_id="run", charts=False)
    record = EvalRecord.build(5, bon_curve(*_scores(rng)))
    backend.log_eval(record)
    backend.log_eval(record)
    assert len((tmp_path / "run" / "scalars.jsonl").read_text().splitlines()) == 1


def test_a_full_disk_for_the_log_keeps_records_in_memory(tmp_path, rng, monkeypatch):
    service = FlakyService(down_for_calls=2)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(WriteAheadLog, "append", disk_full)
    for step in (1, 2, 3):
        tracker.log_scores(step, *_scores(rng))  # never raises: held in memory
    assert tracker.last_step == 3 and not tracker.wal_path.exists()
    tracker.finish(timeout=10)
    assert service.received == [1, 2, 3]
    assert tracker.delivery_stats.dropped == 0


def test_memory_queue_is_bounded_and_drops_are_counted(tmp_path, rng, monkeypatch, caplog):
    service = FlakyService(down_for_calls=10**6)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05, max_memory_records=2)
    monkeypatch.setattr(WriteAheadLog, "append", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    with caplog.at_level(logging.ERROR, logger="bon_tracker"):
        for step in range(1, 6):
            tracker.log_scores(step, *_scores(rng, 4, 4))
        tracker.finish(timeout=0.2)
    stats = tracker.delivery_stats
    # The oldest waiting records go first; the one being delivered (if any) is not dropped.
    assert stats.dropped in (2, 3) and stats.dropped_steps == sorted(stats.dropped_steps)
    assert stats.dropped_steps[-1] < 5 and stats.delivered == 0
    assert any("lost" in r.getMessage() for r in caplog.records)


def test_a_record_in_flight_is_never_dropped_nor_counted_twice(tmp_path, rng, monkeypatch):
    import threading

    release = threading.Event()

    class SlowService(FlakyService):
        def log_eval(self, record):
            release.wait(10)  # step 1 stays in flight while the others arrive
            super().log_eval(record)

    service = SlowService(down_for_calls=0)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05, max_memory_records=2)
    monkeypatch.setattr(WriteAheadLog, "append", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "full")))
    tracker.log_scores(1, *_scores(rng, 4, 4))
    deadline = time.monotonic() + 10
    while not tracker._delivery._busy and time.monotonic() < deadline:
        time.sleep(0.01)
    for step in range(2, 6):
        tracker.log_scores(step, *_scores(rng, 4, 4))
    assert tracker.wait(10)  # every record completed and handed to delivery while step 1 is in flight
    release.set()
    tracker.finish(timeout=10)
    stats = tracker.delivery_stats
    assert stats.dropped_steps == [2, 3]  # the oldest waiting ones; step 1 was being delivered
    assert service.received == [1, 4, 5] and stats.delivered == 3  # each record counted once


def test_a_configuration_error_at_first_contact_stops_delivery_loudly_and_keeps_the_log(tmp_path, rng, caplog):
    from bon_tracker.optional import MissingDependencyError

    class NotInstalled(Backend):
        name = "not-installed"

        def log_eval(self, record):
            raise MissingDependencyError("pip install 'bon-tracker[x]'")

    tracker = BonTracker(NotInstalled(), spool_dir=tmp_path)
    with caplog.at_level(logging.ERROR, logger="bon_tracker"):
        tracker.log_scores(5, *_scores(rng))  # the training thread is not raised into
        assert tracker.flush(timeout=5) is False
    assert "pip install 'bon-tracker[x]'" in tracker.delivery_stats.config_error
    assert any("not set up correctly" in r.getMessage() for r in caplog.records)
    tracker.finish(timeout=1)
    assert [e.record.step for e in WriteAheadLog(tracker.wal_path).pending() if e.record] == [5]


def test_delivery_is_seen_stopped_only_once_its_configuration_error_is_logged(tmp_path, rng):
    """flush() returns on a configuration error only after the error's message is out: a slow log
    handler (here 0.5 s per record) never lets a caller see the stop without the reason."""
    from bon_tracker.optional import MissingDependencyError

    class NotInstalled(Backend):
        name = "not-installed"

        def log_eval(self, record):
            raise MissingDependencyError("pip install 'bon-tracker[x]'")

    class SlowHandler(logging.Handler):
        def __init__(self):
            super().__init__(logging.ERROR)
            self.messages: list[str] = []

        def emit(self, record):
            time.sleep(0.5)
            self.messages.append(record.getMessage())

    handler = SlowHandler()
    log = logging.getLogger("bon_tracker")
    log.addHandler(handler)
    try:
        tracker = BonTracker(NotInstalled(), spool_dir=tmp_path)
        tracker.log_scores(5, *_scores(rng))
        assert tracker.flush(timeout=10) is False
        assert tracker.delivery_stats.config_error is not None
        assert any("not set up correctly" in m for m in handler.messages)
        tracker.finish(timeout=1)
    finally:
        log.removeHandler(handler)


def test_a_configuration_error_found_without_the_network_raises_at_construction(tmp_path):
    from bon_tracker.backends import ConfigurationError

    class Misconfigured(Backend):
        name = "misconfigured"

        def check(self):
            raise ConfigurationError("token is empty")

        def log_eval(self, record):
            raise AssertionError("never reached")

    with pytest.raises(ConfigurationError, match="token is empty"):
        BonTracker(Misconfigured(), spool_dir=tmp_path)


def test_resume_replays_what_the_crashed_process_left(tmp_path, rng):
    service = FlakyService(down_for_calls=10**6)
    first = BonTracker(service, spool_dir=tmp_path / "spool", backoff_max=0.05)
    first.log_scores(1, *_scores(rng))
    state = first.state()  # saved with a checkpoint; then the process dies without finish()
    first._delivery.close(0)  # (dying stops its worker and releases the log's lock)
    first._wal.release()
    healthy = FlakyService(down_for_calls=0)
    second = BonTracker(healthy, resume=state)
    second.log_scores(2, *_scores(rng))
    second.finish()
    assert healthy.received == [1, 2]


def test_numpy_and_tensor_context_values_are_logged_as_plain_numbers(tmp_path, rng):
    torch = pytest.importorskip("torch")
    with BonTracker("local", root=tmp_path, run_name="ctx") as tracker:
        tracker.log_scores(1, *_scores(rng), epoch=np.int64(2), lr=np.float32(0.5), loss=torch.tensor(1.5))
    (row,) = [json.loads(line) for line in (tmp_path / "ctx" / "scalars.jsonl").read_text().splitlines()]
    assert (row["bon/context/epoch"], row["bon/context/lr"], row["bon/context/loss"]) == (2.0, 0.5, 1.5)


def test_bfloat16_tensors_are_accepted(tmp_path, rng):
    torch = pytest.importorskip("torch")
    proxy, true = _scores(rng)
    with BonTracker("local", root=tmp_path, charts=False) as tracker:
        curve = tracker.log_scores(1, torch.tensor(proxy, dtype=torch.bfloat16), torch.tensor(true))
    rounded = torch.tensor(proxy, dtype=torch.bfloat16).double().numpy()
    assert curve.to_dict() == bon_curve(rounded, true).to_dict()


def test_local_tables_stay_exact_after_a_failed_append(tmp_path, rng, monkeypatch):
    import bon_tracker.backends.local as local

    backend = LocalBackend(root=tmp_path, run_id="run", charts=False)
    tracker = BonTracker(backend, spool_dir=tmp_path / "spool", backoff_max=0.05)
    tracker.log_scores(1, *_scores(rng))
    assert tracker.flush(10)
    real_append, calls = local._append_lines, {"n": 0}

    def csv_disk_full(path, lines):
        if path.name.endswith(".csv") and calls["n"] == 0:
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        real_append(path, lines)

    monkeypatch.setattr(local, "_append_lines", csv_disk_full)
    tracker.log_scores(2, *_scores(rng))  # jsonl appended, csv failed: retried
    tracker.log_scores(3, *_scores(rng))
    tracker.finish(timeout=10)
    rows = [json.loads(line) for line in (tmp_path / "run" / "bon_curves.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 5 + [2] * 5 + [3] * 5
    assert len((tmp_path / "run" / "bon_curves.csv").read_text().splitlines()) == 1 + 15
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "scalars.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_sync_leaves_the_log_of_a_running_tracker_alone(tmp_path, rng):
    service = FlakyService(down_for_calls=10**6)
    tracker = BonTracker(service, spool_dir=tmp_path, backoff_max=0.05)
    tracker.log_scores(1, *_scores(rng))  # the log is claimed by this tracker
    other = WriteAheadLog(tracker.wal_path)
    assert not other.claim()
    assert str(__import__("os").getpid()) in other.holder()
    tracker.finish(timeout=0.2)  # still down: the log stays, unclaimed
    assert other.claim()
    other.release()
