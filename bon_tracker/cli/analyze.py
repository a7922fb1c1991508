"""``bon-tracker analyze``: score files -> curves, Goodhart point, a run folder, a tracking run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bon_tracker.analysis.score_files import (
    FORMATS,
    Columns,
    ScoreBatch,
    ScoreFileError,
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
    logger,
)
from bon_tracker.optional import MissingDependencyError
from bon_tracker.record import EvalRecord
from bon_tracker.reports.compare import write_run_report
from bon_tracker.tracking.config import TrackerConfig

# ---- analyze ------------------------------------------------------------------------------------------------


def _open_batches(
    files: Sequence[Path],
    columns: Columns,
    fmt: str | None,
    nan_policy: str,
    batch_rows: int,
    progress: _Progress,
    counts: dict[str, int],
    reader: Callable[..., Iterator[ScoreBatch]] = read_score_batches,
) -> Iterator[ScoreBatch]:
    counts["rows"] = counts["omitted"] = 0
    for path in files:
        pending = [0]
        batches = reader(
            path,
            columns,
            fmt=fmt,
            nan_policy=nan_policy,
            batch_rows=batch_rows,
            progress=lambda nbytes, pending=pending: pending.__setitem__(0, nbytes),
        )
        for batch in batches:
            counts["rows"] += len(batch)
            counts["omitted"] += batch.omitted
            progress.update(pending[0], len(batch))
            pending[0] = 0
            yield batch
        progress.update(pending[0])


def _deliver(config: TrackerConfig, name: str, records: Sequence[EvalRecord]) -> dict[str, Any]:
    """Log records to the configured backend through a tracker: the same write-ahead log and
    delivery as training. Returns what reached the backend and what waits in the log."""
    from bon_tracker.tracking.tracker import BonTracker

    options = {**config.backend_options(), "run_name": name}
    try:
        tracker = BonTracker(
            config.backend,
            key_prefix=config.key_prefix,
            spool_dir=config.spool_dir,
            finish_timeout=config.finish_timeout,
            **options,
        )
    except (TypeError, ValueError) as err:  # ConfigurationError is a ValueError
        raise UsageError(f"cannot set up the {config.backend} backend: {err}") from None
    for record in records:
        tracker.log_record(record)
    tracker.finish()
    stats = tracker.delivery_stats
    left = len(records) - stats.delivered - stats.dead_lettered
    return {
        "name": config.backend,
        "run_id": tracker.backend.run_id,
        "delivered": stats.delivered,
        "dead_lettered": stats.dead_lettered,
        "spooled": left,
        "spool": str(tracker.wal_path) if left else None,
        "error": stats.config_error or (stats.last_error if left else None),
    }


def _cmd_analyze(args: argparse.Namespace) -> int:
    from bon_tracker.analysis.grouping import curves_from_batches
    from bon_tracker.backends.local import LocalBackend, default_root

    config = _config(args)
    files = [Path(f) for f in args.files]
    reader: Callable[..., Iterator[ScoreBatch]] = read_score_batches
    if args.preset == "verl":  # verl's trainer.validation_data_dir dumps, as they are
        from bon_tracker.analysis import verl_dumps

        files = verl_dumps.dump_files(args.files)
        reader = verl_dumps.read_dump_batches
    for path in files:
        if not path.is_file():
            raise ScoreFileError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
        if args.format is None:
            detect_format(path)
    columns = Columns(
        prompt=args.prompt_col,
        proxy=args.proxy_col,
        true=args.true_col,
        step=args.step_col or "step",
        run=args.run_col or "run",
        require_step=args.step_col is not None,
        require_run=args.run_col is not None,
    )
    if args.preset == "verl":
        columns = verl_dumps.dump_columns(files[0], args.true_col)
    total = sum(p.stat().st_size for p in files)
    enabled = not args.quiet and sys.stderr.isatty()
    counts: dict[str, int] = {}
    bars: list[_Progress] = []

    def open_batches() -> Iterator[ScoreBatch]:
        for bar in bars:
            bar.close()
        bars.append(_Progress(total, "reading" if len(bars) == 0 else "re-reading", enabled))
        return _open_batches(files, columns, args.format, config.nan_policy, args.batch_rows, bars[-1], counts, reader)

    def on_ungrouped(key: tuple) -> None:
        run, step, prompt = key
        where = f"prompt {prompt!r} at step {step}" + ("" if run is None else f" of run {run!r}")
        logger.warning(
            "bon_tracker: the rows of %s are not contiguous, so the input is read again with every row "
            "buffered (about 20-40 bytes per row); sort it by step and prompt to stream it in constant memory",
            where,
        )

    try:
        if args.engine == "ray":  # Ray Data: the cluster ray.init() finds ($RAY_ADDRESS), else a local one
            from bon_tracker.analysis.ray_engine import ray_curves

            curves, info = ray_curves(
                files, columns, ns=config.ns, nan_policy=config.nan_policy, fmt=args.format, preset=args.preset
            )
            counts.update(rows=info["rows"], omitted=sum(info["omitted"].values()))
        else:
            curves, info = curves_from_batches(open_batches, ns=config.ns, on_ungrouped=on_ungrouped)
    finally:
        for bar in bars:
            bar.close()
    if not curves:
        dropped = f" ({counts['omitted']:,} dropped by --nan-policy omit)" if counts.get("omitted") else ""
        raise ScoreFileError(f"no samples in {', '.join(str(f) for f in files)}{dropped}")

    base = config.run_name or _file_stem(files[0])
    explicit_name = config.run_name is not None
    out_root = Path(args.out) if args.out else Path(config.local.get("root") or default_root())
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
        records = [EvalRecord.build(step, curve, key_prefix=config.key_prefix) for step, curve in steps.items()]
        local = LocalBackend(root=out_root, run_name=_safe_name(name), charts=False)
        for record in records:
            local.log_eval(record)
        local.finish()
        run_dir = local.run_dir
        assert run_dir is not None
        report = run_dir / "report.html"
        if draw:
            try:
                report = write_run_report(records, run_dir, title=name, **names)
            except MissingDependencyError as err:
                logger.warning("bon_tracker: no charts in the report: %s", err)
        entry: dict[str, Any] = {
            "name": name,
            "run_dir": str(run_dir),
            "report": str(report),
            "steps": [_step_summary(r, info, run) for r in records],
        }
        if config.backend != "local":
            entry["backend"] = _deliver(config, name, records)
            if entry["backend"]["spooled"] or entry["backend"]["dead_lettered"]:
                exit_code = EXIT_PENDING
        summary["runs"].append(entry)
    _print_analyze_summary(summary, args.json, files)
    return exit_code


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
    }


def _print_analyze_summary(summary: dict[str, Any], as_json: bool, files: Sequence[Path]) -> None:
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    omitted = f", {summary['omitted']:,} non-finite samples omitted" if summary["omitted"] else ""
    print(f"read {summary['rows']:,} samples from {len(files)} file{'s' if len(files) != 1 else ''}{omitted}")
    for run in summary["runs"]:
        print(f"run {run['name']!r}: {len(run['steps'])} eval step{'s' if len(run['steps']) != 1 else ''}")
        for s in run["steps"][-5:]:
            goodhart = s["goodhart"]  # the report's wording: n* = 1, "beyond n = ...", "not resolved"
            true1 = f"true@1 {s['true@1']:.4g}, " if s["true@1"] is not None else ""
            print(
                f"  step {s['step']}: {s['prompts']:,} prompts, N={s['N']}; {true1}"
                f"true@{s['n_max']} {s['true@n_max']:.4g}; {goodhart}"
            )
        if len(run["steps"]) > 5:
            print(f"  ({len(run['steps']) - 5} earlier steps in the report)")
        print(f"  report: {run['report']}")
        backend = run.get("backend")
        if backend:
            print(f"  {backend['name']} run: {backend['run_id']} ({backend['delivered']} records logged)")
            if backend["spool"]:
                print(
                    f"  {backend['spooled']} records could not be logged ({backend['error']}); they are kept in "
                    f"{backend['spool']}; replay them with: bon-tracker sync {backend['spool']}",
                    file=sys.stderr,
                )


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
            "  bon-tracker analyze scores.csv --backend mlflow --tracking-uri sqlite:///mlflow.db "
            "--experiment goodhart\n"
            "  bon-tracker analyze scores.csv --backend wandb --project goodhart --run-name ppo-1\n\n" + EXIT_CODES_HELP
        ),
    )
    analyze.add_argument("files", nargs="+", metavar="FILE", help="score files (read in order, as one table)")
    _add_config(analyze)
    cols = analyze.add_argument_group("columns")
    cols.add_argument(
        "--prompt-col", default="prompt_id", metavar="NAME", help="prompt id column (default: %(default)s)"
    )
    cols.add_argument("--proxy-col", default="proxy", metavar="NAME", help="proxy score column (default: %(default)s)")
    cols.add_argument("--true-col", default="true", metavar="NAME", help="true score column (default: %(default)s)")
    cols.add_argument(
        "--step-col", metavar="NAME", help="training step column (default: 'step' if present, else every row is step 0)"
    )
    cols.add_argument(
        "--run-col", metavar="NAME", help="run column: one run per value (default: 'run' if present, else one run)"
    )
    cols.add_argument("--format", choices=FORMATS, help="input format, if the file names do not tell")
    cols.add_argument(
        "--preset",
        choices=("verl",),
        help="verl: files or folders of verl's trainer.validation_data_dir dumps ({step}.jsonl): "
        "uid -> prompt, score -> proxy, step from the row or the file name; name the true reward with --true-col",
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
        "--nan-policy",
        choices=("raise", "omit"),
        help="non-finite or missing scores: an error (raise, default) or dropped (omit)",
    )
    computing.add_argument("--key-prefix", metavar="PREFIX", help="metric key prefix (config: key_prefix; default bon)")
    output = analyze.add_argument_group("output")
    output.add_argument(
        "--out",
        metavar="DIR",
        help="folder for the run folder and report (default: --root, config local.root, "
        "$BON_TRACKER_DIR, else ./bon_runs)",
    )
    output.add_argument(
        "--run-name",
        metavar="NAME",
        help="run name (default: the first file's name; with a run column, each run's value)",
    )
    output.add_argument("--json", action="store_true", help="print the summary as JSON")
    output.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    output.add_argument("--batch-rows", type=int, default=1 << 16, help=argparse.SUPPRESS)
    backend = analyze.add_argument_group("tracking backend (also log the curves to a run)")
    backend.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        help=f"{', '.join(BACKENDS)} (default local: the run folder only; config: backend)",
    )
    backend.add_argument("--root", metavar="DIR", help="local: folder of run folders (config: local.root)")
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
