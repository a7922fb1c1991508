"""Best-of-n curves of score tables too large to hold in memory.

Two pieces:

* :class:`CurveAccumulator` builds one eval step's :class:`~bon_tracker.BonCurve`
  from prompts fed a few at a time. Per-prompt estimates are independent, so the
  curve's means and standard errors merge exactly from per-chunk sufficient
  statistics (count, mean, sum of squared deviations; Chan et al. 1979); the result
  equals :func:`~bon_tracker.bon_curve` on all prompts at once up to float rounding.
* :func:`curves_from_batches` groups a stream of rows (:class:`ScoreBatch`) into
  prompts per (run, step) and feeds the accumulators.

Memory bound of :func:`curves_from_batches` (besides the reader's batch, and for
Parquet one row group, which the file's writer sized):

* **grouped input** (the rows of each prompt at each step are contiguous: sorted
  by step and prompt, or written prompt by prompt), the usual case: the rows of one
  prompt plus one chunk of ``chunk_samples`` samples (default 2^18, 4 MiB of
  floats) and the working memory of :func:`~bon_tracker.bon_curve` on it, plus one
  hash per (run, step, prompt) seen (~70 bytes each) to notice input that is not
  grouped after all. Only that hash grows with the input (per prompt, not per
  row): 4 and 8 million rows of 64 samples per prompt both peak ~33 MiB above a
  2,000-row file.
* **ungrouped input** (a prompt's rows scattered): every row is kept until the end
  as float64 proxy + float64 true + an int32 prompt code, 20 bytes per row (up to
  1.5x while the buffers grow), plus one Python key per distinct prompt and 8 bytes
  per row of one (run, step) while that step is sorted: ~40 bytes per row at the
  peak (4 million shuffled rows: +141 MiB). The stream is read twice: the first pass
  stops at the first prompt that reappears after other prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from bon_tracker.analysis.score_files import ScoreBatch, ScoreFileError
from bon_tracker.core import BonCurve, bon_curve, default_ns, kl_bon

DEFAULT_CHUNK_SAMPLES = 1 << 18

RunSteps = dict[Any, dict[int, BonCurve]]  # run name (None without a run column) -> step -> curve


class CurveAccumulator:
    """One eval step's best-of-n curve, built from prompts added one at a time.

    Args:
        ns: the grid of n; default (None) as :func:`~bon_tracker.bon_curve`: powers
            of two up to the largest number of samples per prompt, plus that number.
        chunk_samples: completed prompts are buffered until they hold this many
            samples, then reduced to statistics per n (bounds memory).

    Example:
        >>> import numpy as np
        >>> from bon_tracker import bon_curve
        >>> rng = np.random.default_rng(0)
        >>> proxy, true = rng.normal(size=(6, 8)), rng.normal(size=(6, 8))
        >>> acc = CurveAccumulator(chunk_samples=16)
        >>> for p, t in zip(proxy, true):
        ...     acc.add_prompt(p, t)
        >>> bool(np.allclose(acc.curve().true_se, bon_curve(proxy, true).true_se))
        True
    """

    def __init__(self, ns: Sequence[int] | None = None, *, chunk_samples: int = DEFAULT_CHUNK_SAMPLES):
        self.ns = None if ns is None else [int(n) for n in ns]
        if self.ns is not None and (not self.ns or min(self.ns) < 1):
            raise ValueError(f"ns must be a non-empty list of integers >= 1, got {ns!r}")
        self.chunk_samples = int(chunk_samples)
        self._pending_proxy: list[np.ndarray] = []
        self._pending_true: list[np.ndarray] = []
        self._pending_samples = 0
        # per n: [count, true mean, true M2, proxy mean, proxy M2, kl sum]
        self._stats: dict[int, list[float]] = {}
        self.N = 0  # largest number of samples per prompt seen
        self.n_prompts = 0
        self.n_samples = 0
        self.has_ties = False

    def add_prompt(self, proxy: np.ndarray, true: np.ndarray) -> None:
        """Add one prompt's samples (1-D float arrays of equal length, finite)."""
        if len(proxy) == 0:
            return
        self._pending_proxy.append(proxy)
        self._pending_true.append(true)
        self._pending_samples += len(proxy)
        self.N = max(self.N, len(proxy))
        self.n_prompts += 1
        self.n_samples += len(proxy)
        if self._pending_samples >= self.chunk_samples:
            self._flush()

    def curve(self) -> BonCurve:
        """The curve over every prompt added so far."""
        self._flush()
        if self.n_prompts == 0:
            raise ValueError("no samples: every row was empty or dropped")
        if self.ns is None:
            n_arr = default_ns(self.N)
        else:
            too_big = sorted({n for n in self.ns if n > self.N})
            if too_big:
                raise ValueError(
                    f"ns {too_big} exceed the largest number of samples per prompt ({self.N}); "
                    "lower them or sample more completions"
                )
            n_arr = np.asarray(self.ns, dtype=np.int64)
        stats = np.array([self._stats[int(n)] for n in n_arr], dtype=np.float64).reshape(len(n_arr), 6)
        count = stats[:, 0]

        def se(m2: np.ndarray) -> np.ndarray:
            out = np.full(len(count), np.nan)
            enough = count >= 2
            out[enough] = np.sqrt(m2[enough] / (count[enough] - 1)) / np.sqrt(count[enough])
            return out

        bound = np.asarray(kl_bon(n_arr), dtype=np.float64)
        kl = stats[:, 5] / count if self.has_ties else bound.copy()
        return BonCurve(
            n=n_arr,
            kl=kl,
            kl_bound=bound,
            true_mean=stats[:, 1].copy(),
            true_se=se(stats[:, 2]),
            proxy_mean=stats[:, 3].copy(),
            proxy_se=se(stats[:, 4]),
            n_prompts=count.astype(np.int64),
            N=self.N,
            has_ties=self.has_ties,
        )

    def _flush(self) -> None:
        if not self._pending_proxy:
            return
        proxy, true = self._pending_proxy, self._pending_true
        self._pending_proxy, self._pending_true, self._pending_samples = [], [], 0
        largest = max(len(p) for p in proxy)
        if self.ns is None:
            grid = default_ns(largest)  # every n of the final grid that these prompts reach
        else:
            grid = np.array(sorted({n for n in self.ns if n <= largest}), dtype=np.int64)
            if grid.size == 0:
                return  # these prompts have fewer samples than every n of the grid
        if len({len(p) for p in proxy}) == 1:
            proxy, true = np.stack(proxy), np.stack(true)  # type: ignore[assignment]
        part = bon_curve(proxy, true, ns=grid)
        self.has_ties = self.has_ties or part.has_ties
        for i, n in enumerate(part.n.tolist()):
            count = int(part.n_prompts[i])
            if count == 0:
                continue
            m2_true = float(part.true_se[i]) ** 2 * count * (count - 1) if count >= 2 else 0.0
            m2_proxy = float(part.proxy_se[i]) ** 2 * count * (count - 1) if count >= 2 else 0.0
            merged = self._stats.setdefault(n, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            total = merged[0] + count
            for at, mean, m2 in ((1, float(part.true_mean[i]), m2_true), (3, float(part.proxy_mean[i]), m2_proxy)):
                delta = mean - merged[at]
                merged[at + 1] += m2 + delta * delta * merged[0] * count / total
                merged[at] += delta * count / total
            merged[5] += float(part.kl[i]) * count
            merged[0] = total


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


def _grouped(batches: Iterable[ScoreBatch], make: Callable[[], CurveAccumulator]) -> dict:
    accumulators: dict[tuple[Any, int], CurveAccumulator] = {}
    closed: set[int] = set()  # hashes of (run, step, prompt) keys already complete
    open_key: tuple[Any, int, Any] | None = None
    open_proxy: list[np.ndarray] = []
    open_true: list[np.ndarray] = []

    def close() -> None:
        if open_key is None:
            return
        closed.add(hash(open_key))
        accumulator = accumulators.get(open_key[:2])
        if accumulator is None:
            accumulator = accumulators[open_key[:2]] = make()
        proxy = open_proxy[0] if len(open_proxy) == 1 else np.concatenate(open_proxy)
        true = open_true[0] if len(open_true) == 1 else np.concatenate(open_true)
        accumulator.add_prompt(proxy, true)

    for batch in batches:
        if len(batch) == 0:
            continue
        starts, ends = _segments(batch)
        for start, end in zip(starts.tolist(), ends.tolist()):
            key = _key_at(batch, start)
            if key != open_key:
                close()
                if hash(key) in closed:
                    raise _NotGrouped(key)
                open_key, open_proxy, open_true = key, [], []
            open_proxy.append(batch.proxy[start:end])
            open_true.append(batch.true[start:end])
    close()
    return accumulators


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


def curves_from_batches(
    open_batches: Callable[[], Iterable[ScoreBatch]],
    *,
    ns: Sequence[int] | None = None,
    chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
    on_ungrouped: Callable[[tuple[Any, int, Any]], None] | None = None,
) -> tuple[RunSteps, dict[str, Any]]:
    """Best-of-n curves per run and step of a stream of score rows.

    Args:
        open_batches: returns a fresh iterator over the rows (called a second time
            when the input turns out not to be grouped by prompt).
        ns: the grid of n for every step; default per step as :func:`~bon_tracker.bon_curve`.
        chunk_samples: see :class:`CurveAccumulator`.
        on_ungrouped: called with the first (run, step, prompt) key found out of
            place, before the second pass.

    Returns:
        ``({run: {step: BonCurve}}, info)`` with runs in order of first appearance and
        steps ascending; ``info`` holds ``grouped`` (bool), ``prompts`` and ``samples``
        per (run, step).
    """
    make = lambda: CurveAccumulator(ns, chunk_samples=chunk_samples)  # noqa: E731
    try:
        accumulators = _grouped(open_batches(), make)
        grouped = True
    except _NotGrouped as err:
        if on_ungrouped is not None:
            on_ungrouped(err.args[0])
        accumulators = _buffered(open_batches(), make)
        grouped = False
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
    info = {
        "grouped": grouped,
        "prompts": {key: acc.n_prompts for key, acc in accumulators.items()},
        "samples": {key: acc.n_samples for key, acc in accumulators.items()},
    }
    return out, info
