"""The ``bon-tracker`` command: analyze score files, compare runs, report, replay logs.

``main(argv)`` returns the exit code (see ``EXIT_*`` in :mod:`bon_tracker.cli.common`); the
console script passes it to ``sys.exit``. Settings come from the options, then the
environment, then a config file (``--config``, ``$BON_TRACKER_CONFIG`` or
``./bon_tracker.yaml``; see :mod:`bon_tracker.tracking.config`), then defaults. Each
subcommand lives in its own module and adds its own parser.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from bon_tracker.analysis.score_files import (
    ScoreFileError,
)
from bon_tracker.cli import analyze, compare, report, sync
from bon_tracker.cli.common import (
    EXIT_CODES_HELP,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_MISSING_DEPENDENCY,
    EXIT_OK,
    EXIT_PENDING,
    EXIT_USAGE,
    UsageError,
    _Formatter,
    logger,
)
from bon_tracker.lab import cli as lab
from bon_tracker.optional import MissingDependencyError
from bon_tracker.reports.compare import RunNotFoundError
from bon_tracker.tracking.config import ConfigError
from bon_tracker.version import __version__

__all__ = ["EXIT_OK", "EXIT_PENDING", "EXIT_USAGE", "build_parser", "main"]


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
            "  sync      replay eval records spooled while a tracking service was unreachable\n"
            "  lab       see Goodhart's law happen: a tiny policy trained against a learned proxy (CPU)\n\n"
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
    for module in (analyze, compare, report, sync, lab):
        module.add_parser(commands)
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
