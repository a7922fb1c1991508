"""``bon-tracker lab``: watch a policy overoptimize a learned reward model, on a CPU.

Imports nothing heavy until the command runs (torch and transformers come with the
``[lab]`` extra).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from bon_tracker.backends import BACKENDS
from bon_tracker.cli.common import EXIT_CODES_HELP, EXIT_FAILURE, EXIT_OK, UsageError, _add_config, _config, _Formatter

QUICK_SEED = 0  # the quick mode's fixed seed (a lab-development seed, never a benchmark seed)
QUICK_EVALS = 12  # seed 0 peaks at eval 6 and has fallen far by eval 11: no need for the default 20


def _cmd_lab(args: argparse.Namespace) -> int:
    from bon_tracker.optional import require

    require("torch", "lab")
    require("transformers", "lab")
    from bon_tracker.lab.loop import LabConfig

    try:
        config = LabConfig(
            labels=args.labels,
            label_noise=args.label_noise,
            proxy_size=args.proxy_size,
            ensemble=args.ensemble,
            kl_coef=args.kl_coef,
            seed=QUICK_SEED if args.quick else args.seed,
            evals=args.evals,
            steps_per_eval=args.steps_per_eval,
            threads=args.threads,
        )
    except ValueError as err:  # "LabConfig.proxy_size must ..." -> "--proxy-size must ..."
        raise UsageError(re.sub(r"LabConfig\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(err))) from None
    if args.quick:
        config = replace(LabConfig(), seed=QUICK_SEED, evals=QUICK_EVALS, threads=args.threads)
    tracker_kwargs = _config(args).tracker_kwargs()
    if tracker_kwargs.get("run_name") is None:
        ensemble = f"-ens{config.ensemble}" if config.ensemble > 1 else ""
        name = f"lab-{args.trainer}-K{config.labels}{ensemble}-kl{config.kl_coef:g}-seed{config.seed}"
        tracker_kwargs["run_name"] = name
    say = (lambda line: None) if args.json else print
    if args.trainer == "trl":
        from bon_tracker.lab.trl_lab import run_trl_lab

        result = run_trl_lab(config, progress=say, **tracker_kwargs)
    else:
        from bon_tracker.lab.loop import run_lab

        result = run_lab(config, progress=say, **tracker_kwargs)
    summary = result.to_dict()
    if args.charts:
        summary["charts"] = _copy_charts(result.run_dir, Path(args.charts))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(result, summary)
    if args.quick and not (result.peaked() and result.first_alert_index is not None):
        print("lab --quick: expected the gold reward to peak and fall and an alert; see the run above")
        return EXIT_FAILURE
    return EXIT_OK


def _copy_charts(run_dir: str | None, out: Path) -> list[str]:
    """The local run's trend, RL and overlay charts as ``out/lab_trend.png``, ``lab_rl.png``, ``lab_overlay.png``."""
    if run_dir is None or not (Path(run_dir) / "charts").is_dir():
        raise UsageError("--charts needs the local backend (the run folder's charts/)")
    location = run_dir
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("trend", "rl", "overlay"):
        source = Path(location) / "charts" / f"{name}.png"
        if source.exists():
            shutil.copyfile(source, out / f"lab_{name}.png")
            copied.append(str(out / f"lab_{name}.png"))
    return copied


def _print_summary(result: Any, summary: dict[str, Any]) -> None:
    peak = result.evals[result.peak_index]
    print(f"proxy R^2 against gold on the initial policy's samples: {result.proxy_fit_r2:.2f}")
    print(
        f"gold peaks at step {peak.step} (eval {result.peak_index}, KL {peak.policy_kl:.2f} nats): "
        f"{peak.gold_mean:.3f}; last eval {result.evals[-1].gold_mean:.3f} "
        f"({'peaked and fell' if result.peaked() else 'no significant fall'})"
    )
    first = result.first_alert_index
    if first is None:
        print("no alert")
    else:
        rules = sorted({a["rule"] for a in result.alerts if a["step"] == result.evals[first].step})
        print(f"first alert at eval {first} ({first - result.peak_index:+d} evals from the peak): {', '.join(rules)}")
    if result.location:
        print(f"run: {result.location}")
    for chart in summary.get("charts", []):
        print(f"chart: {chart}")
    print(f"{result.seconds:.0f} s")


