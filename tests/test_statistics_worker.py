"""The training thread pays only for the curve (issue 18): the Goodhart fit, the interval, the
predictions, the agreement and the alert rules run on the statistics worker, in step order,
change no logged number, survive the caller changing its arrays, and a process killed before
or after them replays exactly what its log holds."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import bon_tracker.tracking.tracker as tracker_module
from bon_tracker import BonTracker, EvalRecord, bon_curve
from bon_tracker.backends.local import read_records
from bon_tracker.cli.main import main as cli_main
from bon_tracker.tracking.alerting import eval_statistics
from bon_tracker.tracking.wal import Entry, WriteAheadLog


def _scores(seed: int, prompts: int = 24, samples: int = 16, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(prompts, samples))
    return true + rng.standard_t(2, size=true.shape) + shift, true


def _expected(proxy, true) -> tuple:
    """What the record of these scores must hold, computed directly."""
    curve = bon_curve(proxy, true)
    return curve, eval_statistics(proxy, true, curve), EvalRecord.fit_goodhart(curve)


class _Gate:
    """Wraps eval_statistics: records the thread it runs on, and can hold it until released."""

    def __init__(self, monkeypatch, hold: bool = False):
        self.threads: list[str] = []
        self.open = threading.Event()
        if not hold:
            self.open.set()
        real = tracker_module.eval_statistics

        def wrapped(proxy, true, curve, per_prompt=None, **options):
            self.threads.append(threading.current_thread().name)
            assert self.open.wait(30)
            return real(proxy, true, curve, per_prompt, **options)

        monkeypatch.setattr(tracker_module, "eval_statistics", wrapped)


def test_the_statistics_run_off_the_training_thread_and_the_records_equal_a_direct_computation(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch)
    evals = [_scores(seed, shift=0.2 * seed) for seed in range(3)]
    with BonTracker("local", root=tmp_path / "runs", run_name="off", charts=False, spool_dir=tmp_path) as tracker:
        for step, (proxy, true) in enumerate(evals):
            tracker.log_scores(step, proxy, true, policy_kl=0.5 * step)
    assert gate.threads == ["bon_tracker-statistics"] * 3
    records = read_records(tmp_path / "runs" / "off")
    assert [r.step for r in records] == [0, 1, 2]
    for record, (proxy, true) in zip(records, evals):
        curve, stats, goodhart = _expected(proxy, true)
        assert record.curve.to_dict() == curve.to_dict()
        assert record.interval == stats.interval and record.interval is not None
        assert record.agreement == stats.agreement and record.predictions == stats.predictions
        assert record.goodhart == goodhart
        assert set(record.alert_states) == {"policy_true_falls", "bon_true_falls", "goodhart_kl", "headroom_shrinks"}


def test_the_sorted_scores_lent_to_the_worker_survive_the_callers_next_curves_and_changes(tmp_path, monkeypatch):
    """Without a tie in the proxy the worker reads the curve's own sorted copy (no copy of the input):
    the caller filling its arrays and ranking more scores of the same shape on the same thread while
    the worker waits changes nothing; with ties (no loan) the record is the same as computed directly."""
    from bon_tracker.core.curve import finite_curve_parts

    gate = _Gate(monkeypatch, hold=True)
    proxy, true = _scores(4, prompts=300, samples=32)
    tied_proxy = np.round(proxy)  # ties in every prompt: the worker gets a copy instead
    assert finite_curve_parts(proxy, true, lend_sorted=True).sorted is not None
    assert finite_curve_parts(tied_proxy, true, lend_sorted=True).sorted is None
    originals = [(proxy.copy(), true.copy()), (tied_proxy.copy(), true.copy())]
    tracker = BonTracker("local", root=tmp_path / "runs", run_name="lent", charts=False, spool_dir=tmp_path)
    tracker.log_scores(0, proxy, true)
    rng = np.random.default_rng(9)
    for _ in range(3):  # the same ranker, the same shape: it must not write the lent buffer
        bon_curve(rng.normal(size=proxy.shape), rng.normal(size=proxy.shape))
    proxy.fill(1.0)
    true.fill(-1.0)
    gate.open.set()
    assert tracker.wait(30)
    tracker.log_scores(1, tied_proxy, originals[1][1])
    tracker.finish(30)
    records = read_records(tmp_path / "runs" / "lent")
    assert [r.step for r in records] == [0, 1]
    for record, (p, t) in zip(records, originals):
        curve, stats, _ = _expected(p, t)
        assert record.curve.to_dict() == curve.to_dict()
        assert record.agreement == stats.agreement and record.agreement is not None
        assert record.interval == stats.interval and record.predictions == stats.predictions


def test_scores_the_caller_changes_after_log_scores_do_not_change_the_record(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    gate = _Gate(monkeypatch, hold=True)  # the worker computes only after the caller changed everything
    dense = _scores(1)
    tensors = tuple(torch.tensor(a) for a in _scores(2))
    ragged = tuple([row[: 8 + i % 8].copy() for i, row in enumerate(a)] for a in _scores(3))
    originals = [
        (dense[0].copy(), dense[1].copy()),
        tuple(t.clone().numpy() for t in tensors),
        tuple([row.copy() for row in a] for a in ragged),
    ]
    tracker = BonTracker("local", root=tmp_path / "runs", run_name="mut", charts=False, spool_dir=tmp_path)
    tracker.log_scores(0, *dense)
    for a in dense:
        a.fill(0.0)  # a reused buffer
    gate.open.set()
    assert tracker.wait(30)
    gate.open.clear()
    tracker.log_scores(1, *tensors)
    for t in tensors:
        t.zero_()
    gate.open.set()
    assert tracker.wait(30)
    gate.open.clear()
    tracker.log_scores(2, *ragged)
    for rows in ragged:
        for row in rows:
            row.fill(5.0)
    gate.open.set()
    tracker.finish(30)
    for record, (proxy, true) in zip(read_records(tmp_path / "runs" / "mut"), originals):
        curve, stats, _ = _expected(proxy, true)
        assert record.curve.to_dict() == curve.to_dict()
        assert record.interval == stats.interval and record.interval is not None


def test_alerts_are_reported_on_the_logging_thread_and_complete_after_wait(tmp_path, monkeypatch):
    seen: list[tuple[int, str, str]] = []
    tracker = BonTracker(
        "local",
        root=tmp_path / "runs",
        run_name="alerts",
        charts=False,
        spool_dir=tmp_path,
        on_alert=lambda a: seen.append((a.step, a.rule, threading.current_thread().name)),
    )
    levels = (0.0, 1.0, -1.0)  # the true reward rises, then falls while the proxy keeps rising
    for step, level in enumerate(levels):
        rng = np.random.default_rng(step)
        noise = rng.normal(size=(64, 8))
        tracker.log_scores(step, step + noise, level + 0.3 * noise + 0.05 * rng.normal(size=noise.shape))
    assert tracker.wait(30)
    assert [(s, r) for s, r, _ in seen] == [(2, "policy_true_falls"), (2, "bon_true_falls")]
    assert {name for _, _, name in seen} == {threading.current_thread().name}
    assert [a.step for a in tracker.alerts] == [2, 2]

    # poll_alerts never waits: it answers while the worker is held on the next eval
    gate = _Gate(monkeypatch, hold=True)
    tracker.log_scores(3, *_scores(9, 64, 8))
    deadline = time.monotonic() + 30
    while not gate.threads and time.monotonic() < deadline:  # the worker is inside step 3's statistics
        time.sleep(0.01)
    answered = []
    poller = threading.Thread(target=lambda: answered.append(tracker.poll_alerts()))
    poller.start()
    poller.join(10)
    assert answered and [a.step for a in answered[0]] == [2, 2]
    assert tracker.pending >= 1  # step 3 is still being completed
    gate.open.set()
    tracker.finish(30)
    assert tracker.pending == 0 and [r.step for r in read_records(tmp_path / "runs" / "alerts")] == [0, 1, 2, 3]


def test_a_later_line_with_the_same_seq_supersedes_the_curve_line_in_place(tmp_path):
    wal = WriteAheadLog(tmp_path / "local-abc.jsonl")
    curve_only = [EvalRecord.build(step, bon_curve(*_scores(step)), fit=False) for step in range(3)]
    for seq, record in enumerate(curve_only):
        wal.append(Entry(seq=seq, record=record), sync=False)
    completed = EvalRecord.build(0, curve_only[0].curve)
    wal.append(Entry(seq=0, record=completed))
    entries = wal.entries()
    assert [e.seq for e in entries] == [0, 1, 2]
    assert entries[0].record.goodhart == completed.goodhart and entries[0].record.goodhart is not None
    assert entries[1].record.goodhart is None
    assert wal.next_seq() >= 3


def _killed_while_computing(root: str, spool: str, out: str) -> None:
    """Step 0 is completed; step 1's statistics never finish; then the process is SIGKILLed."""
    hold = threading.Event()
    real = tracker_module.eval_statistics

    def slow(proxy, true, curve, per_prompt=None, **options):
        if Path(out + ".held").exists():
            hold.wait()  # never set: killed while computing
        return real(proxy, true, curve, per_prompt, **options)

    tracker_module.eval_statistics = slow
    tracker = BonTracker("local", root=root, run_name="killed", charts=False, spool_dir=spool)
    tracker.log_scores(0, *_scores(0))
    assert tracker.wait(60)
    Path(out + ".held").write_text("")
    tracker.log_scores(1, *_scores(1))
    deadline = time.monotonic() + 60
    while tracker._statistics_worker.pending == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    Path(out).write_text(json.dumps({"wal": str(tracker.wal_path)}))
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_kill_during_the_statistics_replays_the_completed_record_and_the_bare_curve(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "out.json"
    root, spool = tmp_path / "runs", tmp_path / "spool"
    proc = ctx.Process(target=_killed_while_computing, args=(str(root), str(spool), str(out)))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    wal = WriteAheadLog(json.loads(out.read_text())["wal"])
    lines = wal.path.read_bytes().splitlines()
    assert len(lines) == 3  # step 0's curve, step 0 completed (same seq), step 1's curve
    assert cli_main(["sync", str(wal.path)]) == 0
    records = read_records(root / "killed")
    assert [r.step for r in records] == [0, 1]  # each once
    _, stats, goodhart = _expected(*_scores(0))
    assert records[0].interval == stats.interval and records[0].goodhart == goodhart
    assert records[1].curve.to_dict() == bon_curve(*_scores(1)).to_dict()
    assert records[1].interval is None and records[1].goodhart is None  # the curve, as logged


def test_past_the_agreements_prompt_budget_the_record_is_unchanged_by_the_caller_too(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch, hold=True)
    proxy, true = _scores(7, prompts=2100, samples=4)  # the agreement averages 2,048 of them
    original = proxy.copy(), true.copy()
    tracker = BonTracker("local", root=tmp_path / "runs", run_name="big", charts=False, spool_dir=tmp_path)
    tracker.log_scores(0, proxy, true)
    proxy.fill(0.0)
    true.fill(1.0)
    gate.open.set()
    tracker.finish(60)
    (record,) = read_records(tmp_path / "runs" / "big")
    curve, stats, goodhart = _expected(*original)
    assert record.curve.to_dict() == curve.to_dict() and record.goodhart == goodhart
    assert record.agreement == stats.agreement and record.agreement.n_prompts == (2048,)
    assert record.interval == stats.interval and record.predictions == stats.predictions


def test_the_worker_reads_copies_in_reused_buffers_that_the_caller_cannot_change(tmp_path, monkeypatch):
    """The worker's copies of the scores go into buffers kept from earlier evals (given back only
    once the worker is done with them); the caller refilling its own arrays right after each
    log_scores changes no record, and every eval of one size shares one bootstrap draw."""
    gate = _Gate(monkeypatch, hold=True)  # each eval's statistics run only after the caller refilled its arrays
    evals = [_scores(seed, prompts=1100, shift=0.1 * seed) for seed in range(4)]  # 138 KiB a matrix: kept
    for p, _ in evals:
        p[0, 1] = p[0, 0]  # a tie in the proxy: the curve's sorted copy is not lent, the scores are copied
    proxy, true = (np.empty_like(a) for a in evals[0])  # the caller's buffers, refilled every eval
    tracker = BonTracker("local", root=tmp_path / "runs", run_name="reuse", charts=False, spool_dir=tmp_path)
    used = []
    real_copy = tracker._copies.copy
    monkeypatch.setattr(tracker._copies, "copy", lambda scores: used.append(real_copy(scores)) or used[-1])
    for step, (p, t) in enumerate(evals):
        np.copyto(proxy, p)
        np.copyto(true, t)
        tracker.log_scores(step, proxy, true)
        proxy.fill(9.0)
        true.fill(-9.0)
        gate.open.set()
        assert tracker.wait(30)
        gate.open.clear()
    gate.open.set()
    tracker.finish(30)
    assert len(used) == 8 and len({id(buffer) for buffer in used}) == 2  # eval 0's pair, reused three times
    for record, (p, t) in zip(read_records(tmp_path / "runs" / "reuse"), evals):
        curve, stats, _ = _expected(p, t)
        assert record.curve.to_dict() == curve.to_dict()
        assert record.interval == stats.interval and record.interval is not None
        assert record.agreement == stats.agreement and record.predictions == stats.predictions
    assert set(tracker._draws._entries) == {"indices", "counts"}  # kept: 1,100 prompts x 1,000 resamples


def test_score_copies_reuse_only_what_was_given_back_and_keep_a_bounded_number():
    copies = tracker_module.ScoreCopies()
    small = np.arange(12.0).reshape(3, 4)
    assert copies.copy(small) is not copies.copy(small)  # below MIN_BYTES: plain copies, nothing kept
    copies.give_back([small])
    assert not copies._free
    a = np.arange(copies.MIN_BYTES // 8 * 2.0).reshape(64, -1)
    first = copies.copy(a)
    second = copies.copy(a)
    assert first is not second and not np.shares_memory(first, a)  # nothing given back yet: fresh copies
    copies.give_back([first])
    third = copies.copy(a + 1.0)
    assert third is first and np.array_equal(third, a + 1.0)
    assert copies.copy(a.astype(np.float32)).dtype == np.float32  # another dtype or shape: a fresh one
    copies.give_back([np.empty(copies.MIN_BYTES // 8) for _ in range(copies.KEEP + 3)])
    copies.give_back([np.empty(copies.KEEP_BYTES // 8 + 1)])
    assert len(copies._free) == copies.KEEP and all(b.nbytes <= copies.KEEP_BYTES for b in copies._free)


def test_the_worker_runs_jobs_in_order_survives_a_failing_one_and_restarts_after_close():
    """The worker wakes outside its lock (one token per submit): every job runs once, in order,
    from several submitting threads; wait() and pending see them; a failing job is logged and the
    next still runs; a job's own wait() returns; after close() a submit starts a new thread;
    take_pending() returns the jobs not started."""
    from bon_tracker.tracking.statistics import StatisticsWorker

    worker = StatisticsWorker()
    done: list[int] = []
    lock = threading.Lock()

    def job(i: int):
        def run() -> None:
            with lock:
                done.append(i)
            if i == 5:
                raise RuntimeError("a failing job")
            if i == 7:
                assert worker.wait(1.0) in (True, False)  # never waits for itself

        return run

    def submit_range(start: int) -> None:
        for i in range(start, start + 50):
            with lock:  # submission order = the order of `submitted`
                submitted.append(i)
                worker.submit(job(i))

    submitted: list[int] = []
    threads = [threading.Thread(target=submit_range, args=(k * 50,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worker.wait(30) and worker.pending == 0
    assert done == submitted and sorted(done) == list(range(150))
    worker.close()
    deadline = time.monotonic() + 10
    while worker._thread is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker._thread is None  # closed and idle: the thread ended
    worker.submit(job(1000))
    assert worker.wait(10) and done[-1] == 1000
    gate = threading.Event()
    worker.submit(lambda: gate.wait(10))
    worker.submit(job(2000))
    time.sleep(0.05)
    left = worker.take_pending()
    gate.set()
    assert len(left) == 1 and worker.wait(10) and 2000 not in done
    worker.close()
