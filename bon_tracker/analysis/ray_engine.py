"""Best-of-n curves of score dumps larger than one machine, with Ray Data.

Ray Data reads the Parquet or JSONL files in parallel and groups the rows by (run, step, bucket),
a bucket being a stable hash of the prompt id, so each group holds whole prompts. A worker
reduces a group's prompts with the core's :class:`~bon_tracker.core.CurveAccumulator` (the same
all-subsets estimates, KL and per-n sums as :func:`~bon_tracker.bon_curve`) to mergeable
statistics; the driver merges them per (run, step) (:func:`~bon_tracker.core.merge_curve_stats`)
and computes each step's curve with :func:`~bon_tracker.core.curve_stats_compute`. The curves, and
the fits built on them, are the single-process ``bon-tracker analyze`` result up to float
summation order (< 1e-12). What reaches the driver is one set of per-n sums per step and bucket;
with ``statistics=True`` also each prompt's best-of-n estimates (2 x 8 bytes per n of the grid
and prompt) and each bucket's tail agreement, from which the driver's caller computes the
Goodhart interval, the predictions and the alerts as the tracker does
(:func:`prompt_estimates`, :func:`merge_agreements`).

Prompt order: the interval and the predictions resample prompts with a fixed seed, so their
bounds depend on the order of the prompts. Here prompts are in id order (numeric for integer
ids, else as text); the single-process engine keeps the order of the input. The bounds of
the two engines then differ by resampling noise, as two seeds would; the curves and fits do
not. The agreement averages every prompt of a step here (the tracker and the single-process
engine average an evenly spaced subset of 2,048 beyond that many).

>>> from bon_tracker.analysis.ray_engine import ray_curves  # doctest: +SKIP
>>> curves, info = ray_curves(["s3://bucket/dump/"], Columns(prompt="uid", true="gold"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.analysis.grouping import RunSteps
from bon_tracker.analysis.score_files import Columns, ScoreFileError, detect_format
from bon_tracker.analysis.verl_dumps import sample_keys
from bon_tracker.core import (
    CurveAccumulator,
    CurveStats,
    TopAgreement,
    bon_estimate,
    curve_stats_compute,
    default_ns,
    merge_curve_stats,
    topq_agreement,
)
from bon_tracker.core.validation import NanPolicy, check_nan_policy
from bon_tracker.optional import require

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
    if P and cols.size:
        true_pp[:, cols] = bon_estimate(proxy, true, grid[cols])
        proxy_pp[:, cols] = bon_estimate(proxy, proxy, grid[cols])
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
    """One bucket's per-prompt estimates (on the grid of its largest N: every n of the step's grid
    that these prompts reach) and its tail agreement (when its prompts have one N), pickled."""
    lengths = {len(row) for row in proxy}
    largest = max(lengths)
    grid = default_ns(largest) if ns is None else np.array(sorted({n for n in ns if n <= largest}), dtype=np.int64)
    rows_p: Any = np.stack(proxy) if len(lengths) == 1 else proxy
    rows_t: Any = np.stack(true) if len(lengths) == 1 else true
    true_pp, proxy_pp = prompt_estimates(rows_p, rows_t, grid)
    agreement = None
    if len(lengths) == 1:
        try:
            agreement = topq_agreement(rows_p, rows_t)
        except ValueError:  # fewer than 4 samples per prompt
            agreement = None
    return pickle.dumps(
        {
            "ids": ids,
            "grid": grid,
            "true": true_pp,
            "proxy": proxy_pp,
            "lengths": (min(lengths), largest),
            "agreement": agreement,
        }
    )


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
    """The buckets' estimates of one step on the step's grid, prompts in id order, and the agreement."""
    ids = [i for part in parts for i in part["ids"]]
    true_pp = np.full((len(ids), len(grid)), np.nan)
    proxy_pp = np.full((len(ids), len(grid)), np.nan)
    row = 0
    for part in parts:
        k = len(part["ids"])
        src = np.flatnonzero(np.isin(part["grid"], grid))
        dst = np.searchsorted(grid, part["grid"][src])
        true_pp[row : row + k, dst] = part["true"][:, src]
        proxy_pp[row : row + k, dst] = part["proxy"][:, src]
        row += k
    order = _id_order(ids)
    one_n = len({n for part in parts for n in part["lengths"]}) == 1  # every prompt of the step has one N
    agreement = merge_agreements([part["agreement"] for part in parts]) if one_n else None
    return true_pp[order], proxy_pp[order], agreement


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


def _dataset(files: Sequence[str | Path], columns: Columns, fmt: str | None) -> tuple[Any, set[str], bool]:
    ray_data = require("ray.data", "ray")
    fmts = {fmt or detect_format(path) for path in files}
    if len(fmts) != 1 or fmts & {"csv"}:
        raise ScoreFileError(f"the Ray engine reads Parquet or JSONL files of one format, got {sorted(fmts)}")
    # Ray's workers do not share this process's working directory: local paths go absolute (URIs as they are).
    paths = [str(path) if "://" in str(path) else str(Path(path).absolute()) for path in files]
    parquet = fmts == {"parquet"}
    dataset = ray_data.read_parquet(paths) if parquet else ray_data.read_json(paths, lines=True)
    names = set(dataset.schema().names)
    missing = [c for c in (columns.prompt, columns.proxy, columns.true) if c not in names]
    optional = ((columns.step, columns.require_step), (columns.run, columns.require_run))
    missing += [c for c, required in optional if required and c not in names]
    if missing:
        raise ScoreFileError(f"no column {missing[0]!r} in {paths[0]} (the columns are {sorted(names)})")
    return dataset, names, fmts != {"parquet"}


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
) -> tuple[RunSteps, dict[str, Any]]:
    """Best-of-n curves per run and step of Parquet or JSONL score files, computed with Ray Data.

    Uses the Ray cluster this process is connected to (``ray.init()`` first, or Ray starts a
    local one). Same arguments and result as :func:`~bon_tracker.analysis.grouping.curves_from_batches`
    on the same files: ``({run: {step: BonCurve}}, info)`` with ``info`` holding ``prompts``,
    ``samples`` and ``omitted`` per (run, step) and the total ``rows``; runs in name order.
    ``preset="verl"`` reads verl's validation dumps (:mod:`bon_tracker.analysis.verl_dumps`)
    whose rows hold their step. Each step's prompts are split into ``buckets`` groups of whole
    prompts (by a stable hash of the prompt id): one worker call reduces one group.

    ``statistics=True`` also returns, per (run, step), ``info["estimates"]``: the prompts'
    per-prompt estimates ``(true, proxy)``, each ``(P, len(curve.n))``, prompts in id order
    (:func:`prompt_estimates`), and ``info["agreement"]``: the tail agreement of every prompt
    (None unless every prompt has the same N >= 4). ``progress=False`` silences Ray's progress
    bars and INFO lines during the call (True shows the bars; None, the default, leaves Ray's settings).
    """
    check_nan_policy(nan_policy)
    columns = columns or Columns()
    with _ray_output(progress):
        return _ray_curves(files, columns, ns, nan_policy, fmt, preset, buckets, statistics)


def _ray_curves(
    files: Sequence[str | Path],
    columns: Columns,
    ns: Sequence[int] | None,
    nan_policy: NanPolicy,
    fmt: str | None,
    preset: str | None,
    buckets: int,
    statistics: bool,
) -> tuple[RunSteps, dict[str, Any]]:
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
    grid = None if ns is None else [int(n) for n in ns]
    per_bucket = normalised.groupby(list(_KEYS)).map_groups(
        _per_bucket, batch_format="numpy", fn_kwargs={"ns": grid, "nan_policy": nan_policy, "statistics": statistics}
    )
    extras: dict[tuple[str, int], list[dict]] = {}
    merged = _merged(per_bucket.iter_batches(batch_format="numpy", batch_size=None), extras)
    if not merged:
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}")

    out: RunSteps = {}
    info: dict[str, Any] = {"grouped": True, "prompts": {}, "samples": {}, "omitted": {}}
    if statistics:
        info["estimates"], info["agreement"] = {}, {}
    for run_name, step in sorted(merged):
        run = run_name if has_run else None
        stats, omitted = merged[(run_name, step)]
        try:
            out.setdefault(run, {})[step] = step_curve(stats, ns)
        except ScoreFileError as err:
            where = f"step {step}" + ("" if run is None else f" of run {run!r}")
            raise ScoreFileError(f"{where}: {err}") from None
        info["prompts"][(run, step)] = stats.n_prompts
        info["samples"][(run, step)] = stats.n_samples
        info["omitted"][(run, step)] = omitted
        if statistics:
            true_pp, proxy_pp, agreement = _step_statistics(extras.get((run_name, step), []), out[run][step].n)
            info["estimates"][(run, step)] = (true_pp, proxy_pp)
            info["agreement"][(run, step)] = agreement
    info["rows"] = sum(info["samples"].values()) + sum(info["omitted"].values())
    return out, info
