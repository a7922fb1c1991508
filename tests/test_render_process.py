"""The chart process never outlives the process that started it.

Each test runs a real training-like parent (``python -c``) that draws one chart, so its
chart child exists, and then dies or closes the child's stdin; the child must be gone
within seconds. A process the parent forked (a data-loader worker) still holding a copy
of the child's stdin pipe must not keep the child alive either.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a parent process")

ROOT = Path(__file__).resolve().parents[1]

PARENT = r"""
import os, sys, threading, time
import numpy as np
from bon_tracker import bon_curve
from bon_tracker.record import EvalRecord
from bon_tracker.reports import render

mode = sys.argv[1]
rng = np.random.default_rng(0)
true = rng.normal(size=(8, 8))
record = EvalRecord.build(0, bon_curve(true + rng.normal(size=true.shape), true))

def draw():
    assert render.render_png("curve", [record])[:8] == b"\x89PNG\r\n\x1a\n"

if "thread" in mode:  # the child is started by a thread that then ends (the delivery worker)
    thread = threading.Thread(target=draw)
    thread.start()
    thread.join()
    first = render._PROCESS._process.pid
    time.sleep(1.5)
    draw()
    assert render._PROCESS._process.pid == first and not render._FELL_BACK, "the child died with its thread"
else:
    draw()
worker = 0
if "fork" in mode:  # a forked worker inherits the parent's copy of the child's stdin pipe
    worker = os.fork()
    if worker == 0:
        time.sleep(120)
        os._exit(0)
print(render._PROCESS._process.pid, worker, flush=True)
if "close" in mode:
    start = time.monotonic()
    render._PROCESS.close()
    print(render._PROCESS._process.returncode, round(time.monotonic() - start, 2), flush=True)
    sys.exit(0)
time.sleep(120)
"""


def _start_parent(mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    env.pop("BON_TRACKER_CHART_PROCESS", None)
    return subprocess.Popen([sys.executable, "-c", PARENT, mode], stdout=subprocess.PIPE, env=env)


def _read_line(proc: subprocess.Popen, timeout: float = 90.0) -> list[str]:
    """One line of the parent's stdout, as words; fails (never hangs) after ``timeout`` s."""
    assert proc.stdout is not None
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 1) if ready else b""
        if not chunk:
            raise AssertionError(f"no line from the parent (exit status {proc.poll()}) after {data!r}")
        data += chunk
    return data.decode().split()


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited: no such process, or a zombie (init may reap it late)."""
    status = Path(f"/proc/{pid}/status")
    if Path("/proc/self").exists():
        try:
            state = next(line for line in status.read_text().splitlines() if line.startswith("State:"))
        except (FileNotFoundError, ProcessLookupError):
            return True
        return state.split()[1] in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _wait_gone(pid: int, timeout: float) -> float | None:
    """Seconds until ``pid`` exited, None if it is still alive after ``timeout`` s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _gone(pid):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _kill(*pids: int) -> None:
    for pid in pids:
        if pid > 0 and not _gone(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _kill_parent_and_time_child(mode: str) -> float | None:
    parent = _start_parent(mode)
    child = worker = 0
    try:
        child, worker = (int(word) for word in _read_line(parent))
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)  # no atexit, no close(): the way an OOM kill ends training
        parent.wait(30)
        return _wait_gone(child, 10.0)
    finally:
        _kill(parent.pid, worker, child)
        parent.wait(30)


def test_chart_process_exits_when_the_training_process_is_killed():
    took = _kill_parent_and_time_child("kill")
    assert took is not None and took < 5.0


def test_chart_process_exits_when_the_training_process_is_killed_while_a_forked_worker_lives():
    took = _kill_parent_and_time_child("fork")
    assert took is not None and took < 5.0  # the worker's copy of the stdin pipe kept it alive


def test_chart_process_exits_at_eof_on_its_stdin():
    parent = _start_parent("close")
    child = 0
    try:
        child, _ = (int(word) for word in _read_line(parent))
        returncode, took = _read_line(parent)
        assert returncode == "0" and float(took) < 5.0  # it left by itself at EOF, not killed
        assert _wait_gone(child, 5.0) is not None
        assert parent.wait(30) == 0
    finally:
        _kill(parent.pid, child)
        parent.wait(30)


def test_chart_process_exits_at_eof_even_while_a_forked_worker_lives():
    parent = _start_parent("fork-close")
    child = worker = 0
    try:
        child, worker = (int(word) for word in _read_line(parent))
        returncode, took = _read_line(parent)
        assert returncode == "0" and float(took) < 5.0  # was: still running after 5 s, then killed
        assert parent.wait(30) == 0
    finally:
        _kill(parent.pid, worker, child)
        parent.wait(30)


def test_chart_process_outlives_the_thread_that_started_it():
    """Linux's parent-death signal fires when the starting *thread* ends: not a reason to exit."""
    parent = _start_parent("thread")
    child = 0
    try:
        child, _ = (int(word) for word in _read_line(parent))
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _wait_gone(child, 10.0) is not None  # and it still goes with the process
    finally:
        _kill(parent.pid, child)
        parent.wait(30)


def test_chart_process_exits_when_its_parent_died_before_it_started(tmp_path):
    """The race the parent-death signal leaves open: the parent already gone at the child's start."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MPLBACKEND="Agg")
    # A parent pid that is not ours: the child sees a different parent and leaves at once.
    child = subprocess.Popen(
        [sys.executable, "-m", "bon_tracker.reports.render", "--parent", str(os.getpid() + 1)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        env=env,
    )
    try:
        assert child.wait(20) == 0  # was: waiting on its stdin for ever
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(30)
