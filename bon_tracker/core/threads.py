"""Threads for blocks of prompts, and BLAS held to one thread while they run.

The core cuts its input into cache-sized blocks whose partition depends only on the
input's shape, computes each block on a worker thread (numpy releases the GIL in
sort, take and matrix products) and combines the blocks' results in block order, so
results are bit-identical for any thread count.

* ``threads`` arguments: ``None`` reads the environment variable ``BON_TRACKER_THREADS``
  at call time (never at import), else ``min(os.cpu_count(), 4)``; ``1`` runs
  everything on the calling thread.
* BLAS (numpy's OpenBLAS) is limited to one thread for the duration of a call, through
  ``threadpoolctl`` when it is installed: each block's matrix product is small, and
  BLAS threads on small products cost more than they give (more so on a shared
  machine). Without ``threadpoolctl`` the matrix products of concurrent blocks take
  turns (a lock), so BLAS's own threads never compete with each other.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

THREADS_ENV = "BON_TRACKER_THREADS"
DEFAULT_MAX_THREADS = 4


def thread_count(threads: int | None = None) -> int:
    """The number of threads to compute on, the calling one included.

    Args:
        threads: an explicit count (>= 1), or None for ``$BON_TRACKER_THREADS``, else
            ``min(os.cpu_count(), 4)``.

    Example:
        >>> thread_count(3)
        3
    """
    if threads is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return max(1, min(_cores(), DEFAULT_MAX_THREADS))
        try:
            threads = int(raw)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {raw!r}") from None
        where = THREADS_ENV
    else:
        where = "threads"
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{where} must be a positive integer, got {threads!r}")
    return threads


@functools.lru_cache(maxsize=1)
def _cores() -> int:
    """``os.cpu_count()``, read once: it reads a file under /sys on every call (2 us, as long as a
    small curve's sort)."""
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """threadpoolctl's controller (built once, on first use), or None without threadpoolctl."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    return ThreadpoolController()


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[bool]:
    """Limit BLAS to one thread inside the block; yields whether that was possible.

    Sets the libraries' thread counts directly: ``controller.limit`` first reads every
    library's full info, about 10 us, as long as a small call's matrix products.
    """
    controller = _blas_controller()
    if controller is None:
        yield False
        return
    blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    previous = [lib.num_threads for lib in blas]
    try:
        for lib, count in zip(blas, previous):
            if count != 1:
                lib.set_num_threads(1)
        yield True
    finally:
        for lib, count in zip(blas, previous):
            if count != 1:
                lib.set_num_threads(count)


class BlasTurns:
    """A lock around matrix products when BLAS could not be held to one thread."""

    def __init__(self, needed: bool):
        self._lock = threading.Lock() if needed else None

    def __enter__(self):
        if self._lock is not None:
            self._lock.acquire()
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_IN_WORKER = threading.local()


def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` workers, started on first use and kept: starting threads costs
    about a millisecond each on a busy machine, more than a small call's whole work."""
    with _POOLS_LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = _POOLS[threads] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="bon_tracker", initializer=_mark_worker
            )
        return pool


def _mark_worker() -> None:
    _IN_WORKER.active = True


def map_in_order(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` on up to ``threads`` threads, the calling one included; results in the items' order.

    At most ``2 * threads`` items are in flight, so memory stays bounded by the blocks
    being worked on. While the next result is not ready, the calling thread computes items
    that no worker has started yet (that one first) rather than wait: on a busy machine a
    worker can take milliseconds to be scheduled, longer than a block takes. As it does, the
    pool has ``threads - 1`` workers: ``threads`` threads computing at once, not one more
    (with two cores, two workers and the caller measured 1.1 to 1.25 times slower than one
    worker and the caller, from one more hand-over of cores and caches). Every item is
    computed by the same ``fn`` whichever thread runs it, so results do not depend on it.
    Called from one of the workers themselves, it runs on that thread (a worker waiting on
    its own pool could wait forever).

    A ``KeyboardInterrupt`` (Ctrl-C) while waiting cancels the items not yet started and is
    raised at once, without waiting for the items already running (they finish on their own,
    each one block of work): Ctrl-C is never held up until the whole call would have ended.
    """
    items = list(items)
    # One item (a small call: one block) runs here: a hand-off to a worker costs more than it.
    if threads <= 1 or len(items) <= 1 or getattr(_IN_WORKER, "active", False):
        yield from map(fn, items)
        return
    pool = _pool(threads - 1)  # and the calling thread
    pending: list[tuple[T, Future]] = []
    interrupted = False
    try:
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 2 * threads:
                yield _next_result(pending, fn)
        while pending:
            yield _next_result(pending, fn)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        for _, future in pending:  # the caller stopped early, or a block failed: drop the rest
            future.cancel()
        if not interrupted:  # Ctrl-C: raise now; a running block holds its own references
            for _, future in pending:
                if not future.cancelled():
                    future.exception()  # wait, so no block outlives the call that owns its buffers


def _next_result(pending: list[tuple[T, Future]], fn: Callable[[T], R]) -> R:
    """Pop the first pending item's result, computing items not yet started here meanwhile."""
    for index, (item, future) in enumerate(pending):
        if pending[0][1].done():
            break
        if future.cancel():  # no worker has started it: compute it on this thread
            done: Future = Future()
            try:
                done.set_result(fn(item))
            except Exception as err:  # raised in order, as a worker's error would be
                done.set_exception(err)
            pending[index] = (item, done)
    return pending.pop(0)[1].result()
