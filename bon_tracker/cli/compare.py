"""``bon-tracker compare``: overlay the curves of several runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bon_tracker.cli.common import (
    EXIT_CODES_HELP,
    EXIT_OK,
    UsageError,
    _add_config,
    _add_labels,
    _add_run_source,
    _config,
    _Formatter,
    _run_source,
    plural,
)
from bon_tracker.reports.compare import check_n, resolve_run, write_comparison

# ---- compare and report --------------------------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace) -> int:
    config = _config(args)
    source = _run_source(args, config)
    runs = [resolve_run(ref, **source) for ref in args.runs]
    if args.n is not None:
        try:
            check_n(runs, args.n, args.step)
        except ValueError as err:
            raise UsageError(str(err)) from None
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
            f"{run.kind} run {run.label!r} ({run.location}): {plural(len(run.records), 'eval step')}, "
            f"showing step {shown.step}"
        )
    print(f"comparison: {report}")
    return EXIT_OK


def add_parser(commands: Any) -> None:
    """The ``compare`` subcommand."""
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
            "  ID_OR_NAME or mlflow:ID_OR_NAME   an MLflow run id or run name (at --tracking-uri)\n"
            "  PATH or tensorboard:PATH     a TensorBoard log dir written by bon_tracker (holds its event files)\n"
            "  trackio:PROJECT/RUN_NAME     a trackio run in the local trackio store"
        ),
        epilog=(
            "examples:\n"
            "  bon-tracker compare bon_runs/ppo-a bon_runs/ppo-b\n"
            "  bon-tracker compare mlflow:ppo-a mlflow:ppo-b --tracking-uri sqlite:///mlflow.db --step 2000\n"
            "  bon-tracker compare wandb/offline-run-20250101_120000-abc123 bon_runs/baseline --out cmp\n"
            "  bon-tracker compare tensorboard:runs/ppo-a trackio:goodhart/ppo-b\n\n" + EXIT_CODES_HELP
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
        "--n",
        type=int,
        metavar="N",
        help="n of true@n in the table and over training (default: the largest n every run measured); "
        "an n missing from a run's grid at the step shown is an error naming the largest n they share",
    )
    compare.add_argument("--sqrt-kl", action="store_true", help="x axis √KL (Gao et al.'s d) instead of KL")
    _add_run_source(compare)
    _add_labels(compare)
    compare.set_defaults(handler=_cmd_compare)
