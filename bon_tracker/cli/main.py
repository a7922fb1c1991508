"""The ``bon-tracker`` command: analyze score files, compare runs, report, replay spools.

``main(argv)`` returns the exit code (see ``EXIT_*``); the console script passes it to
``sys.exit``. Settings come from the options, then the environment, then a config file
(``--config``, ``$BON_TRACKER_CONFIG`` or ``./bon_tracker.yaml``; see
:mod:`bon_tracker.tracking.config`), then defaults.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
import time
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
from bon_tracker.optional import MissingDependencyError
from bon_tracker.record import EvalRecord
from bon_tracker.reports.compare import RunNotFoundError, resolve_run, write_comparison, write_run_report
from bon_tracker.tracking.config import ConfigError, TrackerConfig, resolve_config
from bon_tracker.version import __version__

logger = logging.getLogger("bon_tracker")

EXIT_OK = 0  # done
EXIT_FAILURE = 1  # a runtime failure: a tracking service, the file system, a bug
EXIT_USAGE = 2  # bad options, config, input file or run reference: fix the command or the input
EXIT_PENDING = 3  # some eval records did not reach the backend; they are spooled: run `bon-tracker sync`
EXIT_MISSING_DEPENDENCY = 4  # an optional dependency is missing: the message names the pip extra
EXIT_INTERRUPTED = 130  # Ctrl-C

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}    success
  {EXIT_FAILURE}    runtime failure (tracking service, file system, unexpected error)
  {EXIT_USAGE}    usage or input error: bad option or config, malformed file or row, unknown run
  {EXIT_PENDING}    some eval records could not be delivered and stay spooled; replay: bon-tracker sync
  {EXIT_MISSING_DEPENDENCY}    a missing optional dependency (the message says which pip extra to install)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
"""


class UsageError(Exception):
    """A problem with the command line that the user must fix (exit code 2)."""


# ---- progress ----------------------------------------------------------------------------------------------


