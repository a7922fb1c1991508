"""Best-of-n curves of score dumps larger than one machine, with Ray Data.

Ray Data reads the Parquet or JSONL files in parallel and groups the rows by (run, step, bucket),
a bucket being a stable hash of the prompt id, so each group holds whole prompts. A worker
reduces a group's prompts with the core's :class:`~bon_tracker.core.CurveAccumulator` (the same
all-subsets estimates, KL and per-n sums as :func:`~bon_tracker.bon_curve`) to mergeable
statistics; the driver merges them per (run, step) (:func:`~bon_tracker.core.merge_curve_stats`)
and computes each step's curve with :func:`~bon_tracker.core.curve_stats_compute`. The curves, and
the fits built on them, are the single-process ``bon-tracker analyze`` result up to float
summation order (< 1e-12). What reaches the driver is one set of per-n sums per step and bucket.

>>> from bon_tracker.analysis.ray_engine import ray_curves  # doctest: +SKIP
>>> curves, info = ray_curves(["s3://bucket/dump/"], Columns(prompt="uid", true="gold"))  # doctest: +SKIP
"""

from __future__ import annotations

import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.analysis.grouping import RunSteps
from bon_tracker.analysis.score_files import Columns, ScoreFileError, detect_format
from bon_tracker.analysis.verl_dumps import sample_keys
from bon_tracker.core import CurveAccumulator, CurveStats, curve_stats_compute, default_ns, merge_curve_stats
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


def _per_bucket(group: dict[str, np.ndarray], ns: list[int] | None, nan_policy: str) -> dict[str, np.ndarray]:
    """Every row of the prompts of one (run, step, bucket) -> one row: their pickled statistics
    (a :class:`~bon_tracker.core.CurveAccumulator` over the prompts) and the samples omitted."""
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
    for rows in np.split(order, np.flatnonzero(np.diff(codes[order])) + 1):
        accumulator.add_prompt(group["proxy"][rows], group["true"][rows])
    return {
        "run": _object_column([run]),
        "step": np.array([step], dtype=np.int64),
        "stats": _object_column([pickle.dumps(accumulator.stats)]),
        "omitted": np.array([int((~finite).sum())], dtype=np.int64),
    }


def _output_index(keys: np.ndarray) -> np.ndarray:
    return np.array([int(str(key).rsplit("_", 1)[1]) if str(key).rsplit("_", 1)[-1].isdigit() else 0 for key in keys])


def _merged(parts: Any) -> dict[tuple[str, int], tuple[CurveStats, int]]:
    """Statistics and omitted counts merged per (run, step) over batches of rows."""
    merged: dict[tuple[str, int], tuple[CurveStats, int]] = {}
    for batch in parts:
        for run, step, blob, omitted in zip(batch["run"], batch["step"], batch["stats"], batch["omitted"]):
            key = (str(run), int(step))
            stats = pickle.loads(blob)
            if key in merged:
                total, dropped = merged[key]
                merged[key] = (merge_curve_stats(total, stats), dropped + int(omitted))
            else:
                merged[key] = (stats, int(omitted))
    return merged


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
    paths = [str(path) for path in files]
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
) -> tuple[RunSteps, dict[str, Any]]:
    """Best-of-n curves per run and step of Parquet or JSONL score files, computed with Ray Data.

    Uses the Ray cluster this process is connected to (``ray.init()`` first, or Ray starts a
    local one). Same arguments and result as :func:`~bon_tracker.analysis.grouping.curves_from_batches`
    on the same files: ``({run: {step: BonCurve}}, info)`` with ``info`` holding ``prompts``,
    ``samples`` and ``omitted`` per (run, step) and the total ``rows``; runs in name order.
    ``preset="verl"`` reads verl's validation dumps (:mod:`bon_tracker.analysis.verl_dumps`)
    whose rows hold their step. Each step's prompts are split into ``buckets`` groups of whole
    prompts (by a stable hash of the prompt id): one worker call reduces one group.
    """
    check_nan_policy(nan_policy)
    columns = columns or Columns()
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
        _per_bucket, batch_format="numpy", fn_kwargs={"ns": grid, "nan_policy": nan_policy}
    )
    merged = _merged(per_bucket.iter_batches(batch_format="numpy", batch_size=None))
    if not merged:
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}")

    out: RunSteps = {}
    info: dict[str, Any] = {"grouped": True, "prompts": {}, "samples": {}, "omitted": {}}
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
    info["rows"] = sum(info["samples"].values()) + sum(info["omitted"].values())
    return out, info
