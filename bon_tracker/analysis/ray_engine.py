"""Best-of-n curves of score dumps larger than one machine, on a Ray cluster.

Two paths to the same statistics. Each worker reduces whole prompts with the core's
:class:`~bon_tracker.core.CurveAccumulator` (the same all-subsets estimates, KL and per-n sums
as :func:`~bon_tracker.bon_curve`) to mergeable statistics; the driver merges them per (run, step)
(:func:`~bon_tracker.core.merge_curve_stats`) and computes each step's curve with
:func:`~bon_tracker.core.curve_stats_compute`. The curves, and the fits built on them, are the
single-process ``bon-tracker analyze`` result up to float summation order (< 1e-12).

* **blocks** (local files whose prompts' rows are contiguous: verl's dumps, files sorted by step
  and prompt): one Ray task per file reads it with the single-process reader and reduces each
  batch where it lies. A batch's first and last prompts may go on in the neighbouring batch or
  file, so their rows are kept apart and joined with the neighbours' in input order (within the
  task, then on the driver), and reduced once whole. Whether the input is grouped is found in the
  same pass: a batch whose prompt comes back after another prompt stops its task at once, and
  the driver checks that no (run, step, prompt) key was closed twice, from one 64-bit hash per
  prompt (8 bytes per prompt reach the driver; a collision, ~K^2/2^65 for K prompts, only sends
  grouped input down the shuffle path). No shuffle: on 2 CPUs as fast as the single process.
* **shuffle** (rows of a prompt scattered, URIs, or ``shuffle=True``): Ray Data reads the Parquet
  or JSONL files in parallel and groups the rows by (run, step, bucket), a bucket being a stable
  hash of the prompt id, so each group holds whole prompts; one worker call reduces one group.

What reaches the driver is the per-n sums per step and piece (file or bucket); with
``statistics=True`` also each prompt's best-of-n estimates (2 x 8 bytes per n of the grid and
prompt) and each part's tail agreement, from which the driver's caller computes the Goodhart
interval, the predictions and the alerts as the tracker does (:func:`prompt_estimates`,
:func:`merge_agreements`).

Prompt order: the interval and the predictions resample prompts with a fixed seed, so their
bounds depend on the order of the prompts. The blocks path keeps the order of the input, as the
single-process engine does, so the bounds are the same too. The shuffle path puts prompts in id
order (numeric for integer ids, else as text): its bounds differ from the single-process ones by
resampling noise, as two seeds would; the curves and fits do not. The agreement averages every
prompt of a step here (the tracker and the single-process engine average an evenly spaced subset
of 2,048 beyond that many).

>>> from bon_tracker.analysis.ray_engine import ray_curves  # doctest: +SKIP
>>> curves, info = ray_curves(["s3://bucket/dump/"], Columns(prompt="uid", true="gold"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import pickle
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.analysis.grouping import RunSteps, _key_at, _segments
from bon_tracker.analysis.score_files import (
    DEFAULT_BATCH_ROWS,
    Columns,
    ScoreBatch,
    ScoreFileError,
    detect_format,
)
from bon_tracker.analysis.verl_dumps import sample_keys
from bon_tracker.core import (
    CurveAccumulator,
    CurveStats,
    TopAgreement,
    bon_curve_parts,
    curve_stats_compute,
    default_ns,
    merge_curve_stats,
    topq_agreement,
)
from bon_tracker.core.validation import NanPolicy, check_nan_policy
from bon_tracker.optional import require

logger = logging.getLogger("bon_tracker")

_KEYS = ("run", "step", "bucket")
DEFAULT_BUCKETS = 64  # groups of whole prompts per (run, step): the unit of work of one worker call


def _normalised(
    batch: dict[str, np.ndarray],
    columns: Columns,
    has_step: bool,
    has_run: bool,
    text_ids: bool,
    verl: bool,
    buckets: int,
):
    """One batch of a dataset as the columns ``run, step, prompt, proxy, true`` (and, for verl's dumps,
    ``session`` and ``output``: a session's last output is its sample)."""
    size = len(batch[columns.proxy])
    prompt = batch[columns.prompt]
    if text_ids:  # JSONL: prompt ids and run names compared as text, as the single-process reader does
        prompt = np.array([str(p) for p in prompt], dtype=object)
    extra = {}
    if verl:
        prompt, session = sample_keys(prompt)
        extra = {
            "session": np.array([str(s) for s in session], dtype=object),
            "output": _output_index(batch[columns.prompt]),
        }
    return extra | {
        "run": np.array([str(r) for r in batch[columns.run]], dtype=object) if has_run else np.full(size, ""),
        "step": batch[columns.step].astype(np.int64) if has_step else np.zeros(size, dtype=np.int64),
        "prompt": prompt,
        "bucket": _bucket_of(prompt, buckets),
        "proxy": batch[columns.proxy].astype(np.float64),
        "true": batch[columns.true].astype(np.float64),
    }


def _object_column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _bucket_of(prompt: np.ndarray, buckets: int) -> np.ndarray:
    """A bucket per row from its prompt id, the same in every process (no salted ``hash``)."""
    if prompt.dtype.kind in "iu":
        return (np.abs(prompt.astype(np.int64)) % buckets).astype(np.int64)
    unique, inverse = np.unique(prompt.astype(str), return_inverse=True)
    of_unique = np.fromiter((zlib.crc32(u.encode()) % buckets for u in unique.tolist()), np.int64, len(unique))
    return of_unique[inverse.ravel()]


def prompt_estimates(proxy: Any, true: Any, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each prompt's best-of-n estimate of the true and of the proxy score on ``grid``:
    two ``(P, len(grid))`` arrays, NaN where a prompt has fewer samples than n (what the
    Goodhart interval and the predictions resample, as the tracker's ``eval_statistics``).

    ``proxy``, ``true``: a ``(P, N)`` array or a list of 1-D rows, finite.

    >>> t, p = prompt_estimates([np.array([0.0, 1.0]), np.array([0.0, 1.0, 2.0])], [np.zeros(2), np.ones(3)],
    ...                         np.array([1, 2, 3]))
    >>> t.tolist(), p[:, 0].tolist()
    ([[0.0, 0.0, nan], [1.0, 1.0, 1.0]], [0.5, 1.0])
    """
    grid = np.asarray(grid, dtype=np.int64)
    dense = isinstance(proxy, np.ndarray)
    P = proxy.shape[0] if dense else len(proxy)
    largest = proxy.shape[1] if dense else max((len(row) for row in proxy), default=0)
    true_pp = np.full((P, len(grid)), np.nan)
    proxy_pp = np.full((P, len(grid)), np.nan)
    cols = np.flatnonzero(grid <= largest)
    if P and cols.size:  # one sort for both: bon_estimate(proxy, true) and bon_estimate(proxy, proxy)
        parts = bon_curve_parts(proxy, true, grid[cols])
        true_pp[:, cols] = parts.true
        proxy_pp[:, cols] = parts.proxy
    return true_pp, proxy_pp


def merge_agreements(parts: Sequence[TopAgreement | None]) -> TopAgreement | None:
    """The tail agreement of the prompts of several parts together (each a
    :class:`~bon_tracker.core.TopAgreement` of the same q, i.e. the same N): per q, the mean
    over every prompt of their Spearman correlations and its standard error, as
    :func:`~bon_tracker.core.topq_agreement` on all the prompts at once (up to rounding).
    None when there is no part, a part has none, or the parts differ in q.

    >>> rng = np.random.default_rng(0)
    >>> p, t = rng.normal(size=(40, 8)), rng.normal(size=(40, 8))
    >>> whole, merged = topq_agreement(p, t), merge_agreements([topq_agreement(p[:15], t[:15]),
    ...                                                         topq_agreement(p[15:], t[15:])])
    >>> bool(np.allclose(whole.mean, merged.mean) and np.allclose(whole.se, merged.se))
    True
    """
    if not parts or any(part is None for part in parts):
        return None
    first = parts[0]
    assert first is not None
    if any(part.q != first.q or part.n_top != first.n_top for part in parts):  # type: ignore[union-attr]
        return None
    means, ses, counts = [], [], []
    for i in range(len(first.q)):
        total, mean, m2 = 0, 0.0, 0.0
        for part in parts:
            c = int(part.n_prompts[i])  # type: ignore[union-attr]
            if c == 0:
                continue
            m = float(part.mean[i])  # type: ignore[union-attr]
            q2 = (float(part.se[i]) ** 2 * c) * (c - 1) if c >= 2 else 0.0  # type: ignore[union-attr]
            delta = m - mean
            mean += delta * c / (total + c)
            m2 += q2 + delta * delta * total * c / (total + c)
            total += c
        counts.append(total)
        means.append(mean if total else math.nan)
        ses.append(math.sqrt(m2 / (total - 1)) / math.sqrt(total) if total >= 2 else math.nan)
    return TopAgreement(first.q, first.n_top, tuple(means), tuple(ses), tuple(counts))


def _bucket_statistics(ids: list[Any], proxy: list[np.ndarray], true: list[np.ndarray], ns: list[int] | None) -> bytes:
    """One bucket's prompt ids with their :func:`_chunk_statistics`, pickled."""
    lengths = {len(row) for row in proxy}
    rows_p: Any = np.stack(proxy) if len(lengths) == 1 else proxy
    rows_t: Any = np.stack(true) if len(lengths) == 1 else true
    return pickle.dumps({"ids": ids, **_chunk_statistics(rows_p, rows_t, ns)})


def _per_bucket(
    group: dict[str, np.ndarray], ns: list[int] | None, nan_policy: str, statistics: bool = False
) -> dict[str, np.ndarray]:
    """Every row of the prompts of one (run, step, bucket) -> one row: their pickled statistics
    (a :class:`~bon_tracker.core.CurveAccumulator` over the prompts), the samples omitted and,
    with ``statistics``, the prompts' estimates (:func:`_bucket_statistics`)."""
    if "session" in group:  # verl: one sample per session, its last output
        order = np.lexsort((group["output"], group["session"]))
        session = group["session"][order]
        group = {key: values[order[np.append(session[1:] != session[:-1], True)]] for key, values in group.items()}
    run, step = group["run"][0], int(group["step"][0])
    finite = np.isfinite(group["proxy"]) & np.isfinite(group["true"])
    if not finite.all():
        if nan_policy == "raise":
            prompt = group["prompt"][np.flatnonzero(~finite)[0]]
            raise ScoreFileError(
                f"prompt {prompt!r} at step {step}: a non-finite score (NaN, inf or missing); clean the data, "
                "or pass nan_policy='omit' (--nan-policy omit) to drop such samples"
            )
        group = {key: values[finite] for key, values in group.items()}
    accumulator = CurveAccumulator(ns)
    codes = np.unique(group["prompt"].astype(str), return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    ids, rows_p, rows_t = [], [], []
    for rows in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
        if not len(rows):
            continue
        accumulator.add_prompt(group["proxy"][rows], group["true"][rows])
        if statistics:
            prompt = group["prompt"][rows[0]]
            ids.append(prompt.item() if isinstance(prompt, np.generic) else prompt)
            rows_p.append(group["proxy"][rows])
            rows_t.append(group["true"][rows])
    return {
        "run": _object_column([run]),
        "step": np.array([step], dtype=np.int64),
        "stats": _object_column([pickle.dumps(accumulator.stats)]),
        "omitted": np.array([int((~finite).sum())], dtype=np.int64),
        "extra": _object_column([_bucket_statistics(ids, rows_p, rows_t, ns) if ids else b""]),
    }


def _output_index(keys: np.ndarray) -> np.ndarray:
    return np.array([int(str(key).rsplit("_", 1)[1]) if str(key).rsplit("_", 1)[-1].isdigit() else 0 for key in keys])


def _merged(parts: Any, extras: dict[tuple[str, int], list[dict]] | None = None) -> dict[tuple[str, int], tuple]:
    """Statistics and omitted counts merged per (run, step) over batches of rows; the buckets'
    estimates collected into ``extras`` (when given)."""
    merged: dict[tuple[str, int], tuple[CurveStats, int]] = {}
    for batch in parts:
        blobs = batch["extra"] if "extra" in batch else [b""] * len(batch["run"])
        for run, step, blob, omitted, extra in zip(
            batch["run"], batch["step"], batch["stats"], batch["omitted"], blobs
        ):
            key = (str(run), int(step))
            stats = pickle.loads(blob)
            if key in merged:
                total, dropped = merged[key]
                merged[key] = (merge_curve_stats(total, stats), dropped + int(omitted))
            else:
                merged[key] = (stats, int(omitted))
            if extras is not None and extra:
                extras.setdefault(key, []).append(pickle.loads(extra))
    return merged


def _id_order(ids: list[Any]) -> np.ndarray:
    """The order of prompt ids: numeric for integer ids, else as text (stable)."""
    if ids and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
        return np.argsort(np.array(ids, dtype=np.int64), kind="stable")
    return np.argsort(np.array([str(i) for i in ids], dtype=object).astype(str), kind="stable")


def _step_statistics(parts: list[dict], grid: np.ndarray) -> tuple[np.ndarray, np.ndarray, TopAgreement | None]:
    """The parts' estimates of one step on the step's grid and the step's agreement. Prompts in the
    order of the parts, or in id order when the parts hold ``ids`` (the shuffle path's buckets)."""
    rows = sum(len(part["true"]) for part in parts)
    true_pp = np.full((rows, len(grid)), np.nan)
    proxy_pp = np.full((rows, len(grid)), np.nan)
    row = 0
    for part in parts:
        k = len(part["true"])
        src = np.flatnonzero(np.isin(part["grid"], grid))
        dst = np.searchsorted(grid, part["grid"][src])
        true_pp[row : row + k, dst] = part["true"][:, src]
        proxy_pp[row : row + k, dst] = part["proxy"][:, src]
        row += k
    one_n = len({n for part in parts for n in part["lengths"]}) == 1  # every prompt of the step has one N
    agreement = merge_agreements([part["agreement"] for part in parts]) if one_n else None
    if parts and "ids" in parts[0]:
        order = _id_order([i for part in parts for i in part["ids"]])
        return true_pp[order], proxy_pp[order], agreement
    return true_pp, proxy_pp, agreement


@contextlib.contextmanager
def _ray_output(progress: bool | None) -> Iterator[None]:
    """``progress=False``: no progress bars and no INFO lines from Ray (``bon-tracker analyze -q``),
    restored after; None leaves Ray's settings as they are."""
    if progress is None:
        yield
        return
    ray = require("ray", "ray")
    ray_data = require("ray.data", "ray")
    loggers = [logging.getLogger(name) for name in ("ray", "ray.data")]
    levels = [log.level for log in loggers]
    if not progress:
        for log in loggers:
            log.setLevel(logging.WARNING)
        with contextlib.suppress(Exception):  # Ray Data's warning that the bars are off: they were turned off
            from ray.util.debug import log_once

            log_once("ray_data_progress_manager_disabled")
        if not ray.is_initialized():  # as Ray Data would start it ($RAY_ADDRESS, else a local one), quietly
            ray.init(logging_level=logging.WARNING)
    context = ray_data.DataContext.get_current()
    saved = context.enable_progress_bars
    context.enable_progress_bars = bool(progress)
    try:
        yield
    finally:
        context.enable_progress_bars = saved
        for log, level in zip(loggers, levels):
            log.setLevel(level)


# ---- grouped input: each piece reduced where it lies ------------------------------------------------------


class _Scattered(Exception):
    """A prompt's rows reappear after other prompts' (``key``: its run, step and prompt id)."""

    def __init__(self, key: tuple[Any, int, Any]):
        super().__init__(key)
        self.key = key


_STEP_TAG = np.uint64(0x5DEECE66D2545F49)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of each value: 64 well-mixed bits (uint64 arithmetic wraps, as meant)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _text_hash(value: Any) -> int:
    return int.from_bytes(hashlib.blake2b(str(value).encode(), digest_size=8).digest(), "little")


def _id_hashes(values: np.ndarray) -> np.ndarray:
    """64 bits per prompt id or run name, the same in every process (no salted ``hash``):
    integers mixed as numbers (an id 7 read from Parquet and one read from JSONL agree), text by its bytes."""
    if values.dtype.kind in "iu":
        return _mix(values.astype(np.int64).view(np.uint64))
    out = np.empty(len(values), dtype=np.uint64)
    for i, value in enumerate(values.tolist()):
        if isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            out[i] = _mix(np.array([value], dtype=np.int64).view(np.uint64))[0]
        else:
            out[i] = _text_hash(("text", value))
    return out


def _key_hashes(runs: np.ndarray | None, steps: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """One 64-bit hash per (run, step, prompt) key. Equal keys hash alike; two keys that collide
    (chance ~K^2 / 2^65 for K prompts) only make grouped input look scattered (the shuffle path).
    The step is tagged before it is mixed, so that (step s, prompt p) and (step p, prompt s) differ."""
    with np.errstate(over="ignore"):
        key = _mix(steps.astype(np.int64).view(np.uint64) ^ _STEP_TAG)
        if runs is not None:
            key = _mix(key ^ _id_hashes(runs))
        return _mix(key ^ _id_hashes(prompts))


@dataclass
class _OpenPrompt:
    """The rows of one prompt at a piece's edge, which may go on in the neighbouring piece."""

    key: tuple[Any, int, Any]  # (run, step, prompt id)
    proxy: list[np.ndarray]
    true: list[np.ndarray]

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.proxy), np.concatenate(self.true)


@dataclass
class _Piece:
    """Consecutive rows of the input, reduced: every prompt between the first and the last in
    per-(run, step) accumulators, and those two prompts' rows kept open (a neighbour may hold
    more of them). ``last`` is None when the piece is one prompt (``first``).

    With ``statistics``, ``estimates`` holds per (run, step) the prompts' estimates in input
    order (parts as :func:`_chunk_statistics` makes them); ``first``'s go before them when it closes.
    """

    first: _OpenPrompt
    last: _OpenPrompt | None
    ns: list[int] | None
    statistics: bool
    accumulators: dict[tuple[Any, int], CurveAccumulator] = field(default_factory=dict)
    estimates: dict[tuple[Any, int], list[dict]] = field(default_factory=dict)
    hashes: list[np.ndarray] = field(default_factory=list)  # of every closed prompt's key
    omitted: dict[tuple[Any, int], int] = field(default_factory=dict)

    def _accumulator(self, key: tuple[Any, int]) -> CurveAccumulator:
        found = self.accumulators.get(key)
        if found is None:
            found = self.accumulators[key] = CurveAccumulator(self.ns)
        return found

    def add_block(self, step_key: tuple[Any, int], proxy: Any, true: Any, hashes: np.ndarray) -> None:
        """Complete prompts of one (run, step), in input order: ``(k, N)`` arrays, or lists of rows."""
        accumulator = self._accumulator(step_key)
        if isinstance(proxy, np.ndarray):
            accumulator.add_prompts(proxy, true)
        else:
            for p, t in zip(proxy, true):
                accumulator.add_prompt(p, t)
        self.hashes.append(hashes)
        if self.statistics:
            self.estimates.setdefault(step_key, []).append(_chunk_statistics(proxy, true, self.ns))

    def close(self, prompt: _OpenPrompt, *, in_front: bool = False) -> None:
        """``prompt`` is complete: into the accumulators (its estimates in front of the others with ``in_front``)."""
        run, step, prompt_id = prompt.key
        proxy, true = prompt.scores()
        self._accumulator((run, step)).add_prompt(proxy, true)
        runs = None if run is None else _object_column([run])
        self.hashes.append(_key_hashes(runs, np.array([step], dtype=np.int64), _object_column([prompt_id])))
        if self.statistics:
            chunk = _chunk_statistics(proxy[None, :], true[None, :], self.ns)
            chunks = self.estimates.setdefault((run, step), [])
            if in_front:
                chunks.insert(0, chunk)
            else:
                chunks.append(chunk)

    def extend(self, other: _Piece) -> _Piece:
        """This piece followed by ``other`` (the rows right after this piece's), as one piece."""
        tail = self.last if self.last is not None else self.first
        joined = other.first.key == tail.key
        if joined:  # the prompt at the seam goes on in ``other``
            tail.proxy += other.first.proxy
            tail.true += other.first.true
            if other.last is None:  # ``other`` is nothing but more rows of that prompt
                self._add_counts(other)
                return self
        if self.last is not None:  # complete now: rows of another prompt follow it
            self.close(self.last)
        if not joined and other.last is not None:
            self.close(other.first)  # complete on both sides
        if other.accumulators is not self.accumulators:  # (batches of one file share their file's)
            for step_key, accumulator in other.accumulators.items():
                self._accumulator(step_key).merge(accumulator.stats)
        for step_key, chunks in other.estimates.items():
            self.estimates.setdefault(step_key, []).extend(chunks)
        self.hashes += other.hashes
        self._add_counts(other)
        self.last = other.last if other.last is not None else other.first  # (not joined: see above)
        return self

    def _add_counts(self, other: _Piece) -> None:
        for step_key, count in other.omitted.items():
            self.omitted[step_key] = self.omitted.get(step_key, 0) + count

    def finish(self) -> None:
        """The whole input: its first and last prompts are complete too."""
        if self.last is not None:
            self.close(self.last)
            self.last = None
        self.close(self.first, in_front=True)

    def has_repeated_key(self) -> bool:
        """Whether a prompt closed twice (its rows in two places, e.g. two files): a key hash seen twice."""
        hashes = np.sort(np.concatenate(self.hashes)) if self.hashes else np.empty(0, dtype=np.uint64)
        return bool(np.any(hashes[1:] == hashes[:-1]))

    def __getstate__(self) -> dict:  # what goes back to the driver: the accumulators' statistics, no buffers
        for accumulator in self.accumulators.values():
            accumulator.stats  # noqa: B018 (reduces what the accumulator buffers)
        return self.__dict__


def _chunk_statistics(proxy: Any, true: Any, ns: list[int] | None) -> dict:
    """Prompts' estimates on the grid of their largest N (every n of the step's grid they reach)
    and their tail agreement (when they have one N)."""
    dense = isinstance(proxy, np.ndarray)
    lengths = {proxy.shape[1]} if dense else {len(row) for row in proxy}
    largest = max(lengths)
    grid = default_ns(largest) if ns is None else np.array(sorted({n for n in ns if n <= largest}), dtype=np.int64)
    true_pp, proxy_pp = prompt_estimates(proxy, true, grid)
    agreement = None
    if len(lengths) == 1:
        try:
            agreement = topq_agreement(np.asarray(proxy).reshape(-1, largest), np.asarray(true).reshape(-1, largest))
        except ValueError:  # fewer than 4 samples per prompt
            agreement = None
    return {
        "grid": grid,
        "true": true_pp,
        "proxy": proxy_pp,
        "lengths": (min(lengths), largest),
        "agreement": agreement,
    }


def _batch_piece(
    batch: ScoreBatch,
    ns: list[int] | None,
    statistics: bool,
    accumulators: dict[tuple[Any, int], CurveAccumulator] | None = None,
) -> _Piece:
    """One batch of rows as a :class:`_Piece`; :class:`_Scattered` when a prompt's rows are not contiguous in it.

    ``accumulators``: the ones to add its prompts to (those of the file's piece so far, so that
    they are reduced in chunks of ``chunk_samples`` samples, as the single process does, not batch by batch).
    """
    starts, ends = _segments(batch)
    runs = None if batch.run is None else batch.run[starts]
    steps = np.zeros(len(starts), dtype=np.int64) if batch.step is None else batch.step[starts]
    hashes = _key_hashes(runs, steps, batch.prompt[starts])
    ordered = np.argsort(hashes, kind="stable")
    repeated = np.flatnonzero(hashes[ordered][1:] == hashes[ordered][:-1])
    if repeated.size:
        raise _Scattered(_key_at(batch, int(starts[ordered[repeated[0] + 1]])))

    def open_prompt(i: int) -> _OpenPrompt:
        rows = slice(int(starts[i]), int(ends[i]))
        return _OpenPrompt(_key_at(batch, int(starts[i])), [batch.proxy[rows]], [batch.true[rows]])

    piece = _Piece(open_prompt(0), open_prompt(len(starts) - 1) if len(starts) > 1 else None, ns, statistics)
    if accumulators is not None:
        piece.accumulators = accumulators
    if batch.omitted:  # the reader dropped them from this batch: counted at the step of its first row
        first_key = piece.first.key
        piece.omitted[(first_key[0], first_key[1])] = batch.omitted
    inner = slice(1, len(starts) - 1)  # complete prompts: the batch holds rows on both sides of them
    if len(starts) <= 2:
        return piece
    at, lengths = starts[inner], ends[inner] - starts[inner]
    cut = steps[inner][1:] != steps[inner][:-1]
    if runs is not None:
        cut |= runs[inner][1:] != runs[inner][:-1]
    bounds = np.concatenate(([0], np.flatnonzero(cut) + 1, [len(at)]))
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        step_key = (None if runs is None else runs[1 + a], int(steps[1 + a]))
        lo, hi = int(at[a]), int(at[b - 1] + lengths[b - 1])
        N = int(lengths[a])
        if bool(np.all(lengths[a:b] == N)):
            proxy: Any = batch.proxy[lo:hi].reshape(b - a, N)
            true: Any = batch.true[lo:hi].reshape(b - a, N)
        else:
            cuts = (at[a + 1 : b] - lo).tolist()
            proxy, true = np.split(batch.proxy[lo:hi], cuts), np.split(batch.true[lo:hi], cuts)
        piece.add_block(step_key, proxy, true, hashes[1 + a : 1 + b])
    return piece


def _file_piece(
    path: str,
    columns: Columns,
    fmt: str | None,
    nan_policy: str,
    preset: str | None,
    ns: list[int] | None,
    statistics: bool,
    batch_rows: int,
) -> tuple[_Piece | _Scattered | None, int]:
    """One file read with the single-process reader and reduced batch by batch (a Ray task): its
    :class:`_Piece` (None without rows), or the :class:`_Scattered` key that shows the input is not
    grouped; and the rows dropped (``nan_policy="omit"``) that no step of the piece holds."""
    from bon_tracker.analysis import verl_dumps
    from bon_tracker.analysis.score_files import read_score_batches

    reader = verl_dumps.read_dump_batches if preset == "verl" else read_score_batches
    whole: _Piece | None = None
    stray = 0  # dropped rows of batches with no row left: counted with the next batch's
    try:
        for batch in reader(path, columns, fmt=fmt, nan_policy=nan_policy, batch_rows=batch_rows):
            if len(batch) == 0:
                stray += batch.omitted
                continue
            batch.omitted += stray
            stray = 0
            piece = _batch_piece(batch, ns, statistics, None if whole is None else whole.accumulators)
            whole = piece if whole is None else whole.extend(piece)
    except _Scattered as scattered:
        return scattered, 0
    return whole, stray


def _grouped_piece(
    files: Sequence[Path],
    columns: Columns,
    fmt: str | None,
    nan_policy: str,
    preset: str | None,
    ns: list[int] | None,
    statistics: bool,
    batch_rows: int,
) -> tuple[_Piece | None, tuple | None, int]:
    """Every file reduced by a Ray task of its own, and the pieces joined in file order on the driver:
    ``(piece, None, stray omitted)`` for grouped input (the piece finished), ``(None, key, 0)`` for input
    whose prompts are not contiguous (``key``: the first found out of place, or None when only the
    hashes of the keys show it). Raises :class:`ScoreFileError` when no file holds a row."""
    ray = require("ray", "ray")
    task = ray.remote(num_cpus=1)(_file_piece)
    refs = [task.remote(str(path), columns, fmt, nan_policy, preset, ns, statistics, batch_rows) for path in files]
    try:
        results = ray.get(refs)
    except ray.exceptions.RayTaskError as err:  # the reader's own message, not a remote traceback
        if isinstance(err.cause, ScoreFileError):
            raise ScoreFileError(str(err.cause)) from None
        raise
    whole: _Piece | None = None
    stray = 0
    for piece, dropped in results:
        if isinstance(piece, _Scattered):
            return None, piece.key, 0
        stray += dropped
        if piece is not None:
            whole = piece if whole is None else whole.extend(piece)
    if whole is None:
        dropped = f" ({stray:,} dropped by nan_policy='omit')" if stray else ""
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}{dropped}")
    whole.finish()
    if whole.has_repeated_key():
        return None, None, 0
    return whole, None, stray


def step_curve(stats: CurveStats, ns: Sequence[int] | None = None):
    """The curve of merged statistics on the step's grid (the default grid of its largest N, or ``ns``)."""
    if stats.n_prompts == 0 or stats.N == 0:
        raise ScoreFileError("no samples: every score was dropped")
    if ns is None:
        return curve_stats_compute(stats, default_ns(stats.N))
    too_big = sorted({int(n) for n in ns if n > stats.N})
    if too_big:
        raise ScoreFileError(
            f"ns {too_big} exceed the largest number of samples per prompt ({stats.N}); lower them or sample more"
        )
    return curve_stats_compute(stats, np.asarray(list(ns), dtype=np.int64))


def _input_format(files: Sequence[str | Path], fmt: str | None) -> str:
    fmts = {fmt or detect_format(path) for path in files}
    if len(fmts) != 1 or fmts & {"csv"}:
        raise ScoreFileError(f"the Ray engine reads Parquet or JSONL files of one format, got {sorted(fmts)}")
    return fmts.pop()


def _dataset(files: Sequence[str | Path], columns: Columns, fmt: str) -> tuple[Any, set[str], bool]:
    ray_data = require("ray.data", "ray")
    # Ray's workers do not share this process's working directory: local paths go absolute (URIs as they are).
    paths = [_absolute(path) for path in files]
    parquet = fmt == "parquet"
    dataset = ray_data.read_parquet(paths) if parquet else ray_data.read_json(paths, lines=True)
    names = set(dataset.schema().names)
    missing = [c for c in (columns.prompt, columns.proxy, columns.true) if c not in names]
    optional = ((columns.step, columns.require_step), (columns.run, columns.require_run))
    missing += [c for c, required in optional if required and c not in names]
    if missing:
        raise ScoreFileError(f"no column {missing[0]!r} in {paths[0]} (the columns are {sorted(names)})")
    return dataset, names, not parquet


def _absolute(path: str | Path) -> str:
    return str(path) if "://" in str(path) else str(Path(path).absolute())


def ray_curves(
    files: Sequence[str | Path],
    columns: Columns | None = None,
    *,
    ns: Sequence[int] | None = None,
    nan_policy: NanPolicy = "raise",
    fmt: str | None = None,
    preset: str | None = None,
    buckets: int = DEFAULT_BUCKETS,
    statistics: bool = False,
    progress: bool | None = None,
    shuffle: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> tuple[RunSteps, dict[str, Any]]:
    """Best-of-n curves per run and step of Parquet or JSONL score files, computed on a Ray cluster.

    Uses the Ray cluster this process is connected to (``ray.init()`` first, or Ray starts a
    local one). Same arguments and result as :func:`~bon_tracker.analysis.grouping.curves_from_batches`
    on the same files: ``({run: {step: BonCurve}}, info)`` with ``info`` holding ``prompts``,
    ``samples`` and ``omitted`` per (run, step), the total ``rows``, ``grouped`` (whether each
    prompt's rows were found contiguous; None for URIs and ``shuffle=True``, which do not look) and
    ``path``: ``"blocks"`` or ``"shuffle"`` (below); runs in name order. Only ``columns.proxy`` and
    ``columns.true`` are read (no texts, ensemble members or further true rewards).
    ``preset="verl"`` reads verl's validation dumps (:mod:`bon_tracker.analysis.verl_dumps`).

    Local files are first read by one Ray task per file with the single-process reader and reduced
    where they lie (``path="blocks"``); that holds when each prompt's rows are contiguous, as in
    verl's dumps and sorted files, and is found out in the same pass. Otherwise (a prompt's rows
    scattered, URIs, or ``shuffle=True``) Ray Data groups the rows by (run, step, bucket) with a
    shuffle (``path="shuffle"``), a bucket being one of ``buckets`` groups of whole prompts.

    ``statistics=True`` also returns, per (run, step), ``info["estimates"]``: the prompts'
    per-prompt estimates ``(true, proxy)``, each ``(P, len(curve.n))`` (:func:`prompt_estimates`),
    prompts in input order (``"blocks"``, as the single-process engine) or in id order
    (``"shuffle"``), and ``info["agreement"]``: the tail agreement of every prompt (None unless every
    prompt has the same N >= 4). ``progress=False`` silences Ray's progress bars and INFO lines
    during the call (True shows the bars; None, the default, leaves Ray's settings). ``batch_rows``:
    the rows a task reads at a time (``"blocks"``; bounds a worker's memory). The path taken
    is said on the ``bon_tracker`` logger at INFO (``bon-tracker -v analyze``).
    """
    check_nan_policy(nan_policy)
    columns = replace(columns or Columns(), prompt_text=None, completion=None, more_proxy=(), more_true=())
    fmt = _input_format(files, fmt)
    grid = None if ns is None else [int(n) for n in ns]
    with _ray_output(progress):
        why, grouped = ("shuffle=True" if shuffle else None), None  # grouped: None while not looked at
        if why is None and any("://" in str(path) for path in files):
            why = "remote files (URIs) are read by Ray Data"
        if why is None:
            paths = [Path(_absolute(path)) for path in files]
            piece, scattered, stray = _grouped_piece(
                paths, columns, fmt, nan_policy, preset, grid, statistics, max(1, int(batch_rows))
            )
            if piece is not None:
                logger.info(
                    "bon_tracker: Ray engine: the rows of each prompt are contiguous, so the %d file%s %s reduced "
                    "where they lie (one Ray task per file, no shuffle)",
                    len(files),
                    "" if len(files) == 1 else "s",
                    "was" if len(files) == 1 else "were",
                )
                merged, extras = _piece_results(piece, stray)
                return _result(merged, extras, ns, statistics, files, grouped=True, by_id=False)
            why = f"the rows of {'a prompt' if scattered is None else _where(scattered)} are not contiguous"
            grouped = False
        logger.info("bon_tracker: Ray engine: %s, so the rows are grouped by a Ray Data shuffle", why)
        merged, extras = _shuffled(files, columns, fmt, preset, buckets, grid, nan_policy, statistics)
        return _result(merged, extras, ns, statistics, files, grouped=grouped, by_id=True)


def _where(key: tuple[Any, int, Any]) -> str:
    run, step, prompt = key
    return f"prompt {prompt!r} at step {step}" + ("" if run is None else f" of run {run!r}")


def _piece_results(piece: _Piece, stray: int) -> tuple[dict[tuple[Any, int], tuple[CurveStats, int]], dict]:
    """The finished piece as per-(run, step) statistics, omitted counts and estimates."""
    merged = {key: (accumulator.stats, piece.omitted.get(key, 0)) for key, accumulator in piece.accumulators.items()}
    if stray:  # dropped rows with no step to count them at: the first step's
        first = next(iter(merged))
        merged[first] = (merged[first][0], merged[first][1] + stray)
    return merged, piece.estimates


def _shuffled(
    files: Sequence[str | Path],
    columns: Columns,
    fmt: str,
    preset: str | None,
    buckets: int,
    grid: list[int] | None,
    nan_policy: str,
    statistics: bool,
) -> tuple[dict[tuple[Any, int], tuple[CurveStats, int]], dict]:
    """Statistics per (run, step) through Ray Data: rows grouped by (run, step, bucket) with a shuffle."""
    dataset, names, text_ids = _dataset(files, columns, fmt)
    has_step, has_run = columns.step in names, columns.run in names
    wanted = [c for c in (columns.prompt, columns.proxy, columns.true) if c]
    wanted += [c for c, present in ((columns.step, has_step), (columns.run, has_run)) if present]
    normalised = dataset.select_columns(list(dict.fromkeys(wanted))).map_batches(
        _normalised,
        batch_format="numpy",
        fn_kwargs={
            "columns": columns,
            "has_step": has_step,
            "has_run": has_run,
            "text_ids": text_ids,
            "verl": preset == "verl",
            "buckets": int(buckets),
        },
    )
    per_bucket = normalised.groupby(list(_KEYS)).map_groups(
        _per_bucket, batch_format="numpy", fn_kwargs={"ns": grid, "nan_policy": nan_policy, "statistics": statistics}
    )
    extras: dict[tuple[str, int], list[dict]] = {}
    merged = _merged(per_bucket.iter_batches(batch_format="numpy", batch_size=None), extras)
    if has_run:
        return merged, extras
    return {(None, step): value for (_, step), value in merged.items()}, {
        (None, step): value for (_, step), value in extras.items()
    }


def _result(
    merged: dict[tuple[Any, int], tuple[CurveStats, int]],
    extras: dict[tuple[Any, int], list[dict]],
    ns: Sequence[int] | None,
    statistics: bool,
    files: Sequence[str | Path],
    *,
    grouped: bool | None,
    by_id: bool,
) -> tuple[RunSteps, dict[str, Any]]:
    """Curves and ``info`` of the statistics per (run, step) (run None without a run column)."""
    if not merged:
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}")
    out: RunSteps = {}
    info: dict[str, Any] = {
        "grouped": grouped,
        "path": "shuffle" if by_id else "blocks",
        "prompts": {},
        "samples": {},
        "omitted": {},
    }
    if statistics:
        info["estimates"], info["agreement"] = {}, {}
    for run, step in sorted(merged, key=lambda key: ("" if key[0] is None else str(key[0]), key[1])):
        stats, omitted = merged[(run, step)]
        try:
            out.setdefault(run, {})[step] = step_curve(stats, ns)
        except ScoreFileError as err:
            where = f"step {step}" + ("" if run is None else f" of run {run!r}")
            raise ScoreFileError(f"{where}: {err}") from None
        info["prompts"][(run, step)] = stats.n_prompts
        info["samples"][(run, step)] = stats.n_samples
        info["omitted"][(run, step)] = omitted
        if statistics:
            true_pp, proxy_pp, agreement = _step_statistics(extras.get((run, step), []), out[run][step].n)
            info["estimates"][(run, step)] = (true_pp, proxy_pp)
            info["agreement"][(run, step)] = agreement
    info["rows"] = sum(info["samples"].values()) + sum(info["omitted"].values())
    return out, info
