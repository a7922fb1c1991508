"""What every ``bon-tracker`` subcommand shares: exit codes, errors, progress, options."""

from __future__ import annotations

import argparse
import glob
import logging
import os
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bon_tracker.tracking.config import TrackerConfig, resolve_config

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


def plural(count: int, word: str, many: str | None = None) -> str:
    """``count`` and ``word``, in the plural unless ``count`` is 1.

    >>> plural(1, "sample"), plural(2_000, "prompt"), plural(0, "eval step"), plural(2, "entry", "entries")
    ('1 sample', '2,000 prompts', '0 eval steps', '2 entries')
    """
    return f"{count:,} {word if count == 1 else (many or word + 's')}"


_MAGIC = re.compile(r"[*?[]")


def expand_file_patterns(patterns: Sequence[str]) -> list[str]:
    """File arguments with glob patterns expanded, as a shell does, also when the shell did not
    (a quoted ``'dumps/*.parquet'``): each pattern stands for its matches in sorted order
    (``**`` matches folders at any depth). A path that exists is taken as it is, even with
    ``*``, ``?`` or ``[`` in its name; a pattern that matches nothing is an error naming it."""
    out: list[str] = []
    for pattern in patterns:
        text = str(pattern)
        if os.path.exists(text) or not _MAGIC.search(text):
            out.append(text)
            continue
        matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
        if not matches:
            raise UsageError(f"{text}: no file matches this pattern")
        out.extend(matches)
    return out


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


def _run_source(args: argparse.Namespace, config: TrackerConfig) -> dict[str, Any]:
    return {
        "tracking_uri": config.mlflow.get("tracking_uri"),
        "experiment": args.experiment,  # only to find runs by name: not the config's default experiment
        "key_prefix": config.key_prefix,
    }
