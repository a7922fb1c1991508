"""``bon-tracker analyze``: score files -> curves, Goodhart point, alerts, a run folder, a tracking run.

What each eval step gets is what ``BonTracker.log_scores`` computes in training: the curve, the
Goodhart point's interval (resampling prompts), the predictions beyond the measured n, the tail
agreement (dense input) and the alerts (the tracker's :class:`AlertReporter`, over the steps of
each run in order; ``alerts: off`` or ``BON_TRACKER_ALERTS=off`` turns them off). The curves come
from one streaming pass (:func:`~bon_tracker.analysis.grouping.curves_from_batches`), and so, for
grouped input (each prompt's rows together), does everything else: the sort that gives a step's
curve also gives each prompt's estimates on the step's grid, in the order of the input, for the
interval and the predictions (2 x 8 bytes per prompt and n of the grid), and the step's rows are
kept until the input moves on to another step (:class:`_OnePass`, at most
:data:`STEP_BUFFER_BYTES` a step: 16 bytes a sample, with texts or more score columns those too),
when the agreement's prompts (at most 2,048 per step), the hack table and the selection
statistics are taken from them and the rows freed. A step past that budget, one whose rows come
back after another step's, one whose chunks of prompts were reduced on grids other than the
step's (ragged prompts), and every step of ungrouped input get the same numbers from a second
pass over the files instead (today's statistics pass, for those steps only); the results do not
depend on which path a step takes. A step's interval and predictions start once its last prompt
is in, on worker threads (``BON_TRACKER_THREADS``) while the pass reads on, and steps with as
many prompts share their bootstrap draws (one seed: the same draws, the same numbers as drawing
again); with more than one thread a reader thread decodes a couple of batches ahead. Nothing
depends on the thread count.
With text columns (``--prompt-text-col``/``--completion-col``, or verl's ``input``/``output``), the
same pass builds each step's hack table (:class:`~bon_tracker.texts.HackAccumulator`: the
``k`` worst prompts' texts cut, feature sums; never the texts of every prompt).
With several proxy columns (an ensemble, ``--proxy-col rm_a --proxy-col rm_b``) or true columns,
or ``--selection``, each step also gets the selection statistics the tracker computes
(:func:`~bon_tracker.core.selection_stats.compute_selection_statistics` on
:func:`~bon_tracker.core.selection.selection_input`, docs/selection.md), and with several proxy
columns its curve is ``--selection-rule``'s (default ``mean``), as ``log_scores`` returns it. For
them a step's scores, ``(K + T) x 8`` bytes per sample (K proxy and T true columns), are buffered
from its first prompt to its last, then computed on and freed: one step at a time (in the second
pass, with steps interleaved, every open step's).

Run folders: ``<root>/<run name>``. When that folder exists (an earlier run of the same name),
the run goes to the first free ``<run name>-2``, ``-3``, ... and one line says so and names
``--overwrite``; with ``--overwrite`` the earlier folder is replaced instead, if
``bon-tracker analyze`` wrote it (it holds ``analyze.json``) and no process is writing it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import queue
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.analysis.score_files import (
    FORMATS,
    Columns,
    ScoreBatch,
    ScoreFileError,
    default_batch_rows,
    detect_format,
    read_score_batches,
)
from bon_tracker.backends import BACKENDS
from bon_tracker.cli.common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    EXIT_PENDING,
    UsageError,
    _add_config,
    _add_labels,
    _config,
    _file_stem,
    _Formatter,
    _parse_ns,
    _Progress,
    _safe_name,
    expand_file_patterns,
    logger,
    plural,
)
from bon_tracker.core import BonCurve, TopAgreement, bon_curve, topq_agreement
from bon_tracker.core.selection import DEFAULT_UWO_LAMBDA, aggregate_members, check_rules, rule_scores, selection_input
from bon_tracker.core.selection_stats import SelectionStatistics, compute_selection_statistics
from bon_tracker.core.threads import single_threaded_blas, thread_count
from bon_tracker.core.uncertainty import BootstrapDraws
from bon_tracker.files import atomic_write_text
from bon_tracker.optional import MissingDependencyError
from bon_tracker.record import EvalRecord
from bon_tracker.reports.compare import write_run_report
from bon_tracker.texts import MAX_FEATURE_SAMPLES, HackAccumulator, HackStatistics, Texts
from bon_tracker.tracking.alerting import (
    MAX_AGREEMENT_PROMPTS,
    AlertReporter,
    EvalStatistics,
    agreement_rows,
    alert_rules,
    interval_and_predictions,
)
from bon_tracker.tracking.config import TrackerConfig
from bon_tracker.tracking.selection import alerts_by_true
from bon_tracker.version import __version__

ANALYZE_FILE = "analyze.json"  # in a run folder analyze wrote: what --overwrite may replace
STATISTICS_CHUNK = 1 << 18  # samples of prompts whose estimates are computed at once

# ---- reading ------------------------------------------------------------------------------------------------


READ_AHEAD = 2  # batches a reader thread decodes ahead of the computation (with more than one thread)


def _open_batches(
    files: Sequence[Path],
    columns: Columns,
    fmt: str | None,
    nan_policy: str,
    batch_rows: int | None,
    progress: _Progress,
    counts: dict[str, int],
    reader: Callable[..., Iterator[ScoreBatch]] = read_score_batches,
) -> Iterator[ScoreBatch]:
    """The batches of every file in order (``batch_rows`` rows each, None: each file's
    :func:`~bon_tracker.analysis.score_files.default_batch_rows`). With more than one thread
    (``BON_TRACKER_THREADS``) a reader thread decodes up to :data:`READ_AHEAD` batches ahead, while
    this thread computes on the last: the same batches in the same order, and the same errors where
    they occur."""

    def read() -> Iterator[tuple[ScoreBatch | None, int]]:
        for path in files:
            pending = [0]
            batches = reader(
                path,
                columns,
                fmt=fmt,
                nan_policy=nan_policy,
                batch_rows=default_batch_rows(path, columns, fmt=fmt) if batch_rows is None else batch_rows,
                progress=lambda nbytes, pending=pending: pending.__setitem__(0, nbytes),
            )
            try:
                for batch in batches:
                    yield batch, pending[0]
                    pending[0] = 0
            finally:
                close = getattr(batches, "close", None)
                if close is not None:
                    close()
            yield None, pending[0]  # the bytes read after the file's last batch

    counts["rows"] = counts["omitted"] = 0
    items = read() if thread_count() <= 1 else _read_ahead(read, READ_AHEAD)
    try:
        for batch, nbytes in items:
            if batch is None:
                progress.update(nbytes)
                continue
            counts["rows"] += len(batch)
            counts["omitted"] += batch.omitted
            progress.update(nbytes, len(batch))
            yield batch
    finally:
        items.close()


def _read_ahead(produce: Callable[[], Iterator[Any]], depth: int) -> Iterator[Any]:
    """The items of ``produce()``, made on a thread at most ``depth`` ahead of the consumer (pyarrow
    decodes and numpy converts without the GIL). An error there is raised here, after the items
    before it; closing this generator stops the thread and closes ``produce()``'s iterator."""
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            items = produce()
            try:
                for item in items:
                    if stop.is_set():
                        break
                    ready.put((True, item))
            finally:
                items.close()  # type: ignore[attr-defined]
        except BaseException as err:  # raised in the consumer's thread, in order
            ready.put((False, err))
            return
        ready.put((False, None))

    thread = threading.Thread(target=run, name="bon_tracker_reader", daemon=True)
    thread.start()
    try:
        while True:
            more, item = ready.get()
            if more:
                yield item
            elif item is not None:
                raise item
            else:
                return
    finally:
        stop.set()
        while thread.is_alive():  # let a put() waiting on a full queue through, so the thread ends
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=0.01)
        thread.join()


# ---- several proxies and true rewards (docs/selection.md) -----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Selection:
    """The score columns of the selection statistics and the deployed rule (``--selection-rule``)."""

    members: tuple[str, ...]
    trues: tuple[str, ...]
    rule: str
    uwo_lambda: float = DEFAULT_UWO_LAMBDA

    @property
    def ensemble(self) -> bool:
        return len(self.members) > 1

    def deployed(self, members: np.ndarray) -> np.ndarray:
        """The deployed rule's score of each sample, from the members' ``(K, rows)`` scores.

        For ``mean`` and ``uwo`` this snaps ties on one batch's grid (core.selection.snap_ties);
        the curve the records get is recomputed per step on the step's grid, as the tracker does."""
        if self.rule in self.members:
            return members[self.members.index(self.rule)]
        return aggregate_members(members, self.rule, self.uwo_lambda)