def add_parser(commands: Any) -> None:
    """The ``lab`` subcommand."""
    lab = commands.add_parser(
        "lab",
        formatter_class=_Formatter,
        help="see Goodhart's law happen: a tiny policy trained against a learned proxy (CPU)",
        description=(
            "Train a bag-of-words proxy reward model on K noisy labels of a gold rubric (samples of the "
            "initial policy), then a tiny GPT-2 policy against the proxy with a KL penalty, and log every "
            "eval's best-of-n curves (proxy and gold) with the policy's KL through the tracker. Needs "
            "pip install 'bon-tracker[lab]'. See docs/lab.md."
        ),
        epilog=(
            "examples:\n"
            "  bon-tracker lab --quick\n"
            "  bon-tracker lab --labels 4000 --kl-coef 0.05 --seed 3\n"
            "  bon-tracker lab --ensemble 4 --backend mlflow --tracking-uri sqlite:///mlflow.db\n\n" + EXIT_CODES_HELP
        ),
    )
    knobs = lab.add_argument_group("what a researcher varies")
    knobs.add_argument("--labels", type=int, default=1000, metavar="K", help="gold labels the proxy learns from")
    knobs.add_argument("--label-noise", type=float, default=1.0, help="sd of the noise on each gold label")
    knobs.add_argument("--proxy-size", type=int, default=32, help="hidden units of the proxy MLP")
    knobs.add_argument("--kl-coef", type=float, default=0.02, help="KL penalty per nat of completion KL")
    knobs.add_argument("--ensemble", type=int, default=1, metavar="K", help="proxy members (bootstrap resamples)")
    knobs.add_argument("--seed", type=int, default=1, help="seed of labels, models and sampling")
    knobs.add_argument("--evals", type=int, default=16, help="eval steps (the first before training)")
    knobs.add_argument("--steps-per-eval", type=int, default=10, help="training steps between evals")
    knobs.add_argument(
        "--quick",
        action="store_true",
        help=f"the fixed smoke run (default settings, seed {QUICK_SEED}, {QUICK_EVALS} evals); exit 1 unless gold "
        "peaks and falls and an alert fires",
    )
    knobs.add_argument(
        "--trainer",
        choices=("torch", "trl"),
        default="torch",
        help="torch: the fast plain loop (default); trl: TRL's GRPOTrainer with bon_tracker.integrations.trl",
    )
    knobs.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    _add_config(lab)
    backend = lab.add_argument_group("tracking backend")
    backend.add_argument("--backend", choices=tuple(BACKENDS), help="default local (config: backend)")
    backend.add_argument("--run-name", "--run", metavar="NAME", help="run name (default lab-<trainer>-K..-kl..-seed..)")
    backend.add_argument("--root", metavar="DIR", help="local: the folder of run folders (config: local.root)")
    backend.add_argument("--tracking-uri", metavar="URI", help="mlflow: tracking URI (config: mlflow.tracking_uri)")
    backend.add_argument("--experiment", metavar="NAME", help="mlflow: experiment name (config: mlflow.experiment)")
    backend.add_argument("--project", metavar="NAME", help="wandb: project (config: wandb.project)")
    backend.add_argument("--entity", metavar="NAME", help="wandb: entity (config: wandb.entity)")
    backend.add_argument("--wandb-mode", choices=("online", "offline"), help="wandb: mode (config: wandb.mode)")
    backend.add_argument("--spool-dir", metavar="DIR", help="where records wait if the backend fails")
    output = lab.add_argument_group("output")
    output.add_argument("--charts", metavar="DIR", help="copy the run's charts there as lab_trend.png, lab_rl.png")
    output.add_argument("--json", action="store_true", help="print the result as JSON")
    lab.set_defaults(handler=_cmd_lab)
