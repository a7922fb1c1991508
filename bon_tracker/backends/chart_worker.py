"""Drawing charts off the training thread.

Rendering a chart with matplotlib costs a tenth of a second or more, often more than
the rest of an eval step; a training loop should not wait for it. Charts are derived
from records the backend has already written (metrics, tables, record files), so a
chart that fails is logged once and skipped: no record is lost, and
``bon-tracker report`` can draw it again from the records.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger("bon_tracker")


class ChartWorker:
    """Runs chart jobs in order on one daemon thread (or inline when ``background=False``).

    A job submitted under a key that is still pending replaces the pending one: when
    steps come faster than charts, only the latest overview is drawn.
    """

    def __init__(self, name: str, *, background: bool = True):
        self.name = name
        self.background = background
        self._jobs: dict[str, Callable[[], None]] = {}
        self._cond = threading.Condition()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._failed: set[str] = set()

    def submit(self, key: str, job: Callable[[], None]) -> None:
        """Queue ``job`` (replacing a pending job with the same ``key``)."""
        if not self.background:
            self._run(key, job)
            return
        with self._cond:
            if self._closed:
                raise RuntimeError(f"the {self.name} chart worker is closed")
            self._jobs.pop(key, None)
            self._jobs[key] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"bon_tracker-{self.name}-charts", daemon=True)
                self._thread.start()
            self._cond.notify()

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done; False if ``timeout`` seconds ran out first."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Finish the queued jobs (waiting up to ``timeout`` seconds) and let the thread end.

        Returns False if jobs were still running when the time ran out: the daemon thread
        then finishes them on its own (or dies with the process); no new job is taken.
        """
        done = self.drain(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if not done:
            logger.warning("bon_tracker: %s charts still drawing after %s s; left unfinished", self.name, timeout)
        return done

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return
                key = next(iter(self._jobs))
                job = self._jobs.pop(key)
                self._busy = True
            try:
                self._run(key, job)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _run(self, key: str, job: Callable[[], None]) -> None:
        kind = key.split(":")[0]
        try:
            job()
        except Exception as err:  # a chart must never fail the step or kill the worker
            if kind not in self._failed:
                self._failed.add(kind)
                logger.warning(
                    "bon_tracker: %s chart %r failed (%s: %s); skipped", self.name, kind, type(err).__name__, err
                )
