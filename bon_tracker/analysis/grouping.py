"""Best-of-n curves of score tables too large to hold in memory.

Two pieces:

* :class:`~bon_tracker.core.accumulator.CurveAccumulator` (in core, shared with
  :func:`~bon_tracker.bon_curve` and distributed workers) builds one eval step's
  :class:`~bon_tracker.BonCurve` from prompts fed a few at a time, from mergeable
  per-chunk statistics; the result equals ``bon_curve`` on all prompts at once up to
  float rounding.
* :func:`curves_from_batches` groups a stream of rows (:class:`ScoreBatch`) into
  prompts per (run, step) and feeds the accumulators.

Memory bound of :func:`curves_from_batches` (besides the reader's batch, and for
Parquet one row group, which the file's writer sized):

* **grouped input** (the rows of each prompt at each step are contiguous: sorted
  by step and prompt, or written prompt by prompt), the usual case: the rows of one
  prompt plus three chunks of ``chunk_samples`` samples (default 2^18, 4 MiB of
  floats: the one filling and two handed to the reducer's thread, which sorts them while
  the pass groups the next rows) and the working memory of :func:`~bon_tracker.bon_curve`
  on one, plus the key
  of each (run, step, prompt) seen, to notice input that is not grouped after all.
  Prompts complete inside a batch go to the curves as blocks (no Python work per
  prompt). While keys increase (sorted input) they are kept as arrays (16 bytes per
  prompt with integer ids); at the first key out of order they become one hash each
  (~70 bytes). Only the keys grow with the input (per prompt, not per row): 4 million
  rows of 64 samples per prompt peak within ~60 MiB of a 2,000-row file.
* **ungrouped input** (a prompt's rows scattered): every row is kept until the end
  as float64 proxy + float64 true + an int32 prompt code, 20 bytes per row (up to
  1.5x while the buffers grow), plus one Python key per distinct prompt and 8 bytes
  per row of one (run, step) while that step is sorted: ~40 bytes per row at the
  peak (4 million shuffled rows: +141 MiB). The stream is read twice: the first pass
  stops at the first prompt that reappears after other prompts.

Several proxy or true columns (``ScoreBatch.extra``, an ensemble) add nothing here: this pass
reads ``proxy`` and ``true`` only (``bon-tracker analyze`` hands it the deployed rule's score as
``proxy``), and keeps no ``extra``. Their per-step buffer, ``(K + T) x 8`` bytes per sample from a
step's first prompt to its last, is analyze's (bon_tracker/cli/analyze.py), as is the one read
of grouped input: with ``accumulators`` given, the accumulators also keep each prompt's estimates
on the way (``2 x 8`` bytes per prompt and n of the grid) and, when analyze asks, a step's blocks
of scores until the step is done (views of the batches, within analyze's budget).

Curves that rest on less than they seem to are reported with a warning on the
``bon_tracker`` logger (the command line prints it), one per run and kind: every
prompt has one sample (N = 1: no curve beyond n = 1), all samples are one prompt,
or prompts have different numbers of samples so that the largest n averages only
some of them (``n_prompts`` of the curve says how many at each n).
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from bon_tracker.analysis.score_files import ScoreBatch, ScoreFileError
from bon_tracker.core import BonCurve
from bon_tracker.core.accumulator import (
    DEFAULT_CHUNK_SAMPLES,
    CurveAccumulator,
    CurveStats,
    merge_curve_stats,
)
from bon_tracker.core.threads import single_threaded_blas

__all__ = ["DEFAULT_CHUNK_SAMPLES", "CurveAccumulator", "curve_warnings", "curves_from_batches"]

logger = logging.getLogger("bon_tracker")

RunSteps = dict[Any, dict[int, BonCurve]]  # run name (None without a run column) -> step -> curve


def _done(result: Any) -> Future:
    done: Future = Future()
    done.set_result(result)
    return done


class _ChunkReducer:
    """A worker thread that reduces the accumulators' chunks while the pass goes on grouping the
    next rows (the pass's thread and the reader's would otherwise leave a core idle between them).

    Each accumulator merges its chunks' results in the order it handed them over, so the
    statistics and estimates are those of reducing each chunk in turn, to the bit. After
    :meth:`close` chunks are reduced on the calling thread."""

    IN_FLIGHT = 2  # chunks of one accumulator handed over and not yet merged (what bounds memory)

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._closed:
            return _done(fn(*args))
        if self._pool is None:  # started by the first chunk: a small input never starts it
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="bon_tracker_curves")
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


class _SizedAccumulator(CurveAccumulator):
    """A :class:`CurveAccumulator` that also keeps the smallest number of samples of a
    prompt and one prompt id (for the warnings about the shape of the data).

    With ``keep_estimates`` each chunk is reduced by the same call as the base class's (one sort
    of every prompt, ``rank_and_estimate``) asked to keep the per-prompt estimates it computes on
    the way, and keeps them (``2 x 8`` bytes per prompt and n of the chunk's grid): what
    ``bon-tracker analyze`` would otherwise read the file again to compute (:meth:`estimates_on`).
    With a ``reducer`` the chunks are reduced on its thread and merged in order when a result is
    asked for (and before more than ``IN_FLIGHT`` wait). The statistics, hence the curve, are the
    base class's to the bit."""

    def __init__(
        self,
        ns: Sequence[int] | None,
        chunk_samples: int,
        keep_estimates: bool = False,
        reducer: _ChunkReducer | None = None,
    ):
        super().__init__(ns, chunk_samples=chunk_samples)
        self.min_samples: int | None = None
        self.example: Any = None
        self.keep_estimates = keep_estimates
        self.reducer = reducer
        self._in_flight: deque[Future] = deque()  # chunks handed to the reducer, in order, not yet merged
        # Per chunk, in order: (largest N, prompts, chunk grid, true (P, G) or None, proxy (P, G) or None).
        self.estimate_parts: list[tuple[int, int, np.ndarray, np.ndarray | None, np.ndarray | None]] = []
        self._peeked: tuple[tuple[int, ...], CurveStats, tuple] | None = None  # the pending chunk's reduction

    @property
    def stats(self) -> CurveStats:
        self._flush()
        self._merge_in_flight()
        return self._stats

    @property
    def N(self) -> int:
        self._merge_in_flight()
        return super().N

    @property
    def n_prompts(self) -> int:
        self._merge_in_flight()
        return super().n_prompts

    @property
    def n_samples(self) -> int:
        self._merge_in_flight()
        return super().n_samples

    def _merge_in_flight(self, keep: int = 0) -> None:
        """Merge the chunks handed to the reducer, oldest first, until ``keep`` are left."""
        while len(self._in_flight) > keep:
            part, estimates = self._in_flight.popleft().result()
            self._stats = merge_curve_stats(self._stats, part)
            if self.keep_estimates:
                self.estimate_parts.append(estimates)

    def _reduce_pending(self) -> tuple[CurveStats, tuple]:
        """The statistics and estimates of the pending prompts, as ``CurveAccumulator._flush``
        reduces them (the same grid, the same matrix, the same call), cached while they are pending."""
        key = tuple(id(p) for p in self._pending_proxy)
        if self._peeked is not None and self._peeked[0] == key:
            return self._peeked[1], self._peeked[2]
        part, estimates = self._reduce(keep=True)
        assert estimates is not None
        self._peeked = (key, part, estimates)
        return part, estimates

    def _flush(self) -> None:
        if not self._pending_proxy:
            return
        if self._peeked is not None:  # reduced already by peek_curve (its estimates too)
            reduced = _done(self._reduce_pending())
        elif self.reducer is None:
            reduced = _done(self._reduce(keep=self.keep_estimates))
        else:
            self._merge_in_flight(keep=self.reducer.IN_FLIGHT - 1)
            chunk = (self._pending_proxy, self._pending_true, self._pending_samples, self.keep_estimates)
            reduced = self.reducer.submit(self._reduce_chunk, *chunk)
        self._in_flight.append(reduced)
        self._pending_proxy, self._pending_true, self._pending_samples = [], [], 0
        self._peeked = None
        if self.reducer is None:
            self._merge_in_flight()

    def peek_curve(self) -> BonCurve:
        """The curve :meth:`curve` would give if no more prompts came, without changing what it
        gives later: the pending chunk is reduced now, and that reduction kept for its flush."""
        self._merge_in_flight()
        if not self._pending_proxy:
            return self.curve()
        part, _ = self._reduce_pending()
        saved = (self._stats, self._pending_proxy, self._pending_true, self._pending_samples, self._peeked)
        self._stats = merge_curve_stats(self._stats, part)
        self._pending_proxy, self._pending_true, self._pending_samples = [], [], 0
        try:
            return self.curve()
        finally:
            self._stats, self._pending_proxy, self._pending_true, self._pending_samples, self._peeked = saved

    def estimates_on(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Every prompt's estimates ``(P, len(grid))`` of the true and the proxy score on ``grid``
        (the step's), in order, as ``ray_engine.prompt_estimates`` computes them chunk by chunk
        (NaN where a prompt has fewer samples than n); None when a chunk's grid is not the
        step's grid up to the chunk's largest N (ragged prompts: the estimates are recomputed).
        Pending prompts count, reduced as :meth:`peek_curve` reduces them (nothing is flushed)."""
        grid = np.asarray(grid, dtype=np.int64)
        self._merge_in_flight()
        parts = list(self.estimate_parts)
        if self._pending_proxy:
            parts.append(self._reduce_pending()[1])
        # Written into the step's two matrices at once (no per-chunk matrices joined after).
        total = sum(prompts for _, prompts, _, _, _ in parts)
        true_pp, proxy_pp = np.empty((total, len(grid))), np.empty((total, len(grid)))
        start = 0
        for largest, prompts, chunk_grid, true_est, proxy_est in parts:
            rows = slice(start, start + prompts)
            start += prompts
            cols = np.flatnonzero(grid <= largest)
            unusable = true_est is None or proxy_est is None or not np.array_equal(grid[cols], chunk_grid)
            if cols.size and unusable:
                return None
            if cols.size and cols.size == len(grid):  # the usual case: the chunk reaches every n of the step
                true_pp[rows], proxy_pp[rows] = true_est, proxy_est
                continue
            true_pp[rows], proxy_pp[rows] = np.nan, np.nan
            if cols.size:
                true_pp[rows, cols], proxy_pp[rows, cols] = true_est, proxy_est
        return true_pp, proxy_pp

    def add_prompt(self, proxy: np.ndarray, true: np.ndarray) -> None:
        if len(proxy):
            self.min_samples = len(proxy) if self.min_samples is None else min(self.min_samples, len(proxy))
            self._kept(proxy[None, :], true[None, :])
        super().add_prompt(proxy, true)

    def add_prompts(self, proxy: np.ndarray, true: np.ndarray) -> None:
        if proxy.size:
            n = proxy.shape[1]
            self.min_samples = n if self.min_samples is None else min(self.min_samples, n)
            self._kept(proxy, true)
        super().add_prompts(proxy, true)

    # Keeping the prompts' scores (``bon-tracker analyze``'s one read: the agreement's prompts are
    # taken from them once the step is done): off until keep_blocks().
    recorder: Any = None  # given every block of prompts added: ``recorder.add(proxy, true)``
    sealed = False  # the step was taken as done (take_blocks)
    reopened = False  # prompts came after that

    def keep_blocks(self, recorder: Any) -> None:
        """From now on hand every ``(k, N)`` block of prompts added (the arrays given, not copies)
        to ``recorder.add(proxy, true)`` (which bounds what it keeps)."""
        self.recorder = recorder

    def take_blocks(self) -> Any:
        """The recorder given to :meth:`keep_blocks` (None if none); the step counts as done from
        now: prompts added later set :attr:`reopened`."""
        recorder, self.recorder, self.sealed = self.recorder, None, True
        return recorder

    def _kept(self, proxy: np.ndarray, true: np.ndarray) -> None:
        if self.sealed:
            self.reopened = True
        if self.recorder is not None:
            self.recorder.add(proxy, true)


class _NotGrouped(Exception):
    """A prompt's rows reappeared after other prompts: the input is not grouped."""


class _Growable:
    """A 1-D numpy array that grows by appending (amortised, 1.5x)."""

    def __init__(self, dtype: type):
        self.data = np.empty(1024, dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.data):
            self.data.resize(max(end, int(len(self.data) * 1.5)), refcheck=False)
        self.data[self.size : end] = values
        self.size = end

    def view(self) -> np.ndarray:
        return self.data[: self.size]


class _StepBuffer:
    """Every row of one (run, step) of ungrouped input: scores and prompt codes."""

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.code = _Growable(np.int32)
        self.proxy = _Growable(np.float64)
        self.true = _Growable(np.float64)

    def extend(self, prompt: np.ndarray, proxy: np.ndarray, true: np.ndarray) -> None:
        unique, inverse = np.unique(prompt, return_inverse=True)
        mapped = np.fromiter(
            (self.codes.setdefault(key, len(self.codes)) for key in unique.tolist()), dtype=np.int64, count=len(unique)
        )
        if len(self.codes) > np.iinfo(np.int32).max:
            raise ValueError("more than 2^31 prompts in one step")
        self.code.extend(mapped[inverse.ravel()].astype(np.int32))
        self.proxy.extend(proxy)
        self.true.extend(true)

    def feed(self, accumulator: CurveAccumulator) -> None:
        if isinstance(accumulator, _SizedAccumulator) and self.codes:
            example = next(iter(self.codes))
            accumulator.example = example.item() if isinstance(example, np.generic) else example
        codes = self.code.view()
        order = np.argsort(codes, kind="stable")
        bounds = np.flatnonzero(np.diff(codes[order])) + 1
        proxy, true = self.proxy.view(), self.true.view()
        for rows in np.split(order, bounds):
            accumulator.add_prompt(proxy[rows], true[rows])


def _segments(batch: ScoreBatch) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of rows with the same (run, step, prompt) key."""
    n = len(batch)
    change = batch.prompt[1:] != batch.prompt[:-1]
    if batch.step is not None:
        change |= batch.step[1:] != batch.step[:-1]
    if batch.run is not None:
        change |= batch.run[1:] != batch.run[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    ends = np.append(starts[1:], n)
    return starts, ends


def _key_at(batch: ScoreBatch, i: int) -> tuple[Any, int, Any]:
    prompt = batch.prompt[i]
    return (
        None if batch.run is None else batch.run[i],
        0 if batch.step is None else int(batch.step[i]),
        prompt.item() if isinstance(prompt, np.generic) else prompt,
    )


class _ClosedKeys:
    """The (run, step, prompt) keys of prompts already complete, to notice one that reappears.

    While keys only increase within a run (input sorted by step and prompt, runs one after
    another), a key cannot have been seen before: batches of keys are checked with a few
    array comparisons and kept as arrays. At the first key out of that order every key so
    far goes into a set of hashes, and from then on each key is checked against it.
    """

    def __init__(self) -> None:
        self.hashes: set[int] | None = None
        self.history: list[tuple[Any, np.ndarray, np.ndarray]] = []  # (run, steps, prompts) closed in order
        self.last: tuple[Any, Any, Any] | None = None  # the last key closed while in order
        self.done_runs: set[Any] = set()

    def _to_hashes(self) -> None:
        self.hashes = set()
        for run, steps, prompts in self.history:
            self.hashes.update(hash((run, step, prompt)) for step, prompt in zip(steps.tolist(), prompts.tolist()))
        self.history = []

    def _add_hashed(self, run: Any, steps: np.ndarray, prompts: np.ndarray) -> None:
        assert self.hashes is not None
        for step, prompt in zip(steps.tolist(), prompts.tolist()):
            key = (run, step, prompt)
            if hash(key) in self.hashes:
                raise _NotGrouped(key)
            self.hashes.add(hash(key))

    def add(self, run: Any, steps: np.ndarray, prompts: np.ndarray) -> None:
        """Close keys ``(run, steps[i], prompts[i])`` in this order; raise :class:`_NotGrouped` on one seen before."""
        if len(steps) == 0:
            return
        if self.hashes is None and not self._in_order(run, steps, prompts):
            self._to_hashes()
        if self.hashes is not None:
            self._add_hashed(run, steps, prompts)
            return
        self.history.append((run, steps, prompts))
        if self.last is not None and self.last[0] != run:
            self.done_runs.add(self.last[0])
        self.last = (run, steps[-1], prompts[-1])

    def _in_order(self, run: Any, steps: np.ndarray, prompts: np.ndarray) -> bool:
        if self.last is not None:
            if self.last[0] == run:
                if (steps[0], prompts[0]) <= (self.last[1], self.last[2]):
                    return False
            elif run in self.done_runs:
                return False
        elif run in self.done_runs:
            return False
        if len(steps) == 1:
            return True
        try:
            later = (steps[1:] > steps[:-1]) | ((steps[1:] == steps[:-1]) & (prompts[1:] > prompts[:-1]))
        except TypeError:  # prompt ids that do not compare (mixed types): check them one by one
            return False
        return bool(np.all(later))


def _segment_keys(batch: ScoreBatch, at: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Runs (or None), steps and prompt ids at the rows ``at``, as Python-comparable arrays."""
    steps = np.zeros(len(at), dtype=np.int64) if batch.step is None else batch.step[at]
    return (None if batch.run is None else batch.run[at]), steps, batch.prompt[at]


def _grouped(
    batches: Iterable[ScoreBatch],
    make: Callable[[], CurveAccumulator],
    accumulators: dict[tuple[Any, int], CurveAccumulator] | None = None,
) -> dict:
    """Curves of grouped input: prompts complete inside a batch go to the accumulators as
    blocks of equal-length prompts (no Python work per prompt); a prompt cut by a batch's
    end is joined with the next batch's first rows. ``accumulators``: the dict to fill."""
    accumulators = {} if accumulators is None else accumulators
    closed = _ClosedKeys()
    open_key: tuple[Any, int, Any] | None = None
    open_proxy: list[np.ndarray] = []
    open_true: list[np.ndarray] = []

    def accumulator(run: Any, step: int, prompt: Any) -> CurveAccumulator:
        found = accumulators.get((run, step))
        if found is None:
            found = accumulators[(run, step)] = make()
            found.example = prompt.item() if isinstance(prompt, np.generic) else prompt
        return found

    def close() -> None:
        if open_key is None:
            return
        run, step, prompt = open_key
        closed.add(run, np.array([step]), _object_or_array([prompt]))
        proxy = open_proxy[0] if len(open_proxy) == 1 else np.concatenate(open_proxy)
        true = open_true[0] if len(open_true) == 1 else np.concatenate(open_true)
        accumulator(run, step, prompt).add_prompt(proxy, true)

    for batch in batches:
        if len(batch) == 0:
            continue
        starts, ends = _segments(batch)
        first_key = _key_at(batch, 0)
        if first_key == open_key:  # the open prompt goes on in this batch
            open_proxy.append(batch.proxy[: ends[0]])
            open_true.append(batch.true[: ends[0]])
            if len(starts) == 1:
                continue
            close()
            first = 1
        else:
            close()
            first = 0
        # Segments first .. last-1 are complete prompts; the last may go on in the next batch.
        complete = slice(first, len(starts) - 1)
        runs, steps, prompts = _segment_keys(batch, starts[complete])
        if len(steps):
            lengths = ends[complete] - starts[complete]
            cut = lengths[1:] != lengths[:-1]
            cut |= steps[1:] != steps[:-1]
            if runs is not None:
                cut |= runs[1:] != runs[:-1]
            pieces = np.concatenate(([0], np.flatnonzero(cut) + 1, [len(steps)]))
            for a, b in zip(pieces[:-1].tolist(), pieces[1:].tolist()):
                run = None if runs is None else runs[a]
                closed.add(run, steps[a:b], prompts[a:b])
                N = int(lengths[a])
                rows = slice(int(starts[first + a]), int(starts[first + a]) + (b - a) * N)
                accumulator(run, int(steps[a]), prompts[a]).add_prompts(
                    batch.proxy[rows].reshape(b - a, N), batch.true[rows].reshape(b - a, N)
                )
        last = len(starts) - 1
        if last >= first:
            open_key = _key_at(batch, int(starts[last]))
            if closed.hashes is not None and hash(open_key) in closed.hashes:
                raise _NotGrouped(open_key)
            open_proxy, open_true = [batch.proxy[starts[last] :]], [batch.true[starts[last] :]]
    close()
    return accumulators


def _object_or_array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _buffered(batches: Iterable[ScoreBatch], make: Callable[[], CurveAccumulator]) -> dict:
    buffers: dict[tuple[Any, int], _StepBuffer] = {}
    for batch in batches:
        if len(batch) == 0:
            continue
        runs = batch.run if batch.run is not None else np.zeros(len(batch), dtype=np.int8)
        steps = batch.step if batch.step is not None else np.zeros(len(batch), dtype=np.int64)
        run_values, run_index = np.unique(runs, return_inverse=True)
        step_values, step_index = np.unique(steps, return_inverse=True)
        group = run_index.ravel() * len(step_values) + step_index.ravel()
        if group.max() == group.min():
            parts = [(int(group[0]), slice(None))]
        else:
            order = np.argsort(group, kind="stable")
            bounds = np.flatnonzero(np.diff(group[order])) + 1
            parts = [(int(group[rows[0]]), rows) for rows in np.split(order, bounds)]
        for g, rows in parts:
            run = None if batch.run is None else run_values[g // len(step_values)]
            step = int(step_values[g % len(step_values)])
            buffer = buffers.get((run, step))
            if buffer is None:
                buffer = buffers[(run, step)] = _StepBuffer()
            buffer.extend(batch.prompt[rows], batch.proxy[rows], batch.true[rows])
    accumulators = {}
    for key in list(buffers):
        accumulators[key] = make()
        buffers.pop(key).feed(accumulators[key])  # free each step's rows once it is reduced
    return accumulators


@contextlib.contextmanager
def _closing(batches: Iterable[ScoreBatch]) -> Iterator[Iterator[ScoreBatch]]:
    """The batches' iterator, closed on the way out (a reader stopped early closes its file)."""
    iterator = iter(batches)
    try:
        yield iterator
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def curves_from_batches(
    open_batches: Callable[[], Iterable[ScoreBatch]],
    *,
    ns: Sequence[int] | None = None,
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
    on_ungrouped: Callable[[tuple[Any, int, Any]], None] | None = None,
    accumulators: dict[tuple[Any, int], Any] | None = None,
) -> tuple[RunSteps, dict[str, Any]]:
    """Best-of-n curves per run and step of a stream of score rows.

    Args:
        open_batches: returns a fresh iterator over the rows (called a second time
            when the input turns out not to be grouped by prompt).
        ns: the grid of n for every step; default per step as :func:`~bon_tracker.bon_curve`.
        chunk_samples: see :class:`CurveAccumulator`.
        on_ungrouped: called with the first (run, step, prompt) key found out of
            place, before the second pass.
        accumulators: a dict that receives each (run, step)'s accumulator of grouped input
            as the pass makes it (emptied if the input turns out not to be grouped): they
            keep every prompt's estimates on the way (``estimates_on``; ``peek_curve``
            gives a step's curve before the pass ends). The curves are the same.

    Returns:
        ``({run: {step: BonCurve}}, info)`` with runs in order of first appearance and
        steps ascending; ``info`` holds ``grouped`` (bool), and per (run, step)
        ``prompts``, ``samples`` and ``min_samples`` (the fewest samples of a prompt; the
        most is the curve's ``N``), and ``warnings``: the messages also logged (see
        :func:`curve_warnings`).
    """
    reducer = _ChunkReducer()
    make = lambda: _SizedAccumulator(ns, chunk_samples, reducer=reducer)  # noqa: E731
    keeping = lambda: _SizedAccumulator(ns, chunk_samples, keep_estimates=True, reducer=reducer)  # noqa: E731
    # BLAS held to one thread from this thread for the whole pass: the reducer's thread then never
    # sets it (threadpoolctl lets only one thread set OpenBLAS's count, and the first to try keeps it).
    with single_threaded_blas(), contextlib.closing(reducer):
        try:
            with _closing(open_batches()) as batches:
                accumulators = _grouped(batches, make if accumulators is None else keeping, accumulators)
            grouped = True
        except _NotGrouped as err:
            if accumulators is not None:
                accumulators.clear()
            if on_ungrouped is not None:
                on_ungrouped(err.args[0])
            with _closing(open_batches()) as batches:
                accumulators = _buffered(batches, make)
            grouped = False
        out = _curves_of(accumulators)  # every chunk reduced and merged before the reducer stops
    info: dict[str, Any] = {
        "grouped": grouped,
        "prompts": {key: acc.n_prompts for key, acc in accumulators.items()},
        "samples": {key: acc.n_samples for key, acc in accumulators.items()},
        "min_samples": {key: acc.min_samples for key, acc in accumulators.items()},
    }
    examples = {key: acc.example for key, acc in accumulators.items()}
    info["warnings"] = curve_warnings(out, info["prompts"], info["min_samples"], examples)
    for message in info["warnings"]:
        logger.warning("bon_tracker: %s", message)
    return out, info


def _curves_of(accumulators: dict[tuple[Any, int], CurveAccumulator]) -> RunSteps:
    """Each (run, step)'s curve: runs in order of first appearance, steps ascending."""
    out: RunSteps = {}
    first_seen = list(dict.fromkeys(run for run, _ in accumulators))
    for run in first_seen:
        steps = sorted(step for r, step in accumulators if r == run)
        out[run] = {}
        for step in steps:
            try:
                out[run][step] = accumulators[(run, step)].curve()
            except ValueError as err:
                where = f"step {step}" + ("" if run is None else f" of run {run!r}")
                raise ScoreFileError(f"{where}: {err}") from None
    return out


def _where(step: int, run: Any, more: int) -> str:
    where = f"step {step}" + ("" if run is None else f" of run {run!r}")
    return where + (f" (and {more} more step{'s' if more != 1 else ''})" if more else "")


def curve_warnings(
    curves: RunSteps,
    prompts: dict[tuple[Any, int], int],
    min_samples: dict[tuple[Any, int], int | None] | None = None,
    examples: dict[tuple[Any, int], Any] | None = None,
) -> list[str]:
    """What the curves rest on when it is less than they seem to show, one message per run and kind.

    * every prompt has one sample (N = 1): best-of-n has no curve beyond n = 1;
    * all samples are one prompt: nothing to average, no standard errors;
    * prompts have different numbers of samples, so the curve's largest n averages only
      the prompts that have that many (``n_prompts`` at each n), not all of them.

    Args:
        curves: ``{run: {step: BonCurve}}`` as :func:`curves_from_batches` returns.
        prompts: the number of prompts per (run, step).
        min_samples: the fewest samples of a prompt per (run, step), shown in the messages.
        examples: a prompt id per (run, step), shown in the messages.
    """
    min_samples, examples = min_samples or {}, examples or {}
    messages: list[str] = []
    for run, steps in curves.items():
        total = {s: int(prompts.get((run, s), int(c.n_prompts.max()))) for s, c in steps.items()}
        single = [s for s, c in steps.items() if c.N == 1]
        one_prompt = [s for s, c in steps.items() if c.N > 1 and total[s] == 1]
        ragged = [s for s, c in steps.items() if c.N > 1 and total[s] > 1 and int(c.n_prompts[-1]) < total[s]]
        if single:
            step = single[0]
            example = examples.get((run, step))
            shown = f", e.g. {example!r}" if example is not None else ""
            messages.append(
                f"{_where(step, run, len(single) - 1)}: every prompt has one sample (N = 1; {total[step]:,} "
                f"prompts{shown}), so there is no best-of-n curve beyond n = 1. Best-of-n needs several samples "
                "of each prompt, their rows sharing its prompt id: is the prompt id column the right one?"
            )
        if one_prompt:
            step = one_prompt[0]
            example = examples.get((run, step))
            shown = f" ({example!r})" if example is not None else ""
            messages.append(
                f"{_where(step, run, len(one_prompt) - 1)}: all {steps[step].N:,} samples are one prompt{shown}: "
                "the curve averages over nothing and has no standard errors. If the data holds several prompts, "
                "name the column that tells them apart"
            )
        if ragged:
            step = ragged[0]
            c, P = steps[step], total[step]
            low = min_samples.get((run, step))
            sizes = f"{low} to {c.N}" if low is not None else f"up to {c.N}"
            full = [int(n) for n, k in zip(c.n.tolist(), c.n_prompts.tolist()) if int(k) == P]
            every = f"; n ≤ {full[-1]} averages all {P:,}" if full else ""
            limit = f"; for a curve on every prompt, limit the grid to n ≤ {low} (ns, --ns)" if low and low > 1 else ""
            messages.append(
                f"{_where(step, run, len(ragged) - 1)}: prompts have {sizes} samples, so best-of-{int(c.n[-1])} "
                f"averages only the {int(c.n_prompts[-1]):,} of {P:,} prompts with that many{every}. Points at "
                f"larger n rest on fewer, different prompts (n_prompts in the curve table){limit}"
            )
    return messages