def _selection_of(args: argparse.Namespace, columns: Columns) -> _Selection | None:
    """The selection settings the command line asks for (None: one proxy, one true reward, no --selection)."""
    members, trues = columns.proxy_names, columns.true_names
    if len(members) == 1 and len(trues) == 1 and not args.selection:
        return None
    repeated = sorted({c for c in (*members, *trues) if (*members, *trues).count(c) > 1})
    if repeated:
        raise UsageError(f"score column(s) {repeated} named more than once in --proxy-col/--true-col")
    try:
        check_rules([args.selection_rule] if len(members) > 1 else None, members)
    except ValueError as err:
        raise UsageError(f"--selection-rule: {err}") from None
    return _Selection(members, trues, args.selection_rule if len(members) > 1 else members[0])


def _with_selection_scores(
    batches: Iterator[ScoreBatch], columns: Columns, selection: _Selection
) -> Iterator[ScoreBatch]:
    """The batches with ``proxy`` the deployed rule's score and ``extra`` every score column,
    ``(K + T, rows)``: the members, then the true rewards (the statistics pass reads them there)."""
    try:
        for batch in batches:
            members, trues = batch.members(columns), batch.trues(columns)
            if len(members) != len(selection.members) or len(trues) != len(selection.trues):
                raise ScoreFileError(
                    f"the reader gave {len(members)} proxy and {len(trues)} true columns, not the "
                    f"{len(selection.members)} and {len(selection.trues)} named"
                )
            yield dataclasses.replace(batch, proxy=selection.deployed(members), extra=np.concatenate([members, trues]))
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


# ---- the statistics beside the curve (what log_scores computes) ------------------------------------------


