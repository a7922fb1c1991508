"""Delivery: a background worker drains the write-ahead log to the backend, in order.

The training thread only appends to the log and hands the entry over (:meth:`Delivery.submit`);
every service call, its timeouts and its retries happen here. Per entry:

* success: acknowledged in the log;
* an outage (connection, timeout, 5xx, 429, anything unknown): the same entry is retried
  with capped exponential back-off, reported once per outage;
* a rejected record (the service calls it invalid): moved to the dead-letter file with its
  reason, reported, and the next entry goes on;
* a configuration error (missing extra, invalid settings, unknown run, refused
  credentials): reported loudly, delivery stops; the log keeps everything for
  ``bon-tracker sync`` once the setup is fixed.

Entries the disk refused to log are held in memory, at most ``max_memory_records`` of
them; beyond that the oldest are dropped, counted and reported.

``bon-tracker sync`` and ``analyze --backend`` use the same class: :meth:`Delivery.run_once`
drives it on the calling thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bon_tracker.backends import Backend
from bon_tracker.tracking.wal import Entry, WriteAheadLog

if TYPE_CHECKING:
    from bon_tracker.record import EvalRecord

logger = logging.getLogger("bon_tracker")

DEFAULT_MAX_MEMORY_RECORDS = 1000


@dataclass
class DeliveryStats:
    """What happened to the entries handed to one :class:`Delivery`."""

    delivered: int = 0
    dead_lettered: int = 0
    dropped: int = 0  # refused by the disk and pushed out of the bounded memory queue
    dropped_steps: list[int] = field(default_factory=list)
    config_error: str | None = None
    last_error: str | None = None


class Delivery:
    """Delivers log entries to one backend on a daemon thread.

    Args:
        backend: where records go (built already; it opens its run on first use).
        wal: the log the entries were appended to (acks and dead letters go there).
        backoff_initial, backoff_max: seconds of the first retry wait and its cap.
        max_memory_records: entries held in memory when the disk refused them.
    """

    def __init__(
        self,
        backend: Backend,
        wal: WriteAheadLog,
        *,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        max_memory_records: int = DEFAULT_MAX_MEMORY_RECORDS,
    ):
        self.backend = backend
        self.wal = wal
        self.backoff_initial = min(float(backoff_initial), float(backoff_max))
        self.backoff_max = float(backoff_max)
        self.max_memory_records = int(max_memory_records)
        self.stats = DeliveryStats()
        self._queue: deque[Entry] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._busy = False  # a service call is in flight
        self._retry_at = 0.0  # monotonic time of the next attempt during an outage
        self._backoff = 0.0
        self._failing = False
        self._unacked: list[int] = []  # delivered, but the disk refused the ack: retried with the next
        self.on_exit: Callable[[], None] | None = None  # run by the worker thread as it ends

    # ---- the training thread's side --------------------------------------------------------
    def submit(self, entry: Entry) -> None:
        """Queue an entry (already appended to the log, or marked not persisted)."""
        with self._cond:
            self._queue.append(entry)
            self._bound_memory()
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._loop, name="bon_tracker-delivery", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Records not delivered yet."""
        with self._cond:
            return sum(1 for e in self._queue if e.record is not None)

    @property
    def running(self) -> bool:
        """The worker thread is alive (it may be inside a service call)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    @property
    def stopped(self) -> bool:
        """Delivery stopped for good (a configuration error)."""
        return self.stats.config_error is not None

    def drain(self, timeout: float | None) -> bool:
        """Wait until every queued entry is handled (or delivery stopped); False on timeout.
        A wait during an outage retries at once instead of sleeping out the back-off."""
        with self._cond:
            self._retry_at = 0.0
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self.stopped or (not self._queue and not self._busy), timeout)

    def close(self, timeout: float | None) -> bool:
        """Drain for at most ``timeout`` seconds, then stop taking entries. True when the
        worker is idle afterwards (no service call left in flight)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.drain(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            busy = self._busy
        thread = self._thread
        if thread is not None:
            # A worker waiting out a back-off leaves at once; one inside a service call gets
            # what is left of the timeout (it may never return: the thread is a daemon).
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left if busy or left is None else max(left, 1.0))
            busy = thread.is_alive()
        return not busy

    def leftover(self) -> list[Entry]:
        """Entries still queued (after :meth:`close`)."""
        with self._cond:
            return list(self._queue)

    # ---- the same path, on the calling thread (sync, analyze) -------------------------------
    def run_once(self, entries: list[Entry]) -> list[Entry]:
        """Deliver ``entries`` in order on this thread, trying each once; stops at the first
        outage or configuration error. Returns what is left."""
        queue = deque(entries)
        while queue and not self.stopped:
            outcome = self._deliver(queue[0])
            if outcome in ("retry", "stop"):
                break
            queue.popleft()
        self._flush_acks()
        return list(queue)

    # ---- the worker ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._work()
        finally:
            if self.on_exit is not None:
                with contextlib.suppress(Exception):
                    self.on_exit()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing or self.stopped:
                        self._cond.notify_all()
                        return
                    if self._queue:
                        wait = self._retry_at - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                entry = self._queue[0]
                self._busy = True
            outcome = "retry"
            try:
                outcome = self._deliver(entry)
            finally:
                with self._cond:
                    self._busy = False
                    if outcome in ("done", "dead") and self._queue and self._queue[0] is entry:
                        self._queue.popleft()
                    if outcome == "retry":
                        self._backoff = min(self.backoff_max, max(self.backoff_initial, self._backoff * 2))
                        self._retry_at = time.monotonic() + self._backoff
                    else:
                        self._backoff, self._retry_at = 0.0, 0.0
                    idle = not self._queue
                    self._cond.notify_all()
            if idle and outcome == "done":
                self._refresh_views()

    def _deliver(self, entry: Entry) -> str:
        """One attempt: ``"done"``, ``"dead"``, ``"retry"`` or ``"stop"``."""
        if entry.record is None:  # a finish marker: only `bon-tracker sync` acts on it
            self._ack(entry)
            return "done"
        try:
            self.backend.log_eval(entry.record)
        except Exception as err:
            kind = self._classify(err)
            text = f"{type(err).__name__}: {err}"
            self.stats.last_error = text
            if kind == "rejected":
                self._dead_letter(entry, text)
                return "dead"
            if kind == "config":
                logger.error(
                    "bon_tracker: the %s backend is not set up correctly (%s). Nothing more is sent; "
                    "every record is kept in %s. Fix the setup, then run: bon-tracker sync %s",
                    self.backend.name,
                    text,
                    self.wal.path,
                    self.wal.path,
                )
                # Set once the error is reported: whoever sees delivery stopped (drain, flush) finds
                # the message already logged.
                self.stats.config_error = text
                return "stop"
            if not self._failing:
                logger.warning(
                    "bon_tracker: the %s backend is unreachable (%s); records are kept in %s and retried "
                    "in the background (training is not held up)",
                    self.backend.name,
                    text,
                    self.wal.path,
                )
                self._failing = True
            return "retry"
        if self._failing:
            logger.warning("bon_tracker: the %s backend is reachable again; delivering the backlog", self.backend.name)
            self._failing = False
        self.stats.delivered += 1
        self._ack(entry)
        self._note_spec()
        self._raise_alerts(entry.record)
        return "done"

    def _raise_alerts(self, record: EvalRecord) -> None:
        """The service's native alert for each onset in a delivered record (W&B, trackio): tried
        once; a failure is logged and never blocks delivery."""
        for alert in record.onsets:
            title = f"bon_tracker: {alert.rule} at step {alert.step}"[:63]  # W&B: under 64 characters
            try:
                self.backend.alert(title, alert.message, "WARN", step=record.step)
            except Exception as err:
                logger.warning(
                    "bon_tracker: the %s alert %r failed (%s: %s)", self.backend.name, title, type(err).__name__, err
                )

    def _note_spec(self) -> None:
        """Keep the log's spec current: the run id is known once the backend opened its run."""
        with contextlib.suppress(Exception):  # a full disk: the first record's spec still rebuilds the backend
            self.wal.write_spec(self.backend.spec())

    def _classify(self, err: BaseException) -> str:
        try:
            kind = self.backend.classify(err)
        except Exception:  # a classifier bug must not kill delivery: retrying is the safe side
            return "transient"
        return kind if kind in ("config", "rejected", "transient") else "transient"

    def _dead_letter(self, entry: Entry, reason: str) -> None:
        self.stats.dead_lettered += 1
        step = entry.record.step if entry.record is not None else None
        try:
            self.wal.dead_letter(entry, reason)
            where = f"moved to {self.wal.dead_path}"
        except OSError as err:
            where = f"and could not be written to {self.wal.dead_path} ({err})"
        logger.error(
            "bon_tracker: the %s backend rejected the record of step %s (%s); %s; later records go on",
            self.backend.name,
            step,
            reason,
            where,
        )
        self._ack(entry)

    def _ack(self, entry: Entry) -> None:
        if entry.persisted:
            self._unacked.append(entry.seq)
            self._flush_acks()

    def _flush_acks(self) -> None:
        if not self._unacked:
            return
        try:
            self.wal.ack(self._unacked)
            self._unacked = []
        except OSError:
            pass  # kept, written with the next ack; a replay of a delivered step is a no-op anyway

    def _refresh_views(self) -> None:
        """Overview charts and reports, drawn only when the queue is empty (latest wins)."""
        try:
            self.backend.refresh_views()
        except Exception as err:  # a chart never blocks delivery
            name, kind = self.backend.name, type(err).__name__
            logger.warning("bon_tracker: %s overview charts failed (%s: %s)", name, kind, err)

    def _bound_memory(self) -> None:
        """Hold at most ``max_memory_records`` entries the disk refused (called under the lock);
        the one whose delivery is in flight is not counted: it is not lost unless that fails."""
        in_flight = self._queue[0] if self._busy and self._queue else None
        memory_only = [e for e in self._queue if not e.persisted and e.record is not None and e is not in_flight]
        excess = len(memory_only) - self.max_memory_records
        if excess <= 0:
            return
        drop = {id(e) for e in memory_only[:excess]}
        dropped = [e for e in self._queue if id(e) in drop]
        self._queue = deque(e for e in self._queue if id(e) not in drop)
        self.stats.dropped += len(dropped)
        self.stats.dropped_steps.extend(e.record.step for e in dropped if e.record is not None)
        logger.error(
            "bon_tracker: the disk refuses the write-ahead log %s and %d records wait in memory; "
            "dropped the oldest (step %s); %d dropped so far",
            self.wal.path,
            self.max_memory_records,
            ", ".join(str(e.record.step) for e in dropped if e.record is not None),
            self.stats.dropped,
        )
