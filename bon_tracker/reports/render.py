"""Charts rendered to PNG in a helper process, so drawing never competes with training.

Drawing a chart with matplotlib is a few hundred milliseconds of pure Python: on the
delivery thread it would hold the GIL against the training thread (and every
``log_scores`` call would wait for it). So backends ask :func:`render_png` for bytes, and
one long-lived child process (``python -m bon_tracker.reports.render``, started on first
use, shared by every backend of the process) draws them. The protocol is one JSON line in
(chart name, records, options) and one framed reply out (status byte, length, payload);
the child never outlives the training process: it exits when its stdin closes, and (since
a process forked from training, e.g. a data-loader worker, may still hold that pipe open)
when its parent dies (Linux: a parent-death signal; elsewhere: a check of its parent every
second). A process forked from training lets go of the pipe and starts its own child.

Set ``BON_TRACKER_CHART_PROCESS=0`` to draw in this process instead (the fallback too
when the child cannot start or dies: charts are then drawn here, and that is logged once).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

from bon_tracker.optional import require_installed
from bon_tracker.record import EvalRecord

logger = logging.getLogger("bon_tracker")

CHARTS = ("curve", "compact", "overlay", "trend", "rl", "frontier")
_FRAME = struct.Struct("<cQ")  # status (b"P" png, b"E" error), payload length


class ChartError(RuntimeError):
    """The chart itself failed to draw (bad data, a bug): drawing elsewhere would not help."""


def draw_png(chart: str, records: Sequence[EvalRecord], options: dict[str, Any] | None = None) -> bytes:
    """Draw one chart here (in this process) and return its PNG bytes."""
    import io

    from bon_tracker.reports import charts, selection_charts

    builders = {
        "curve": lambda: charts.curve_chart(records[-1], **(options or {})),
        "compact": lambda: charts.compact_chart(records[-1], **(options or {})),
        "overlay": lambda: charts.overlay_chart(records, **(options or {})),
        "trend": lambda: charts.trend_chart(records, **(options or {})),
        "rl": lambda: charts.rl_chart(records, **(options or {})),
        "frontier": lambda: selection_charts.frontier_chart(records[-1], **(options or {})),
    }
    if chart not in builders:
        raise ChartError(f"unknown chart {chart!r}: one of {', '.join(CHARTS)}")
    figure = builders[chart]()
    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png")  # a Figure built without pyplot: nothing global
    finally:
        figure.clear()
    return buffer.getvalue()


class ChartProcess:
    """The child process that draws, and the lock that keeps one request in flight."""

    def __init__(self) -> None:
        env = dict(os.environ, MPLBACKEND="Agg", BON_TRACKER_CHART_PROCESS="0")
        self._owner = os.getpid()
        self._process = subprocess.Popen(
            # The child exits as soon as this process is gone, even before reading its pid.
            [sys.executable, "-m", "bon_tracker.reports.render", "--parent", str(self._owner)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for training does not kill it mid-chart
        )
        self._lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self._process.poll() is None

    def render(self, chart: str, records: Sequence[EvalRecord], options: dict[str, Any]) -> bytes:
        request = {"chart": chart, "records": [r.to_json() for r in records], "options": options}
        line = (json.dumps(request, allow_nan=True, separators=(",", ":")) + "\n").encode("utf-8")
        with self._lock:
            assert self._process.stdin is not None and self._process.stdout is not None
            self._process.stdin.write(line)
            self._process.stdin.flush()
            status, payload = _read_frame(self._process.stdout)
        if status == b"E":
            raise ChartError(payload.decode("utf-8", errors="replace"))
        return payload

    def close(self) -> None:
        if os.getpid() != self._owner:
            return  # a forked copy of the owner (its atexit hooks): the child is not ours to stop
        if self._process.stdin is not None:
            with contextlib.suppress(OSError):
                self._process.stdin.close()  # the child exits at EOF
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()

    def release_inherited_pipes(self) -> None:
        """In a process forked from the owner: let go of the pipes to the child (so its stdin
        reaches EOF when the owner closes it or dies) without closing file descriptors that
        the file objects still own: each is pointed at /dev/null instead."""
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                for stream in (self._process.stdin, self._process.stdout):
                    if stream is not None and not stream.closed:
                        os.dup2(devnull, stream.fileno(), inheritable=False)
            finally:
                os.close(devnull)


def _read_frame(stream: IO[bytes]) -> tuple[bytes, bytes]:
    header = stream.read(_FRAME.size)
    if len(header) < _FRAME.size:
        raise BrokenPipeError("the chart process closed its output")
    status, length = _FRAME.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise BrokenPipeError("the chart process closed its output mid-reply")
    return status, payload


_PROCESS: ChartProcess | None = None
_PROCESS_LOCK = threading.Lock()
_FELL_BACK = False
_INHERITED: list[ChartProcess] = []  # a forked process's copies of its parent's child: never used, never closed


def _after_fork_in_child() -> None:
    """A forked process neither shares its parent's child (requests and replies on one pipe
    from two processes would interleave) nor keeps it alive: it starts its own on first use."""
    global _PROCESS, _PROCESS_LOCK
    if _PROCESS is not None:
        _PROCESS.release_inherited_pipes()
        _INHERITED.append(_PROCESS)
    _PROCESS = None
    _PROCESS_LOCK = threading.Lock()  # another thread may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _chart_process() -> ChartProcess | None:
    global _PROCESS, _FELL_BACK
    if os.environ.get("BON_TRACKER_CHART_PROCESS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _PROCESS_LOCK:
        if _PROCESS is not None and _PROCESS.alive:
            return _PROCESS
        if _FELL_BACK:
            return None
        try:
            _PROCESS = ChartProcess()
            atexit.register(_PROCESS.close)
        except OSError as err:
            _fall_back(f"cannot start the chart process ({err})")
            return None
        return _PROCESS


def _fall_back(why: str) -> None:
    global _FELL_BACK
    if not _FELL_BACK:
        logger.warning("bon_tracker: %s; charts are drawn in this process from now on", why)
    _FELL_BACK = True


def render_png(chart: str, records: Sequence[EvalRecord], **options: Any) -> bytes:
    """PNG bytes of ``chart`` (``curve``: the last record's best-of-n curve; ``compact``: its
    true reward alone, for the small card a UI first shows; ``overlay``,
    ``trend``, ``rl``: views over ``records``), drawn in the chart process.

    Raises :class:`ChartError` if the chart cannot be drawn from these records, and
    ``MissingDependencyError`` when matplotlib is not installed.
    """
    require_installed("matplotlib", "charts")
    process = _chart_process()
    if process is not None:
        try:
            return process.render(chart, records, options)
        except (OSError, ValueError) as err:  # the child died or its pipe broke: draw here instead
            _fall_back(f"the chart process failed ({type(err).__name__}: {err})")
    return draw_png(chart, records, options)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_GONE_SIGNAL = signal.SIGUSR1 if hasattr(signal, "SIGUSR1") else None


def _exit_with_parent(parent: int) -> None:
    """The child: exit as soon as ``parent`` (the process that started it) is gone.

    Linux sends a parent-death signal when the *thread* that started this child ends (the
    child then passes to another thread of the same process), so the signal is only a
    prompt to look: the child exits when its parent process is no longer ``parent``. The
    check after arming it covers a parent that died before. Elsewhere a thread looks every
    second."""

    def parent_gone() -> bool:
        return os.getppid() != parent

    def on_signal(signum: int, frame: object) -> None:
        if parent_gone():
            os._exit(0)

    armed = False
    if sys.platform.startswith("linux") and _PARENT_GONE_SIGNAL is not None:
        with contextlib.suppress(OSError, AttributeError, ValueError):
            signal.signal(_PARENT_GONE_SIGNAL, on_signal)
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(_PARENT_GONE_SIGNAL), 0, 0, 0) == 0
    if parent_gone():
        os._exit(0)
    if not armed:

        def watch() -> None:
            while not parent_gone():
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=watch, name="bon_tracker-parent-watch", daemon=True).start()


def _serve(parent: int | None = None) -> None:
    """The child: draw each request from stdin, reply on stdout, exit at EOF (or when
    ``parent`` dies)."""
    if parent is not None:
        _exit_with_parent(parent)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    for line in stdin:
        try:
            request = json.loads(line)
            records = [EvalRecord.from_json(r) for r in request["records"]]
            status, payload = b"P", draw_png(request["chart"], records, request.get("options") or {})
        except Exception as err:  # reported to the caller as a ChartError, never a dead child
            status, payload = b"E", f"{type(err).__name__}: {err}".encode()
        stdout.write(_FRAME.pack(status, len(payload)) + payload)
        stdout.flush()


def _parent_arg(argv: Sequence[str]) -> int | None:
    if len(argv) == 2 and argv[0] == "--parent" and argv[1].isdigit():
        return int(argv[1])
    return None


if __name__ == "__main__":
    _serve(_parent_arg(sys.argv[1:]))