class _StepEstimates:
    """One (run, step): each prompt's estimates on the step's grid, in the order prompts come,
    and the scores of the prompts the tail agreement averages (every prompt, or the tracker's
    evenly spaced subset of ``MAX_AGREEMENT_PROMPTS`` when the step has more)."""

    def __init__(
        self,
        grid: np.ndarray,
        n_prompts: int,
        samples: int = 0,
        texts: bool = False,
        selection: _Selection | None = None,
        estimates: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        self.grid = np.asarray(grid, dtype=np.int64)
        self.n_prompts = n_prompts
        # Every prompt's (true, proxy) estimates already computed (by the curves' own sort, one pass):
        # the prompts added then give the agreement, texts and selection statistics only.
        self.given = estimates is not None
        assert not (self.given and selection is not None and selection.ensemble), "the deployed rule's estimates"
        self.seen = 0  # prompts given to add() so far
        # The selection statistics: this step's (K + T, k, N) score blocks until its last prompt.
        self.selection = selection
        self.score_parts: list[np.ndarray] = []
        self.deployed_curve: BonCurve | None = None  # the deployed rule's curve (several proxies)
        self.selection_stats: SelectionStatistics | None = None
        # The hack table (with texts); text features on evenly spaced prompts past MAX_FEATURE_SAMPLES.
        self.hack = HackAccumulator() if texts else None
        self.feature_prompts: np.ndarray | None = None
        if texts and samples > MAX_FEATURE_SAMPLES:
            m = max(1, int(n_prompts * MAX_FEATURE_SAMPLES / samples))
            self.feature_prompts = np.unique(np.linspace(0, n_prompts - 1, m).round().astype(np.int64))
        self.true_parts: list[np.ndarray] = [] if estimates is None else [estimates[0]]
        self.proxy_parts: list[np.ndarray] = [] if estimates is None else [estimates[1]]
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_samples = 0
        self.count = 0
        self.lengths: set[int] = set()
        self.picks = None
        if n_prompts > MAX_AGREEMENT_PROMPTS:  # the rows eval_statistics takes
            self.picks = agreement_rows(n_prompts)
        self.agree_proxy: list[np.ndarray] = []
        self.agree_true: list[np.ndarray] = []
        # Called once with this step when its last prompt's estimates are in (all n_prompts of them):
        # its interval and predictions can start while the pass reads on.
        self.on_complete: Callable[[_StepEstimates], None] | None = None
        self._result: tuple[np.ndarray, np.ndarray, _AgreementScores | None] | None = None

    def add(
        self,
        proxy: np.ndarray,
        true: np.ndarray,
        texts: tuple[np.ndarray, np.ndarray] | None = None,
        scores: np.ndarray | None = None,
    ) -> None:
        """Prompts with equal numbers of samples: ``(k, N)`` arrays, in input order; ``texts``: their
        ``(prompt texts (k,), completions (k, N))``; ``scores``: with the selection statistics, every
        score column's ``(K + T, k, N)``."""
        k, N = proxy.shape
        if k == 0 or N == 0:
            return
        if self.hack is not None:
            self._add_texts(proxy, true, texts)
        self.seen += k
        if self.selection is not None:
            assert scores is not None, "the selection statistics need every score column"
            self.score_parts.append(np.array(scores))  # a copy: the batch it views is freed
            if self.selection.ensemble:  # the estimates wait for the deployed rule's scores on the step's grid
                if self.seen >= self.n_prompts:
                    self._select()
                return
            if self.seen >= self.n_prompts:
                self._select()
        self._add_scores(proxy, true)

    def _select(self) -> None:
        """The step's selection statistics (and with several proxies its deployed curve and the
        estimates on it), as the tracker computes them; then the step's scores are freed."""
        assert self.selection is not None
        parts, self.score_parts = self.score_parts, []
        if not parts:
            return
        sel, K = self.selection, len(self.selection.members)
        if len({part.shape[2] for part in parts}) == 1:
            stacked = np.concatenate(parts, axis=1)
            members: dict[str, Any] = {name: stacked[i] for i, name in enumerate(sel.members)}
            trues: dict[str, Any] = {name: stacked[K + j] for j, name in enumerate(sel.trues)}
        else:  # prompts with different numbers of samples: one row per prompt
            rows = [prompt for part in parts for prompt in np.moveaxis(part, 1, 0)]
            members = {name: [row[i] for row in rows] for i, name in enumerate(sel.members)}
            trues = {name: [row[K + j] for row in rows] for j, name in enumerate(sel.trues)}
        del parts
        inp = selection_input(members, trues)
        del members, trues
        if sel.ensemble:
            proxy = rule_scores(inp, sel.rule, sel.uwo_lambda)
            true = inp.trues[0] if inp.dense else [row[0] for row in inp.trues]
            self.deployed_curve = bon_curve(proxy, true, ns=self.grid)
            if inp.dense:
                self._add_scores(proxy, true)
            else:
                for p, t in zip(proxy, true):
                    self._add_scores(p[None, :], t[None, :])
        try:
            self.selection_stats = compute_selection_statistics(inp, uwo_lambda=sel.uwo_lambda)
        except Exception as err:  # as in the tracker: the curve is reported without them
            logger.warning("bon_tracker: the selection statistics failed (%s: %s); left out", type(err).__name__, err)

    def _add_scores(self, proxy: np.ndarray, true: np.ndarray) -> None:
        """The estimates and agreement scores of ``(k, N)`` prompts (the deployed rule's proxy)."""
        k, N = proxy.shape
        self.lengths.add(N)
        if self.picks is None:
            rows: Any = slice(None)
        else:
            lo, hi = np.searchsorted(self.picks, [self.count, self.count + k])
            rows = self.picks[lo:hi] - self.count
        if len(self.lengths) == 1:  # agreement needs one N: kept only while every prompt has it
            # Copies (the batch these view is freed): an index array's rows are one already.
            keep = (lambda a: a[rows]) if isinstance(rows, np.ndarray) else np.array
            self.agree_proxy.append(keep(proxy))
            self.agree_true.append(keep(true))
        else:
            self.agree_proxy, self.agree_true = [], []
        self.count += k
        if not self.given:
            self.pending.append((proxy, true))
            self.pending_samples += proxy.size
            if self.pending_samples >= STATISTICS_CHUNK:
                self._flush()
        if self.on_complete is not None and self.count >= self.n_prompts:
            on_complete, self.on_complete = self.on_complete, None
            on_complete(self)

    def _add_texts(self, proxy: np.ndarray, true: np.ndarray, texts: tuple[np.ndarray, np.ndarray] | None) -> None:
        assert self.hack is not None
        if texts is None:  # a reader that gave no texts for these rows: no hack table for this step
            self.hack = None
            return
        rows = None
        if self.feature_prompts is not None:
            lo, hi = np.searchsorted(self.feature_prompts, [self.seen, self.seen + len(proxy)])
            rows = (self.feature_prompts[lo:hi] - self.seen).tolist()
        prompt_texts, completions = texts
        block = Texts(tuple(prompt_texts.tolist()), tuple(tuple(row) for row in completions.tolist()))
        try:
            self.hack.add(proxy, true, block, feature_rows=rows)
        except Exception as err:  # as in the tracker: the curve is reported without it
            logger.warning("bon_tracker: the hack table failed (%s: %s); left out", type(err).__name__, err)
            self.hack = None

    def hack_statistics(self) -> HackStatistics | None:
        """This step's hack table and text features (None without texts)."""
        return None if self.hack is None else self.hack.result()

    def _flush(self) -> None:
        from bon_tracker.analysis.ray_engine import prompt_estimates

        if not self.pending:
            return
        pending, self.pending, self.pending_samples = self.pending, [], 0
        if len({p.shape[1] for p, _ in pending}) == 1:
            proxy: Any = np.concatenate([p for p, _ in pending])
            true: Any = np.concatenate([t for _, t in pending])
        else:
            proxy = [row for p, _ in pending for row in p]
            true = [row for _, t in pending for row in t]
        true_pp, proxy_pp = prompt_estimates(proxy, true, self.grid)
        self.true_parts.append(true_pp)
        self.proxy_parts.append(proxy_pp)

    def result(self) -> tuple[np.ndarray, np.ndarray, _AgreementScores | None]:
        """Each prompt's estimates ``(P, G)`` of the true and the proxy score, and the scores of the
        agreement's prompts (once: the arrays given to the step's statistics, then freed here)."""
        if self._result is not None:
            return self._result
        if self.score_parts:  # fewer prompts than the curves' pass counted (never expected)
            self._select()
        self._flush()
        G = len(self.grid)
        true_pp, proxy_pp = _joined_rows(self.true_parts, G), _joined_rows(self.proxy_parts, G)
        agreement = None
        if len(self.lengths) == 1 and self.agree_proxy:
            agreement = _AgreementScores(self.agree_proxy, self.agree_true)
        self.true_parts, self.proxy_parts, self.agree_proxy, self.agree_true = [], [], [], []
        self._result = (true_pp, proxy_pp, agreement)
        return self._result


@dataclasses.dataclass(frozen=True)
class _AgreementScores:
    """The scores of a step's agreement prompts, in parts in input order: their tail agreement is a
    job of its own (:class:`_Statistics`), off the pass's thread and beside the step's interval."""

    proxy: list[np.ndarray]
    true: list[np.ndarray]

    def agreement(self) -> TopAgreement | None:
        try:
            return topq_agreement(np.concatenate(self.proxy), np.concatenate(self.true))
        except ValueError:  # fewer than 4 samples per prompt
            return None


def _joined_rows(parts: list[np.ndarray], width: int) -> np.ndarray:
    """The parts' rows as one array (one part as it is: the step's own, not copied again)."""
    if len(parts) == 1:
        return parts[0]
    return np.concatenate(parts) if parts else np.empty((0, width))


def _segments(batch: ScoreBatch) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each run of rows with the same (run, step, prompt)."""
    change = batch.prompt[1:] != batch.prompt[:-1]
    if batch.step is not None:
        change |= batch.step[1:] != batch.step[:-1]
    if batch.run is not None:
        change |= batch.run[1:] != batch.run[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    return starts, np.append(starts[1:], len(batch))


def _key(batch: ScoreBatch, i: int) -> tuple[Any, int, Any]:
    prompt = batch.prompt[i]
    return (
        None if batch.run is None else batch.run[i],
        0 if batch.step is None else int(batch.step[i]),
        prompt.item() if isinstance(prompt, np.generic) else prompt,
    )


def _block_texts(batch: ScoreBatch, rows: slice, k: int, N: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The texts of ``k`` prompts of ``N`` samples each at ``rows``: each prompt's text (its first
    sample's) and the ``(k, N)`` completions; None when the batch has no texts."""
    if batch.prompt_text is None or batch.completion is None:
        return None
    return batch.prompt_text[rows][::N], batch.completion[rows].reshape(k, N)


def _block_scores(batch: ScoreBatch, rows: slice, k: int, N: int) -> np.ndarray | None:
    """Every score column of ``k`` prompts of ``N`` samples at ``rows``, ``(K + T, k, N)`` (None
    without the selection statistics)."""
    return None if batch.extra is None else batch.extra[:, rows].reshape(-1, k, N)


class _GroupedFeeder:
    """Input whose prompts are contiguous, a batch at a time: prompts complete in a batch go in
    blocks of equal length to ``target((run, step))``'s ``add`` (None: a step not wanted); a prompt
    cut by a batch's end is joined with the next batch's first rows."""

    def __init__(self, target: Callable[[tuple[Any, int]], Any]):
        self.target = target
        self.open_key: tuple[Any, int, Any] | None = None
        self.open_proxy: list[np.ndarray] = []
        self.open_true: list[np.ndarray] = []
        self.open_texts: list[tuple[np.ndarray, np.ndarray] | None] = []  # (prompt texts, completions) per piece
        self.open_scores: list[np.ndarray] = []  # every score column per piece (the selection statistics)

    def _close(self) -> None:
        if self.open_key is None:
            return
        sink = self.target((self.open_key[0], self.open_key[1]))
        if sink is None:
            return
        open_texts, open_scores = self.open_texts, self.open_scores
        proxy = np.concatenate(self.open_proxy)
        texts = None
        if open_texts and all(t is not None for t in open_texts):
            completions = np.concatenate([t[1].reshape(-1) for t in open_texts])  # type: ignore[index]
            texts = (open_texts[0][0][:1], completions[None, :])  # type: ignore[index]
        scores = np.concatenate(open_scores, axis=1)[:, None, :] if open_scores else None
        sink.add(proxy[None, :], np.concatenate(self.open_true)[None, :], texts, scores)

    def feed(self, batch: ScoreBatch) -> None:
        if len(batch) == 0:
            return
        starts, ends = _segments(batch)
        first = 0
        if _key(batch, 0) == self.open_key:  # the open prompt goes on in this batch
            self.open_proxy.append(batch.proxy[: ends[0]])
            self.open_true.append(batch.true[: ends[0]])
            self.open_texts.append(_block_texts(batch, slice(0, ends[0]), 1, int(ends[0])))
            if batch.extra is not None:
                self.open_scores.append(batch.extra[:, : ends[0]])
            if len(starts) == 1:
                return
            first = 1
        self._close()
        complete = slice(first, len(starts) - 1)
        at, lengths = starts[complete], ends[complete] - starts[complete]
        if len(at):
            step_of = np.zeros(len(at), dtype=np.int64) if batch.step is None else batch.step[at]
            cut = (lengths[1:] != lengths[:-1]) | (step_of[1:] != step_of[:-1])
            if batch.run is not None:
                cut |= batch.run[at][1:] != batch.run[at][:-1]
            pieces = np.concatenate(([0], np.flatnonzero(cut) + 1, [len(at)]))
            for a, b in zip(pieces[:-1].tolist(), pieces[1:].tolist()):
                sink = self.target((None if batch.run is None else batch.run[at[a]], int(step_of[a])))
                if sink is None:
                    continue
                N, lo = int(lengths[a]), int(at[a])
                rows = slice(lo, lo + (b - a) * N)
                sink.add(
                    batch.proxy[rows].reshape(b - a, N),
                    batch.true[rows].reshape(b - a, N),
                    _block_texts(batch, rows, b - a, N),
                    _block_scores(batch, rows, b - a, N),
                )
        last = int(starts[-1])
        self.open_key = _key(batch, last)
        self.open_proxy, self.open_true = [batch.proxy[last:]], [batch.true[last:]]
        self.open_texts = [_block_texts(batch, slice(last, None), 1, len(batch) - last)]
        self.open_scores = [] if batch.extra is None else [batch.extra[:, last:]]

    def finish(self) -> None:
        """The last prompt goes in."""
        self._close()
        self.open_key = None


def _feed_grouped(batches: Iterable[ScoreBatch], steps: dict[tuple[Any, int], _StepEstimates]) -> None:
    """Input whose prompts are contiguous, to the steps of ``steps`` (:class:`_GroupedFeeder`)."""
    feeder = _GroupedFeeder(steps.get)
    for batch in batches:
        feeder.feed(batch)
    feeder.finish()


def _feed_buffered(batches: Iterable[ScoreBatch], steps: dict[tuple[Any, int], _StepEstimates]) -> None:
    """Input whose prompts are scattered: every row of a step is kept, then its prompts go in
    the order they first appear (as the curves' own pass buffers them: about 20 bytes per row; with
    texts, every row's texts are kept too; with the selection statistics, every score column's)."""
    rows: dict[tuple[Any, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    texts: dict[tuple[Any, int], list[tuple[np.ndarray, np.ndarray] | None]] = {}
    scores: dict[tuple[Any, int], list[np.ndarray]] = {}
    for batch in batches:
        if len(batch) == 0:
            continue
        runs = batch.run if batch.run is not None else np.zeros(len(batch), dtype=np.int8)
        step_of = batch.step if batch.step is not None else np.zeros(len(batch), dtype=np.int64)
        run_values, run_index = np.unique(runs, return_inverse=True)
        step_values, step_index = np.unique(step_of, return_inverse=True)
        group = run_index.ravel() * len(step_values) + step_index.ravel()
        for g in np.unique(group).tolist():
            where = np.flatnonzero(group == g)
            key = (
                None if batch.run is None else run_values[g // len(step_values)],
                int(step_values[g % len(step_values)]),
            )
            if key in steps:
                rows.setdefault(key, []).append((batch.prompt[where], batch.proxy[where], batch.true[where]))
                if steps[key].hack is not None:
                    has = batch.prompt_text is not None and batch.completion is not None
                    piece = (batch.prompt_text[where], batch.completion[where]) if has else None  # type: ignore[index]
                    texts.setdefault(key, []).append(piece)
                if batch.extra is not None:
                    scores.setdefault(key, []).append(batch.extra[:, where])
    for key in list(rows):
        score_parts = scores.pop(key, None)
        step_scores = None if score_parts is None else np.concatenate(score_parts, axis=1)
        del score_parts
        pieces = texts.pop(key, [])
        step_texts = None
        if pieces and all(p is not None for p in pieces):
            step_texts = (np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))  # type: ignore[index]
        del pieces
        parts = rows.pop(key)
        prompt = np.concatenate([p for p, _, _ in parts])
        proxy = np.concatenate([p for _, p, _ in parts])
        true = np.concatenate([t for _, _, t in parts])
        del parts
        _, first, inverse = np.unique(prompt, return_index=True, return_inverse=True)
        rank = np.empty(len(first), dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(len(first))
        codes = rank[inverse.ravel()]
        order = np.argsort(codes, kind="stable")
        for prompt_rows in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
            block = None
            if step_texts is not None:
                block = (step_texts[0][prompt_rows[:1]], step_texts[1][prompt_rows][None, :])
            more = None if step_scores is None else step_scores[:, prompt_rows][:, None, :]
            steps[key].add(proxy[prompt_rows][None, :], true[prompt_rows][None, :], block, more)


def _guarded_statistics(
    curve: BonCurve,
    true_pp: np.ndarray,
    proxy_pp: np.ndarray,
    agreement: TopAgreement | None,
    draws: BootstrapDraws | None = None,
) -> EvalStatistics | Exception:
    """The step's interval, predictions and agreement, as the tracker's
    :func:`~bon_tracker.tracking.alerting.eval_statistics` computes them from the scores (``draws``:
    bootstrap draws shared with the analysis's other steps: the same numbers); or the error it
    raised (reported in step order by :class:`_Statistics`)."""
    try:
        interval, predictions = interval_and_predictions(curve, true_pp, proxy_pp, draws=draws)
        return EvalStatistics(interval, agreement, predictions)
    except Exception as err:  # as in the tracker: the curve is reported without them
        return err


class _Statistics:
    """Each step's interval and predictions, computed as soon as the step's estimates are in.

    Steps are independent: with more than one thread (``BON_TRACKER_THREADS``, as the core's)
    they run on worker threads -- numpy's draws, gathers, sums, bincounts and matrix products
    release the GIL -- while the statistics pass reads the next steps; each step's numbers are
    computed by the same calls whichever thread runs them, so they do not depend on the count.
    The bootstrap draws are shared by steps with the same number of prompts
    (:class:`~bon_tracker.core.uncertainty.BootstrapDraws`: the same seed gives the same draws).
    """

    def __init__(self, threads: int | None = None):
        workers = thread_count(threads)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bon_tracker_statistics") if workers > 1 else None
        # Per step: its interval and predictions, and its agreement when that is still to compute
        # (a job of its own: the last step's two run side by side while the command waits).
        self._jobs: dict[tuple[Any, int], tuple[Future, Future | None]] = {}
        self._draws = BootstrapDraws()

    def close(self) -> None:
        """Stop the worker threads (steps not started are cancelled) and free the shared draws."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._draws = BootstrapDraws()

    def submit(self, key: tuple[Any, int], curve: BonCurve, estimates: tuple) -> None:
        """Start the statistics of the step ``key`` from its ``(true_pp, proxy_pp, agreement)``
        (``agreement``: a :class:`TopAgreement`, None, or the :class:`_AgreementScores` to compute it from)."""
        true_pp, proxy_pp, agreement = estimates
        scores = agreement if isinstance(agreement, _AgreementScores) else None
        given = None if scores is not None else agreement
        if self._pool is not None:
            job = self._pool.submit(_guarded_statistics, curve, true_pp, proxy_pp, given, self._draws)
            self._jobs[key] = (job, None if scores is None else self._pool.submit(scores.agreement))
            return
        done: Future = Future()
        done.set_result(_guarded_statistics(curve, true_pp, proxy_pp, given, self._draws))
        agreed: Future | None = None
        if scores is not None:
            agreed = Future()
            agreed.set_result(scores.agreement())
        self._jobs[key] = (done, agreed)

    def __contains__(self, key: tuple[Any, int]) -> bool:
        return key in self._jobs

    def discard(self, key: tuple[Any, int]) -> None:
        """Forget the step's statistics (submitted again later; a computation under way is let finish)."""
        self._jobs.pop(key, None)

    def results(self, curves: dict[Any, dict[int, BonCurve]]) -> dict[tuple[Any, int], EvalStatistics]:
        """Every submitted step's statistics (waiting for them); a step whose computation failed
        is left out with a warning, in the order of the curves."""
        out = {}
        for run, steps in curves.items():
            for step in steps:
                jobs = self._jobs.get((run, step))
                if jobs is None:
                    continue
                job, agreed = jobs
                found = job.result()
                if agreed is not None and not isinstance(found, Exception):
                    found = dataclasses.replace(found, agreement=agreed.result())
                if isinstance(found, Exception):
                    where = f"step {step}" + ("" if run is None else f" of run {run!r}")
                    logger.warning(
                        "bon_tracker: the interval, agreement and alert statistics failed at %s (%s: %s); "
                        "the curve is reported without them",
                        where,
                        type(found).__name__,
                        found,
                    )
                    continue
                out[(run, step)] = found
        return out


# ---- one read of the file (grouped input) ----------------------------------------------------------------------

# Per eval step, what the one-pass path keeps of the rows until the step is done (its agreement
# prompts, texts and score columns are taken from it then): 256 MiB holds the proxy and true scores
# (16 bytes a sample) of a step of 16 million samples, far more than an eval step is (the benchmark's
# are 3.2 million: 50 MiB, peak RSS about 0.5 GiB against 0.43 reading twice), and bounds what one
# read adds to the command's memory to well under what the floor of loading the file takes (the
# benchmark's: 0.9 GiB). A step past it is read again instead (its statistics only).
STEP_BUFFER_BYTES = 256 << 20
_STR_BYTES = 49  # CPython's size of an empty str: what each text costs beside its characters


def _texts_bytes(texts: tuple[np.ndarray, np.ndarray] | None) -> int:
    """About what a block's texts take in memory (their characters, the str objects, the pointers)."""
    if texts is None:
        return 0
    total = 0
    for values in texts:
        items = values.ravel().tolist()
        total += values.nbytes + _STR_BYTES * len(items) + sum(len(v) for v in items if isinstance(v, str))
    return total


class _StepRecorder:
    """The blocks of one step's prompts the feeder gives (views of the batches, in order), up to
    ``budget`` bytes; past it, nothing (``over``: the step's statistics come from a second read)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.calls: list[tuple[np.ndarray, np.ndarray, Any, np.ndarray | None]] = []
        self.nbytes = 0
        self.over = False

    def add(
        self,
        proxy: np.ndarray,
        true: np.ndarray,
        texts: tuple[np.ndarray, np.ndarray] | None = None,
        scores: np.ndarray | None = None,
    ) -> None:
        if self.over:
            return
        self.nbytes += proxy.nbytes + true.nbytes + (0 if scores is None else scores.nbytes) + _texts_bytes(texts)
        if self.nbytes > self.budget:
            self.over, self.calls = True, []
            return
        self.calls.append((proxy, true, texts, scores))


class _NewSteps(dict):
    """The curves' accumulators per (run, step), calling ``on_new(key, accumulator)`` as each is made."""

    def __init__(self, on_new: Callable[[tuple[Any, int], Any], None]):
        super().__init__()
        self.on_new = on_new

    def __setitem__(self, key: tuple[Any, int], value: Any) -> None:
        super().__setitem__(key, value)
        self.on_new(key, value)


class _OnePass:
    """Each step's statistics from the curves' own read of grouped input.

    The scores of a step's prompts are kept until the step is done: without texts or further score
    columns, the blocks the curves' accumulator is given (``keep_blocks``, views of the batches);
    with them, the blocks a :class:`_GroupedFeeder` cuts from each batch after the curves took it
    (:meth:`tee`: the texts and score columns too), either way into a :class:`_StepRecorder`. When the input
    moves on to another step (or ends), the step is done: its curve and every prompt's estimates
    come from its accumulator (the curves' own sort, ``keep_estimates``), the kept blocks go to a
    :class:`_StepEstimates` (agreement, texts, selection statistics; with several proxies the
    deployed rule's estimates) and its statistics job is submitted, as the second read would. A
    step past :data:`STEP_BUFFER_BYTES`, one whose rows come back after another step's, or one
    whose prompts' grids differ (ragged prompts) is left to the second read (:meth:`end`); so is
    one whose curve is not the curves' pass's own (never expected)."""

    def __init__(self, jobs: _Statistics, texts: bool, selection: _Selection | None, budget: int):
        self.jobs, self.texts, self.selection, self.budget = jobs, texts, selection, budget
        self.feeding = texts or selection is not None  # blocks cut from the batches, with their other columns
        # Filled by curves_from_batches; without the feeder a new step's accumulator ends the last step.
        self.accumulators: dict[tuple[Any, int], Any] = {} if self.feeding else _NewSteps(self._started)
        self.current: tuple[Any, int] | None = None
        self.recorder: _StepRecorder | None = None
        self.done: dict[tuple[Any, int], tuple[BonCurve, _StepEstimates]] = {}
        self.again: set[tuple[Any, int]] = set()  # steps left to the second read
        self.active = True

    def batches(self, batches: Iterator[ScoreBatch]) -> Iterator[ScoreBatch]:
        """The curves' batches (:meth:`tee`'d with the feeder)."""
        return self.tee(batches) if self.feeding else batches

    def tee(self, batches: Iterator[ScoreBatch]) -> Iterator[ScoreBatch]:
        feeder = _GroupedFeeder(self._target)
        try:
            for batch in batches:
                yield batch
                if self.active:
                    feeder.feed(batch)
            if self.active:
                feeder.finish()
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()

    def abandon(self) -> None:
        """The input is not grouped: nothing of this pass is used."""
        self.active = False
        for key in self.done:
            self.jobs.discard(key)
        self.done, self.recorder, self.current = {}, None, None

    def _started(self, key: tuple[Any, int], accumulator: Any) -> None:
        if not self.active:
            return
        accumulator.keep_blocks(_StepRecorder(self.budget))
        if self.current is not None:
            self._finish()
        self.current = key

    def _target(self, key: tuple[Any, int]) -> _StepRecorder | None:
        if key in self.again:
            return None
        if key in self.done:  # the step's rows go on after another step's: a second read
            self._again(key)
            return None
        if key != self.current:
            if self.current is not None:
                self._finish()
            self.current, self.recorder = key, _StepRecorder(self.budget)
        return self.recorder

    def _again(self, key: tuple[Any, int]) -> None:
        self.done.pop(key, None)
        self.jobs.discard(key)
        self.again.add(key)

    def _finish(self) -> None:
        key, recorder = self.current, self.recorder
        self.current = self.recorder = None
        assert key is not None
        accumulator = self.accumulators.get(key)
        if accumulator is not None and recorder is None:
            recorder = accumulator.take_blocks()  # the blocks the curves were given
        calls = None if accumulator is None or recorder is None or recorder.over else recorder.calls
        if calls is None:
            self.again.add(key)
            return
        try:
            curve = accumulator.peek_curve()
        except ValueError:  # the curves' pass reports it
            self.again.add(key)
            return
        ensemble = self.selection is not None and self.selection.ensemble
        given = None if ensemble else accumulator.estimates_on(curve.n)
        if given is None and not ensemble:  # prompts on different grids: recomputed
            self.again.add(key)
            return
        estimated = _StepEstimates(
            curve.n, accumulator.n_prompts, accumulator.n_samples, self.texts, self.selection, given
        )
        estimated.on_complete = lambda done: self._submit(key, curve, done)
        recorder.calls = []
        for call in calls:
            estimated.add(*call)
        del calls
        if key not in self.jobs:  # fewer prompts than counted (never expected)
            self._submit(key, curve, estimated)
        self.done[key] = (curve, estimated)

    def _submit(self, key: tuple[Any, int], curve: BonCurve, estimated: _StepEstimates) -> None:
        deployed = estimated.deployed_curve  # several proxies: the deployed rule's curve
        self.jobs.submit(key, curve if deployed is None else deployed, estimated.result())

    def end(self, curves: dict[Any, dict[int, BonCurve]]) -> dict[tuple[Any, int], _StepEstimates]:
        """After the curves' pass: the steps done in it (the rest are in :attr:`again`)."""
        if self.current is not None:
            self._finish()
        for key, (curve, _) in list(self.done.items()):
            final = curves.get(key[0], {}).get(key[1])
            if final is None or getattr(self.accumulators.get(key), "reopened", False) or not _same_curve(curve, final):
                self._again(key)
        for run, steps in curves.items():
            self.again.update((run, step) for step in steps if (run, step) not in self.done)
        return {key: estimated for key, (_, estimated) in self.done.items()}


def _same_curve(a: BonCurve, b: BonCurve) -> bool:
    """The same curve: every field equal, NaN where NaN."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=x.dtype.kind == "f"):
                return False
        elif x != y:
            return False
    return True


# ---- run folders ---------------------------------------------------------------------------------------------


def _folder_name(name: str) -> str:
    return _safe_name(name).strip(".") or "run"


def _claim_folder(root: Path, name: str, overwrite: bool) -> tuple[str, Path | None, str | None]:
    """The folder under ``root`` this run is written to (made now, empty), the earlier run folder
    it replaces (moved aside; removed once the new one is written) and the note to print."""
    from bon_tracker.backends.base import ConfigurationError
    from bon_tracker.backends.local import LocalBackend

    root.mkdir(parents=True, exist_ok=True)
    base = _folder_name(name)
    target = root / base
    try:
        target.mkdir()
        return base, None, None
    except FileExistsError:
        pass
    if overwrite:
        if not (target / ANALYZE_FILE).is_file():
            raise UsageError(
                f"--overwrite replaces only a run folder that bon-tracker analyze wrote, and {target} is not one "
                f"(no {ANALYZE_FILE} in it): choose another --run-name or --out, or remove it yourself"
            )
        try:
            LocalBackend(root=root, run_id=base).check()  # a live process writing it: an error, never replaced
        except ConfigurationError as err:
            raise UsageError(f"cannot replace {target}: {err}") from None
        aside = root / f".{base}.replaced-{uuid.uuid4().hex[:8]}"
        target.rename(aside)
        target.mkdir()
        return base, aside, None
    k = 2
    while True:  # mkdir is atomic: of two runs of the same name at once, each gets its own folder
        candidate = f"{base}-{k}"
        try:
            (root / candidate).mkdir()
            break
        except FileExistsError:
            k += 1
    note = (
        f"{target} holds an earlier run, so this run is written to {root / candidate}; "
        "pass --overwrite to replace the earlier one instead"
    )
    return candidate, None, note


def _write_run_folder(
    root: Path,
    name: str,
    records: Sequence[EvalRecord],
    *,
    overwrite: bool,
    draw: bool,
    files: Sequence[Path],
    names: dict[str, str | None],
) -> tuple[Path, Path, bool]:
    """The run folder of one run, its report; and whether it replaced an earlier one."""
    from bon_tracker.backends.local import LocalBackend

    folder, aside, note = _claim_folder(root, name, overwrite)
    if note:
        print(f"bon-tracker analyze: {note}", file=sys.stderr)
    run_dir = root / folder
    try:
        local = LocalBackend(root=root, run_id=folder, run_name=name, charts=False)
        for record in records:
            local.log_eval(record)
        local.finish()
        report = run_dir / "report.html"
        if draw:
            try:
                report = write_run_report(records, run_dir, title=name, **names)
            except MissingDependencyError as err:
                logger.warning("bon_tracker: no charts in the report: %s", err)
        atomic_write_text(
            run_dir / ANALYZE_FILE,
            json.dumps(
                {
                    "written_by": "bon-tracker analyze",
                    "bon_tracker_version": __version__,
                    "run_name": name,
                    "inputs": [str(f) for f in files],
                },
                indent=2,
            ),
        )
    except BaseException:
        if aside is not None:  # the earlier run comes back: a failed run replaces nothing
            shutil.rmtree(run_dir, ignore_errors=True)
            aside.rename(run_dir)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return run_dir, report, aside is not None


# ---- the tracking backend ---------------------------------------------------------------------------------------


def _make_tracker(config: TrackerConfig, name: str) -> Any:
    """A tracker for ``--backend``: made before anything is computed, so that a configuration
    error (a missing extra, W&B online without an API key, a bad option) stops the command at once."""
    from bon_tracker.tracking.tracker import BonTracker

    options = {**config.backend_options(), "run_name": name}
    try:
        return BonTracker(
            config.backend,
            key_prefix=config.key_prefix,
            proxy_name=config.proxy_name,
            true_name=config.true_name,
            nan_policy=config.nan_policy,  # type: ignore[arg-type]
            spool_dir=config.spool_dir,
            finish_timeout=config.finish_timeout,
            alerts=True if config.alerts is None else config.alerts,
            **options,
        )
    except (TypeError, ValueError) as err:  # ConfigurationError is a ValueError
        raise UsageError(f"cannot set up the {config.backend} backend: {err}") from None


class _LeftReports(logging.Filter):
    """Holds back the tracker's own report, at finish, of records left in its log: the command
    says it once, with the cause unless the delivery already said it (as it does at first failure)."""

    LEFT = "bon_tracker: %d eval record(s) did not reach"
    FAILED = ("bon_tracker: the %s backend is not set up correctly", "bon_tracker: the %s backend is unreachable")

    def __init__(self) -> None:
        super().__init__()
        self.cause_shown = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.msg if isinstance(record.msg, str) else ""
        if message.startswith(self.FAILED):
            self.cause_shown = True
        return not message.startswith(self.LEFT)


def _deliver(tracker: Any, records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Log records to the backend through the tracker: the same write-ahead log and delivery as
    training. Returns what reached the backend, where it is, and what waits in the log."""
    held = _LeftReports()
    logger.addFilter(held)
    # The summary names where the run is, once: not the tracker's own line as well.
    tracker._announce = lambda delivery: None
    location = None
    try:
        for record in records:
            tracker.log_record(record)
        # Where the run is, read while it is open (W&B and trackio forget it once closed); the
        # two waits together take at most finish_timeout, as finish() alone would.
        started = time.monotonic()
        tracker.flush(tracker.finish_timeout)
        try:
            location = tracker.backend.location
        except Exception:  # a link is a convenience, never an error
            location = None
        tracker.finish(timeout=max(tracker.finish_timeout - (time.monotonic() - started), 1.0))
    finally:
        logger.removeFilter(held)
    stats = tracker.delivery_stats
    left = len(records) - stats.delivered - stats.dead_lettered
    return {
        "name": tracker.backend.name,
        "run_id": tracker.backend.run_id,
        "location": location,
        "delivered": stats.delivered,
        "dead_lettered": stats.dead_lettered,
        "spooled": left,
        "spool": str(tracker.wal_path) if left else None,
        "error": stats.config_error or (stats.last_error if left else None),
        "error_shown": held.cause_shown,
    }


# ---- the command ------------------------------------------------------------------------------------------------


def _input_files(args: argparse.Namespace) -> tuple[list[Path], Callable[..., Iterator[ScoreBatch]]]:
    patterns = expand_file_patterns(args.files)
    reader: Callable[..., Iterator[ScoreBatch]] = read_score_batches
    files = [Path(f) for f in patterns]
    if args.preset == "verl":  # verl's trainer.validation_data_dir dumps, as they are
        from bon_tracker.analysis import verl_dumps

        files = verl_dumps.dump_files(patterns)
        reader = verl_dumps.read_dump_batches
    for path in files:
        if not path.is_file():
            raise ScoreFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        if args.format is None:
            detect_format(path)
    return files, reader


# BLAS held to one thread for the whole command: its own threads (the core's, the statistics
# workers, the reader) keep the cores busy, and OpenBLAS's threads spin between products (on two
# cores that doubled the statistics' CPU time); inside, products give the same bits on every machine.
@single_threaded_blas()
def _cmd_analyze(args: argparse.Namespace) -> int:
    from bon_tracker.analysis.grouping import curves_from_batches
    from bon_tracker.backends.local import default_root

    config = _config(args)
    if args.out and args.root and Path(args.out) != Path(args.root):
        raise UsageError(
            "--out and --root both name the folder that holds the run folders; give one of them "
            f"(got --out {args.out} and --root {args.root})"
        )
    files, reader = _input_files(args)
    proxy_cols, true_cols = _score_columns(args.proxy_col, "proxy"), _score_columns(args.true_col, "true")
    columns = Columns(
        prompt=args.prompt_col,
        proxy=proxy_cols[0],
        true=true_cols[0],
        more_proxy=proxy_cols[1:],
        more_true=true_cols[1:],
        step=args.step_col or "step",
        run=args.run_col or "run",
        require_step=args.step_col is not None,
        require_run=args.run_col is not None,
        prompt_text=args.prompt_text_col,
        completion=args.completion_col,
    )
    if (args.prompt_text_col is None) != (args.completion_col is None):
        raise UsageError(
            "--prompt-text-col and --completion-col go together: name both columns for the hack table, or neither"
        )
    if args.preset == "verl":
        from bon_tracker.analysis import verl_dumps

        columns = dataclasses.replace(
            verl_dumps.dump_columns(files[0], true_cols[0]),
            # the reward function's score; --proxy-col names it otherwise, or an ensemble (its extra keys)
            proxy=proxy_cols[0] if args.proxy_col else "score",
            more_proxy=proxy_cols[1:],
            more_true=true_cols[1:],
            prompt_text=args.prompt_text_col or "input",  # verl writes each sample's texts beside its scores
            completion=args.completion_col or "output",
        )
    if args.no_texts:
        columns = dataclasses.replace(columns, prompt_text=None, completion=None)
    selection = _selection_of(args, columns)
    if selection is not None and args.engine == "ray":
        raise UsageError(
            "--engine ray reads one proxy and one true column; several (or --selection) need --engine stream"
        )
    dump_name = None
    if args.preset == "verl":  # verl names its dump files by step ("10.jsonl"): the folder names the run
        dump_name = verl_dumps.default_run_name(args.files) or Path(files[0]).resolve().parent.name or None
    base = config.run_name or dump_name or _file_stem(files[0])
    explicit_name = config.run_name is not None
    out_root = Path(args.out or config.local.get("root") or default_root())
    rules = alert_rules(config.alerts)
    # Configuration errors of the backend now, before any file is read.
    first_tracker = _make_tracker(config, base) if config.backend != "local" else None

    total = sum(p.stat().st_size for p in files)
    enabled = not args.quiet and sys.stderr.isatty()
    counts: dict[str, int] = {}
    bars: list[_Progress] = []

    def open_batches(desc: str | None = None) -> Iterator[ScoreBatch]:
        for bar in bars:
            bar.close()
        bars.append(_Progress(total, desc or ("reading" if len(bars) == 0 else "re-reading"), enabled))
        batches = _open_batches(
            files, columns, args.format, config.nan_policy, args.batch_rows, bars[-1], counts, reader
        )
        return batches if selection is None else _with_selection_scores(batches, columns, selection)

    def on_ungrouped(key: tuple) -> None:
        run, step, prompt = key
        where = f"prompt {prompt!r} at step {step}" + ("" if run is None else f" of run {run!r}")
        logger.warning(
            "bon_tracker: the rows of %s are not contiguous, so the input is read again with every row "
            "buffered (about 20-40 bytes per row); sort it by step and prompt to stream it in constant memory",
            where,
        )

    hacks: dict[tuple[Any, int], HackStatistics | None] = {}  # each step's hack table (stream engine, texts)
    selections: dict[tuple[Any, int], SelectionStatistics | None] = {}  # several proxies/trues, or --selection
    statistics: dict[tuple[Any, int], EvalStatistics] = {}
    jobs = _Statistics()  # each step's interval and predictions, while the statistics pass reads on
    try:
        if args.engine == "ray":  # Ray Data: the cluster ray.init() finds ($RAY_ADDRESS), else a local one
            from bon_tracker.analysis.ray_engine import ray_curves

            if columns.has_texts:
                logger.warning("bon_tracker: --engine ray reads scores only; the hack table needs --engine stream")

            curves, info = ray_curves(
                files,
                columns,
                ns=config.ns,
                nan_policy=config.nan_policy,
                fmt=args.format,
                preset=args.preset,
                statistics=True,
                progress=False if args.quiet else None,  # -q: no Ray progress bars or INFO lines either
            )
            counts.update(rows=info["rows"], omitted=sum(info["omitted"].values()))
            for run, step in info.get("estimates", {}):
                if step in curves.get(run, {}):
                    estimated = (*info["estimates"][(run, step)], info["agreement"][(run, step)])
                    jobs.submit((run, step), curves[run][step], estimated)
        else:
            one = _OnePass(jobs, columns.has_texts, selection, STEP_BUFFER_BYTES)
            reads = [0]

            def curve_batches() -> Iterator[ScoreBatch]:
                reads[0] += 1
                return one.batches(open_batches()) if reads[0] == 1 else open_batches()

            def not_grouped(key: tuple) -> None:
                one.abandon()
                on_ungrouped(key)

            curves, info = curves_from_batches(
                curve_batches, ns=config.ns, on_ungrouped=not_grouped, accumulators=one.accumulators
            )

            def step_done(key: tuple[Any, int], estimated: _StepEstimates) -> None:
                curve = estimated.deployed_curve  # several proxies: the deployed rule's curve
                jobs.submit(key, curves[key[0]][key[1]] if curve is None else curve, estimated.result())

            if curves:
                done = one.end(curves) if info["grouped"] else {}
                read = dict(counts)
                steps = {
                    (run, step): _StepEstimates(
                        curve.n,
                        info["prompts"][(run, step)],
                        info["samples"][(run, step)],
                        columns.has_texts,
                        selection,
                    )
                    for run, by_step in curves.items()
                    for step, curve in by_step.items()
                    if (run, step) not in done
                }
                for key, estimated in steps.items():
                    estimated.on_complete = lambda done, key=key: step_done(key, done)
                if steps:  # ungrouped input, or the steps the one read left (see _OnePass)
                    feed = _feed_grouped if info["grouped"] else _feed_buffered
                    feed(open_batches("statistics"), steps)
                    counts.update(read)
                for key, estimated in steps.items():
                    if key not in jobs:  # fewer prompts than the curves' pass counted (never expected)
                        step_done(key, estimated)
                steps = {**steps, **done}
                hacks = {key: step.hack_statistics() for key, step in steps.items()}
                selections = {key: step.selection_stats for key, step in steps.items()}
                for (run, step), estimated in steps.items():
                    if estimated.deployed_curve is not None:  # several proxies: the deployed rule's curve
                        curves[run][step] = estimated.deployed_curve
        if curves:
            statistics = jobs.results(curves)
    finally:
        for bar in bars:
            bar.close()
        jobs.close()
    if not curves:
        dropped = f" ({counts['omitted']:,} dropped by --nan-policy omit)" if counts.get("omitted") else ""
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}{dropped}")

    draw = bool(config.local.get("charts", True))
    names = {"proxy_name": config.proxy_name, "true_name": config.true_name}
    summary: dict[str, Any] = {
        "rows": counts.get("rows", 0),
        "omitted": counts.get("omitted", 0),
        "grouped": info["grouped"],
        "runs": [],
    }
    exit_code = EXIT_OK
    for run, steps in curves.items():
        name = base if run is None else (f"{base}-{run}" if explicit_name else str(run))
        records = [
            _with_texts(r, hacks.get((run, r.step)), selections.get((run, r.step)))
            for r in _records(
                steps, run, statistics, config, rules, selections, None if selection is None else selection.rule
            )
        ]
        run_dir, report, replaced = _write_run_folder(
            out_root, name, records, overwrite=args.overwrite, draw=draw, files=files, names=names
        )
        entry: dict[str, Any] = {
            "name": name,
            "run_dir": str(run_dir),
            "report": str(report),
            "replaced": replaced,
            "steps": [
                {**_step_summary(r, info, run), **_hack_summary(hacks.get((run, r.step))), **_selection_summary(r)}
                for r in records
            ],
            "alerts": [{"step": r.step, **a.to_dict()} for r in records for a in r.onsets],
        }
        if config.backend != "local":
            if first_tracker is not None and name == base:  # the tracker made before computing: this run's
                tracker, first_tracker = first_tracker, None
            else:
                tracker = _make_tracker(config, name)
            entry["backend"] = _deliver(tracker, records)
            if entry["backend"]["spooled"] or entry["backend"]["dead_lettered"]:
                exit_code = EXIT_PENDING
        summary["runs"].append(entry)
    if first_tracker is not None:  # the input named its runs: that tracker logged nothing
        first_tracker.finish()
    _print_analyze_summary(summary, args.json, files)
    return exit_code


def _records(
    steps: dict[int, BonCurve],
    run: Any,
    statistics: dict[tuple[Any, int], EvalStatistics],
    config: TrackerConfig,
    rules: Any,
    selections: dict[tuple[Any, int], SelectionStatistics | None] | None = None,
    deployed: str | None = None,
) -> list[EvalRecord]:
    """The eval records of one run, as ``log_scores`` builds them: interval, agreement,
    predictions, and the alerts of the run's steps in order (the tracker's reporter; with several
    true rewards also the deployed rule's alerts under each further one, ``<true reward>/<rule>``)."""
    reporter = AlertReporter(rules) if rules is not None else None
    true_reporters: dict[str, AlertReporter] = {}
    records = []
    for step, curve in sorted(steps.items()):
        stats = statistics.get((run, step), EvalStatistics())
        events: list = []
        states = None
        if reporter is not None:
            try:
                events, states = reporter.update(step, curve, None, stats.interval)
                selection = (selections or {}).get((run, step))
                if selection is not None and deployed is not None:
                    more, more_states = alerts_by_true(selection, step, deployed, rules, true_reporters)
                    events, states = [*events, *more], {**states, **more_states}
            except Exception as err:  # as in the tracker: never the reason the curves are not reported
                where = f"step {step}" + ("" if run is None else f" of run {run!r}")
                logger.warning("bon_tracker: the alerts failed at %s (%s: %s)", where, type(err).__name__, err)
        records.append(
            EvalRecord.build(
                step,
                curve,
                key_prefix=config.key_prefix,
                proxy_name=config.proxy_name,
                true_name=config.true_name,
                interval=stats.interval,
                agreement=stats.agreement,
                predictions=stats.predictions,
                alerts=events,
                alert_states=states,
            )
        )
    return records


def _with_texts(
    record: EvalRecord, hack: HackStatistics | None, selection: SelectionStatistics | None = None
) -> EvalRecord:
    """The record with its step's hack table (when the score files hold texts) and selection statistics."""
    if hack is not None:
        record = dataclasses.replace(record, hacks=hack)
    return record if selection is None else dataclasses.replace(record, selection=selection)


def _selection_summary(record: EvalRecord) -> dict[str, Any]:
    """What the summary says of a step's selection statistics: the names, and each rule's best n
    (the exact curve's argmax) under the first true reward."""
    stats = record.selection
    if stats is None:
        return {}
    best = {}
    for rule in stats.rules:
        optimum = stats.get(rule).optimum("bon", "curve_argmax")
        best[rule] = optimum.value
    return {"selection_members": list(stats.member_names), "selection_trues": list(stats.true_names), "best_n": best}


def _score_columns(given: Sequence[str] | None, default: str) -> tuple[str, ...]:
    """``--proxy-col``/``--true-col`` given once or more, each a name or a comma list."""
    if not given:
        return (default,)
    names = tuple(name.strip() for value in given for name in value.split(","))
    if any(not name for name in names):
        raise UsageError(f"an empty column name in --{default}-col {','.join(given)!r}")
    return names


def _hack_summary(hack: HackStatistics | None) -> dict[str, Any]:
    """What the summary says of a step's hack table: its rows, the largest gap and the length feature."""
    if hack is None:
        return {}
    length = next((f for f in hack.features if f.name == "length_chars"), None)
    return {
        "hack_rows": len(hack.rows),
        "hack_prompts_losing": hack.prompts_losing,
        "hack_top_gap": hack.rows[0].gap if hack.rows else None,
        "hack_top_prompt": hack.rows[0].prompt_index if hack.rows else None,
        "length_chars_pick": None if length is None else length.pick,
        "length_chars_all": None if length is None else length.all,
    }


def _step_summary(record: EvalRecord, info: dict[str, Any], run: Any) -> dict[str, Any]:
    from bon_tracker.reports.charts import goodhart_text

    c, g, status = record.curve, record.goodhart, record.goodhart_status()
    ns = c.n.tolist()
    shown = g is not None and status in ("measured", "extrapolated")  # past the horizon: no number
    return {
        "step": record.step,
        "prompts": info["prompts"][(run, record.step)],
        "samples": info["samples"][(run, record.step)],
        "N": c.N,
        "true@1": float(c.true_mean[ns.index(1)]) if 1 in ns else None,
        "n_max": ns[-1],
        "true@n_max": float(c.true_mean[-1]),
        "proxy@n_max": float(c.proxy_mean[-1]),
        "goodhart_n": g.n if shown else None,
        "goodhart_kl": g.kl if shown else None,
        "goodhart_within_range": None if g is None else g.within_range,
        "goodhart_status": status,
        "goodhart_falls_from_start": bool(g is not None and g.falls_from_start),
        "goodhart_horizon_n": record.horizon_n,
        "goodhart": goodhart_text(record),
        "alerts": sorted(rule for rule, state in (record.alert_states or {}).items() if state),
    }


def _print_analyze_summary(summary: dict[str, Any], as_json: bool, files: Sequence[Path]) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    omitted = f", {plural(summary['omitted'], 'non-finite sample')} omitted" if summary["omitted"] else ""
    print(f"read {plural(summary['rows'], 'sample')} from {plural(len(files), 'file')}{omitted}")
    for run in summary["runs"]:
        print(f"run {run['name']!r}: {plural(len(run['steps']), 'eval step')}")
        for s in run["steps"][-5:]:
            goodhart = s["goodhart"]  # the report's wording: n* = 1, "beyond n = ...", "not resolved"
            true1 = f"true@1 {s['true@1']:.4g}, " if s["true@1"] is not None else ""
            print(
                f"  step {s['step']}: {plural(s['prompts'], 'prompt')}, N={s['N']}; {true1}"
                f"true@{s['n_max']} {s['true@n_max']:.4g}; {goodhart}"
            )
        if len(run["steps"]) > 5:
            earlier = len(run["steps"]) - 5
            print(f"  ({plural(earlier, 'earlier step')} in the report)")
        for alert in run["alerts"]:
            print(f"  alert {alert['rule']} at step {alert['step']}: {alert['message']}")
        print(f"  run folder: {run['run_dir']} (report: {run['report']})")
        backend = run.get("backend")
        if backend:
            where = backend["location"] or f"run {backend['run_id']}"
            logged = f"{plural(backend['delivered'], 'eval step')} logged"
            if backend["spool"]:
                cause = "" if backend["error_shown"] or not backend["error"] else f" ({backend['error']})"
                print(
                    f"  {backend['name']}: {logged}; {plural(backend['spooled'], 'record')} could not be "
                    f"logged{cause} and {'is' if backend['spooled'] == 1 else 'are'} kept in {backend['spool']}; "
                    f"replay with: bon-tracker sync {backend['spool']}",
                    file=sys.stderr,
                )
            else:
                print(f"  {backend['name']}: {where} ({logged})")


def add_parser(commands: Any) -> None:
    """The ``analyze`` subcommand."""
    analyze = commands.add_parser(
        "analyze",
        formatter_class=_Formatter,
        help="compute best-of-n curves from score files",
        description=(
            "Read per-sample scores (one row per sample: a prompt id, a proxy score, a true score, and optionally "
            "a training step and a run name), compute the best-of-n curves of every step (exact all-subsets "
            "estimator), fit Gao et al.'s curve and its Goodhart point, and write a run folder with an HTML "
            "report and PNG charts; with --backend mlflow or wandb, also log them to a tracking run.\n\n"
            "Files stream in bounded memory. When the rows of each prompt are contiguous (the file is sorted or "
            "written prompt by prompt), memory does not grow with the file; otherwise every row is buffered at "
            "about 20 bytes per row (the file is then read twice)."
        ),
        epilog=(
            "input formats (by extension): .jsonl/.ndjson (one JSON object per line), .csv (a header line), "
            ".parquet;\n.jsonl.gz and .csv.gz are read compressed. Lines (text) and rows (Parquet) are counted "
            "from 1 in errors.\n\n"
            "examples:\n"
            "  bon-tracker analyze samples.jsonl\n"
            "  bon-tracker analyze shard-*.parquet --step-col global_step --ns 1,2,4,8,16,32,64\n"
            "  bon-tracker analyze scores.csv --prompt-col question --proxy-col rm_score --true-col gold_score\n"
            "  bon-tracker analyze ensemble.csv --proxy-col rm_a,rm_b,rm_c --true-col gold,verifier "
            "--selection-rule worst\n"
            "  bon-tracker analyze scores.csv --backend mlflow --tracking-uri sqlite:///mlflow.db "
            "--experiment goodhart\n"
            "  bon-tracker analyze scores.csv --backend wandb --project goodhart --run-name ppo-1\n\n" + EXIT_CODES_HELP
        ),
    )
    analyze.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="score files (read in order, as one table); a glob pattern ('dumps/*.parquet', quoted or not) "
        "stands for the files it matches, in sorted order, and is an error when it matches none",
    )
    _add_config(analyze)
    cols = analyze.add_argument_group("columns")
    cols.add_argument(
        "--prompt-col", default="prompt_id", metavar="NAME", help="prompt id column (default: %(default)s)"
    )
    cols.add_argument(
        "--proxy-col",
        action="append",
        metavar="NAME",
        help="proxy score column (default: proxy); several (repeated, or a comma list: rm_a,rm_b) are an ensemble "
        "of reward models, one column per member: each step gets the selection statistics of every rule, and "
        "its curve is --selection-rule's (docs/selection.md)",
    )
    cols.add_argument(
        "--true-col",
        action="append",
        metavar="NAME",
        help="true score column (default: true); several (repeated or a comma list): every selection statistic "
        "per true reward, the curve on the first",
    )
    cols.add_argument(
        "--step-col", metavar="NAME", help="training step column (default: 'step' if present, else every row is step 0)"
    )
    cols.add_argument(
        "--run-col", metavar="NAME", help="run column: one run per value (default: 'run' if present, else one run)"
    )
    cols.add_argument(
        "--prompt-text-col",
        metavar="NAME",
        help="prompt text column, with --completion-col: a hack table per step (the prompts where best-of-N by "
        "proxy loses most true reward, both picks' texts; docs/texts.md)",
    )
    cols.add_argument(
        "--completion-col",
        metavar="NAME",
        help="completion text column (a list, one per score, in a row of one prompt), with --prompt-text-col",
    )
    cols.add_argument(
        "--no-texts", action="store_true", help="read no texts (also not verl's input/output with --preset verl)"
    )
    cols.add_argument("--format", choices=FORMATS, help="input format, if the file names do not tell")
    cols.add_argument(
        "--preset",
        choices=("verl",),
        help="verl: files or folders of verl's trainer.validation_data_dir dumps ({step}.jsonl): "
        "uid -> prompt, score -> proxy, input/output -> texts, step from the row or the file name; name the "
        "true reward with --true-col",
    )
    computing = analyze.add_argument_group("computation")
    computing.add_argument(
        "--engine",
        choices=("stream", "ray"),
        default="stream",
        help="stream: this process, bounded memory (default); ray: Ray Data workers on the cluster "
        "ray.init() finds ($RAY_ADDRESS) or a local one, for Parquet/JSONL dumps beyond one machine",
    )
    computing.add_argument(
        "--ns",
        type=_parse_ns,
        metavar="N,N,...",
        help="best-of-n grid (config: ns; default: powers of two up to N, plus N)",
    )
    computing.add_argument(
        "--selection-rule",
        default="mean",
        metavar="RULE",
        help="with several proxy columns, the rule whose pick is deployed (its curve is the step's curve): mean, "
        "worst, uwo or a member's column (default: %(default)s)",
    )
    computing.add_argument(
        "--selection",
        action="store_true",
        help="the selection statistics (soft best-of-n, Best-of-Poisson, hedged optima, frontier) also for one "
        "proxy column (on whenever there are several proxy or true columns)",
    )
    computing.add_argument(
        "--nan-policy",
        choices=("raise", "omit"),
        help="non-finite or missing scores: an error (raise, default) or dropped (omit)",
    )
    computing.add_argument("--key-prefix", metavar="PREFIX", help="metric key prefix (config: key_prefix; default bon)")
    output = analyze.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        help="the folder that holds the run folders (the same as --root: give one of them; default: "
        "config local.root, $BON_TRACKER_DIR, else ./bon_runs)",
    )
    output.add_argument(
        "--run-name",
        metavar="NAME",
        help="run name (default: the first file's name, for a verl dump folder the folder's; with a run "
        "column, each run's value)",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run folder of the same name that an earlier analyze wrote (default: a new folder "
        "<name>-2, <name>-3, ..., and a line saying so)",
    )
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bars (also Ray's, and its INFO lines)")
    output.add_argument("--batch-rows", type=int, default=None, help=argparse.SUPPRESS)
    backend = analyze.add_argument_group("tracking backend (also log the curves to a run)")
    backend.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help=f"{', '.join(BACKENDS)} (default local: the run folder only; config: backend)",
    )
    backend.add_argument(
        "--root", metavar="DIR", help="the folder that holds the run folders, as --out (config: local.root)"
    )
    backend.add_argument("--tracking-uri", metavar="URI", help="mlflow: tracking URI (config: mlflow.tracking_uri)")
    backend.add_argument("--experiment", metavar="NAME", help="mlflow: experiment name (config: mlflow.experiment)")
    backend.add_argument("--project", metavar="NAME", help="wandb: project (config: wandb.project)")
    backend.add_argument("--entity", metavar="NAME", help="wandb: entity, user or team (config: wandb.entity)")
    backend.add_argument("--wandb-mode", choices=("online", "offline"), help="wandb: mode (config: wandb.mode)")
    backend.add_argument(
        "--spool-dir", metavar="DIR", help="where records wait if the backend fails (config: spool_dir)"
    )
    _add_labels(analyze)
    analyze.set_defaults(handler=_cmd_analyze)
