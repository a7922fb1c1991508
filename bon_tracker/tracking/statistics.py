"""The statistics worker: what an eval adds to its curve, computed off the training thread.

``log_scores`` keeps on the training thread only what must be there: validation, the curve
it returns, and the append of a curve-only record to the write-ahead log. Everything else
(the Gao fit, the Goodhart interval, predictions, agreement, alert rules, and whatever a
later statistic adds) is a *job* run here, on one background thread, in the order the evals
were logged, so that the alert rules see the evals in step order exactly as before. A job
never raises: it catches its own failures (the curve is then delivered without them).

The tracker bounds what waits: before it queues an eval, it waits for the jobs of the
earlier evals (:meth:`StatisticsWorker.wait`), so at most one eval's scores are held here
and an alert is reported at the latest at the next eval.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("bon_tracker")

Job = Callable[[], None]


class StatisticsWorker:
    """One daemon thread running jobs in submission order (started by the first
    :meth:`submit`, it waits for the next job until :meth:`close`)."""

    def __init__(self, name: str = "bon_tracker-statistics"):
        self._name = name
        self._queue: deque[Job] = deque()
        self._busy = False
        self._closed = False
        self._cond = threading.Condition()  # the queue and busy flag; wait() waits on it
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()  # one token per submit or close
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        """Queue ``job``; it runs after every job submitted before it."""
        with self._cond:
            self._queue.append(job)
            self._closed = False
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        # Woken outside the lock: a Condition's notify wakes the worker only for it to wait again
        # for the lock the notifier holds (two wake-ups; measured 10-40 us of the training thread).
        self._wake.put(None)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queue) + int(self._busy)

    def wait(self, timeout: float | None) -> bool:
        """Wait until every submitted job has run; False when ``timeout`` seconds passed first."""
        if threading.current_thread() is self._thread:
            return not self._queue  # a job waiting for the worker it runs on would never return
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        """Let the thread end once the queue is empty."""
        with self._cond:
            self._closed = True
        self._wake.put(None)

    def take_pending(self) -> list[Job]:
        """Remove the jobs not started yet and return them (the tracker runs what it must of them)."""
        with self._cond:
            jobs = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
            return jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                job = self._queue.popleft() if self._queue else None
                if job is None and self._closed:
                    self._thread = None  # closed and idle: a later submit starts a new thread
                    return
                self._busy = job is not None
            if job is None:
                self._wake.get()  # until a submit or close (a spare wake-up only loops once more)
                continue
            try:
                job()
            except Exception:  # a job catches its own failures; this is the last guard
                logger.exception("bon_tracker: a statistics job failed")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