class _Progress:
    """A progress bar over bytes read, on stderr: tqdm when installed, else a plain line.
    Silent when disabled (``--quiet``) or when stderr is not a terminal."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.done, self.rows = total, desc, 0, 0
        self._bar: Any = None
        self._plain = False
        self._last = 0.0
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self._plain = True
            return
        self._bar = tqdm(
            total=total,
            desc=desc,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
        )

    def update(self, nbytes: int, rows: int = 0) -> None:
        self.done += nbytes
        self.rows += rows
        if self._bar is not None:
            self._bar.update(nbytes)
            self._bar.set_postfix_str(f"{self.rows:,} rows", refresh=False)
        elif self._plain and time.monotonic() - self._last > 0.5:
            self._last = time.monotonic()
            percent = 100.0 * self.done / self.total if self.total else 100.0
            print(f"\r{self.desc}: {percent:5.1f}%  {self.rows:,} rows", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._plain:
            print("\r" + " " * (len(self.desc) + 30) + "\r", end="", file=sys.stderr, flush=True)


# ---- shared option handling --------------------------------------------------------------------------------


def _parse_ns(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 1,2,4,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 such as 1,2,4,8, got {text!r}")
    return values


def _config(args: argparse.Namespace, **explicit: Any) -> TrackerConfig:
    """Settings: these options > environment > config file > defaults."""
    sections = {
        "mlflow": {
            "tracking_uri": getattr(args, "tracking_uri", None),
            "experiment": getattr(args, "experiment", None),
        },
        "wandb": {
            "project": getattr(args, "project", None),
            "entity": getattr(args, "entity", None),
            "mode": getattr(args, "wandb_mode", None),
        },
        "local": {"root": getattr(args, "root", None)},
    }
    for name, options in sections.items():
        given = {k: v for k, v in options.items() if v is not None}
        if given:
            explicit[name] = given
    return resolve_config(
        getattr(args, "config", None),
        backend=getattr(args, "backend", None),
        ns=getattr(args, "ns", None),
        key_prefix=getattr(args, "key_prefix", None),
        nan_policy=getattr(args, "nan_policy", None),
        proxy_name=getattr(args, "proxy_name", None),
        true_name=getattr(args, "true_name", None),
        run_name=getattr(args, "run_name", None),
        spool_dir=getattr(args, "spool_dir", None),
        **explicit,
    )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def _file_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz",):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return Path(name).stem or "scores"


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
    c, g = record.curve, record.goodhart
    ns = c.n.tolist()
    return {
        "step": record.step,
        "prompts": info["prompts"][(run, record.step)],
        "samples": info["samples"][(run, record.step)],
        "N": c.N,
        "true@1": float(c.true_mean[ns.index(1)]) if 1 in ns else None,
        "n_max": ns[-1],
        "true@n_max": float(c.true_mean[-1]),
        "proxy@n_max": float(c.proxy_mean[-1]),
        "goodhart_n": None if g is None else g.n,
        "goodhart_kl": None if g is None else g.kl,
        "goodhart_within_range": None if g is None else g.within_range,
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
            goodhart = "no Goodhart point (true reward does not peak)"
            if s["goodhart_n"] is not None:
                goodhart = f"Goodhart point n*≈{s['goodhart_n']:.3g}, KL*≈{s['goodhart_kl']:.3g} nats" + (
                    "" if s["goodhart_within_range"] else " (extrapolated)"
                )
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


# ---- compare and report --------------------------------------------------------------------------------------


def _run_source(args: argparse.Namespace, config: TrackerConfig) -> dict[str, Any]:
    return {
        "tracking_uri": config.mlflow.get("tracking_uri"),
        "experiment": args.experiment,  # only to find runs by name: not the config's default experiment
        "key_prefix": config.key_prefix,
    }


def _cmd_compare(args: argparse.Namespace) -> int:
    config = _config(args)
    source = _run_source(args, config)
    runs = [resolve_run(ref, **source) for ref in args.runs]
    report = write_comparison(
        runs,
        Path(args.out),
        step=args.step,
        n=args.n,
        sqrt_kl=args.sqrt_kl,
        proxy_name=config.proxy_name,
        true_name=config.true_name,
    )
    for run in runs:
        shown = run.at_step(args.step)
        print(
            f"{run.kind} run {run.label!r} ({run.location}): {len(run.records)} eval steps, showing step {shown.step}"
        )
    print(f"comparison: {report}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    config = _config(args)
    run = resolve_run(args.run, **_run_source(args, config))
    if args.out:
        out = Path(args.out)
    elif run.kind == "local":
        out = Path(run.location)
    else:
        out = Path("bon_reports") / _safe_name(run.label)
    report = write_run_report(
        run.records, out, title=run.label, proxy_name=config.proxy_name, true_name=config.true_name
    )
    print(f"{run.kind} run {run.label!r}: {len(run.records)} eval steps; report: {report}")
    return EXIT_OK


# ---- sync ------------------------------------------------------------------------------------------------------


def _cmd_sync(args: argparse.Namespace) -> int:
    from bon_tracker.tracking.wal import WriteAheadLog, default_wal_dir, wal_files

    config = _config(args)
    if args.spool_files:
        paths = [Path(p) for p in args.spool_files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UsageError(f"no such spool file: {', '.join(missing)}")
        folder = None
    else:
        folder = Path(config.spool_dir) if config.spool_dir else default_wal_dir()
        paths = list(wal_files(folder))
    if not paths:
        print(f"nothing to replay: no spool files in {folder}")
        return EXIT_OK
    replayed = remaining = 0
    for path in paths:
        wal = WriteAheadLog(path)
        if not args.dry_run and not wal.claim():
            print(f"{path}: in use by a running tracker ({wal.holder()}; it delivers its own records); skipped")
            continue
        try:
            replayed_here, remaining_here = _sync_one(wal, args.dry_run)
        finally:
            wal.release()
        replayed += replayed_here
        remaining += remaining_here
    if args.dry_run:
        print(f"{remaining} record(s) pending in {len(paths)} spool file(s)")
        return EXIT_OK
    print(f"replayed {replayed} record(s); {remaining} remain")
    return EXIT_PENDING if remaining else EXIT_OK


def _sync_one(wal: Any, dry_run: bool) -> tuple[int, int]:
    """Deliver one write-ahead log in order through the tracker's own delivery path, then
    finish the run if the tracker had finished it; returns (replayed, remaining)."""
    from bon_tracker.backends import backend_from_spec
    from bon_tracker.tracking.delivery import Delivery

    path, pending = wal.path, wal.pending()
    records = [e for e in pending if e.record is not None]
    finished = any(e.finish for e in pending)
    spec = wal.spec()
    if dry_run:
        steps = ", ".join(str(e.record.step) for e in records)
        print(f"{path}: {len(records)} record(s) for {spec.get('backend')} (steps {steps or 'none'})")
        return 0, len(records)
    if not records and not finished:
        wal.remove()  # an empty or torn-only log
        return 0, 0
    if "end_run" in spec:  # end the run only if the tracker had finished it (not after a crash)
        spec = {**spec, "end_run": bool(spec["end_run"]) and finished}
    backend = backend_from_spec(spec)
    delivery = Delivery(backend, wal)
    left = delivery.run_once(pending)
    left_records = [e for e in left if e.record is not None]
    done = len(records) - len(left_records)
    if not delivery.stopped and (done or finished):
        try:
            backend.finish()  # cumulative tables, run status: what the tracker's finish() would have done
        except Exception as err:
            logger.warning("bon_tracker: closing the %s backend failed: %s", backend.name, err)
        else:
            if not left_records:
                wal.remove()
    target = f"{backend.name} run {backend.run_id}"
    print(f"{path}: replayed {done} of {len(records)} record(s) to {target}")
    if delivery.stats.dead_lettered:
        print(f"{path}: {delivery.stats.dead_lettered} record(s) rejected; see {wal.dead_path}", file=sys.stderr)
    if left_records:
        why = delivery.stats.config_error or delivery.stats.last_error
        print(
            f"{path}: stopped at step {left_records[0].record.step}: {why}; {len(left_records)} record(s) remain",
            file=sys.stderr,
        )
    return done, len(left_records)


# ---- the parser ------------------------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs (examples, tables), wrapping
    only long prose lines."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if len(line) <= width or line.startswith(" "):
                lines.append(indent + line)
            else:
                lines.extend(textwrap.wrap(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(lines)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML config (default: $BON_TRACKER_CONFIG, else ./bon_tracker.yaml if present)",
    )


def _add_labels(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("labels")
    group.add_argument("--proxy-name", metavar="NAME", help="name of the proxy reward in charts (config: proxy_name)")
    group.add_argument("--true-name", metavar="NAME", help="name of the true reward in charts (config: true_name)")


def _add_run_source(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("where runs are read from")
    group.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (config: mlflow.tracking_uri; default $MLFLOW_TRACKING_URI, "
        "else sqlite:///mlflow.db)",
    )
    group.add_argument("--experiment", metavar="NAME", help="look MLflow run names up in this experiment only")
    group.add_argument(
        "--key-prefix",
        metavar="PREFIX",
        help="metric key prefix of the curves, if a run holds several (config: key_prefix)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``bon-tracker`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="bon-tracker",
        formatter_class=_Formatter,
        description="Best-of-n curves, KL and Goodhart points of proxy-reward optimisation: compute them from "
        "score files, compare runs logged to MLflow, W&B or local run folders, and replay records "
        "that a tracking service missed.",
        epilog=(
            "commands:\n"
            "  analyze   score files (JSONL, CSV, Parquet) -> curves, Goodhart point, HTML report, a tracking run\n"
            "  compare   overlay the curves of several runs; true reward and Goodhart point over training\n"
            "  report    the HTML report of one run\n"
            "  sync      replay eval records spooled while a tracking service was unreachable\n\n"
            "examples:\n"
            "  bon-tracker analyze samples.jsonl\n"
            "  bon-tracker analyze scores.parquet --backend mlflow --tracking-uri sqlite:///mlflow.db\n"
            "  bon-tracker compare bon_runs/ppo-a bon_runs/ppo-b --out comparison\n"
            "  bon-tracker sync\n\n"
            "Run 'bon-tracker COMMAND --help' for a command's options.\n\n" + EXIT_CODES_HELP
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more messages; tracebacks on failures")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # analyze
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
        choices=("local", "mlflow", "wandb"),
        help="local (default: the run folder only), mlflow or wandb (config: backend)",
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

    # compare
    compare = commands.add_parser(
        "compare",
        formatter_class=_Formatter,
        help="compare the best-of-n curves of several runs",
        description=(
            "Overlay the best-of-n curves of several runs (each at its latest eval step, or the latest at or "
            "before --step) and plot true reward at n and the Goodhart point against training step for each "
            "run. Writes compare.html, compare_curves.png and runs_over_steps.png to --out.\n\n"
            "RUN is one of:\n"
            "  PATH or local:PATH           a local run folder (holds records/)\n"
            "  PATH or wandb:PATH           a W&B run folder (holds run-*.wandb), e.g. an offline run\n"
            "  wandb:ENTITY/PROJECT/RUN_ID  a W&B run, through the W&B API (online)\n"
            "  ID_OR_NAME or mlflow:ID_OR_NAME   an MLflow run id or run name (at --tracking-uri)"
        ),
        epilog=(
            "examples:\n"
            "  bon-tracker compare bon_runs/ppo-a bon_runs/ppo-b\n"
            "  bon-tracker compare mlflow:ppo-a mlflow:ppo-b --tracking-uri sqlite:///mlflow.db --step 2000\n"
            "  bon-tracker compare wandb/offline-run-20250101_120000-abc123 bon_runs/baseline --out cmp\n\n"
            + EXIT_CODES_HELP
        ),
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="runs to compare (see above)")
    _add_config(compare)
    compare.add_argument("--out", default="bon_compare", metavar="DIR", help="output folder (default: %(default)s)")
    compare.add_argument(
        "--step",
        type=int,
        metavar="STEP",
        help="overlay each run's latest eval step at or before STEP (default: its latest)",
    )
    compare.add_argument(
        "--n", type=int, metavar="N", help="n of true@n over training (default: the largest n every run measured)"
    )
    compare.add_argument("--sqrt-kl", action="store_true", help="x axis √KL (Gao et al.'s d) instead of KL")
    _add_run_source(compare)
    _add_labels(compare)
    compare.set_defaults(handler=_cmd_compare)

    # report
    report = commands.add_parser(
        "report",
        formatter_class=_Formatter,
        help="write the HTML report of one run",
        description="Write the HTML report (with PNG charts) of one run; RUN as for 'compare'.",
        epilog=(
            "examples:\n"
            "  bon-tracker report bon_runs/ppo-a              (rewrites bon_runs/ppo-a/report.html)\n"
            "  bon-tracker report mlflow:ppo-a --out ppo-a-report\n\n" + EXIT_CODES_HELP
        ),
    )
    report.add_argument(
        "run", metavar="RUN", help="the run (a local run folder, W&B run folder, MLflow run id or name)"
    )
    _add_config(report)
    report.add_argument(
        "--out", metavar="DIR", help="output folder (default: the local run folder itself, else bon_reports/<run name>)"
    )
    _add_run_source(report)
    _add_labels(report)
    report.set_defaults(handler=_cmd_report)

    # sync
    sync = commands.add_parser(
        "sync",
        formatter_class=_Formatter,
        help="replay eval records spooled while a tracking service was down",
        description=(
            "When a tracking service fails, a tracker keeps its eval records in a spool file and replays them "
            "itself on the next eval step or at finish(). This replays what is left afterwards: each record, in "
            "order, to the run it was meant for; a record leaves the spool once written. Run it after the "
            "training process has ended."
        ),
        epilog=(
            "examples:\n"
            "  bon-tracker sync                                   (every spool file in the spool folder)\n"
            "  bon-tracker sync ~/.cache/bon_tracker/spool/mlflow-1a2b3c4d5e6f.jsonl\n"
            "  bon-tracker sync --dry-run\n\n" + EXIT_CODES_HELP
        ),
    )
    sync.add_argument(
        "spool_files", nargs="*", metavar="SPOOL_FILE", help="spool files (default: every *.jsonl in the spool folder)"
    )
    _add_config(sync)
    sync.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="spool folder (config: spool_dir; default $BON_TRACKER_SPOOL_DIR, else ~/.cache/bon_tracker/spool)",
    )
    sync.add_argument("--dry-run", action="store_true", help="list what would be replayed; change nothing")
    sync.set_defaults(handler=_cmd_sync)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bon-tracker`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(stream)
    previous_level = logger.level
    logger.setLevel(logging.INFO if args.verbose else logging.WARNING)
    prog = f"bon-tracker {args.command}"
    try:
        return handler(args)
    except (UsageError, ConfigError, ScoreFileError, RunNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except MissingDependencyError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_MISSING_DEPENDENCY
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if args.verbose:
            logger.exception("%s: failed", prog)
        print(
            f"{prog}: error: {type(err).__name__}: {err}" + ("" if args.verbose else " (-v for a traceback)"),
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        logger.removeHandler(stream)
        logger.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
