"""``bon-tracker report``: the HTML report of one run."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bon_tracker.cli.common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    _add_config,
    _add_labels,
    _add_run_source,
    _config,
    _Formatter,
    _run_source,
    _safe_name,
)
from bon_tracker.reports.compare import resolve_run, write_run_report


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


def add_parser(commands: Any) -> None:
    """The ``report`` subcommand."""
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
