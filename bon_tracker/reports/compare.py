"""Read runs back from any backend; report one run, compare several.

A run reference (``bon-tracker compare RUN...``) is one of:

* ``local:PATH`` or a folder holding ``records/``: a local run folder;
* ``wandb:PATH`` or a folder holding ``run-*.wandb``: a W&B run folder (offline runs,
  e.g. ``wandb/offline-run-20250101_120000-abc123``), read from its transaction log;
* ``wandb:ENTITY/PROJECT/RUN_ID`` (no such folder): a W&B run read through the public
  API (needs network and a login);
* ``mlflow:ID_OR_NAME`` or anything else: an MLflow run id (32 hex digits) or run
  name, at the tracking URI given (default ``$MLFLOW_TRACKING_URI``, else
  ``./mlflow.db``), optionally only in one experiment.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bon_tracker.record import EvalRecord, evenly_spaced

if TYPE_CHECKING:
    from matplotlib.figure import Figure

KINDS = ("local", "wandb", "mlflow")
MAX_STEP_CHARTS = 20
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class RunNotFoundError(LookupError):
    """A run reference that names no readable run, or a run with no eval records."""


@dataclass(frozen=True)
class RunRecords:
    """The eval records of one run, and where they came from."""

    label: str  # a short name for legends and tables
    kind: str  # "local", "wandb" or "mlflow"
    location: str  # folder, run path or run id
    records: tuple[EvalRecord, ...]

    def at_step(self, step: int | None) -> EvalRecord:
        """The record at ``step`` (the latest at or before it); the last one if None."""
        if step is None:
            return self.records[-1]
        earlier = [r for r in self.records if r.step <= step]
        if not earlier:
            raise RunNotFoundError(
                f"run {self.label!r} has no eval step at or before step {step} "
                f"(its first is step {self.records[0].step})"
            )
        return earlier[-1]


# ---- reading runs ------------------------------------------------------------------------------------


def _looks_like_wandb_folder(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith(".wandb")
    return path.is_dir() and any(path.glob("run-*.wandb"))


def run_kind(ref: str) -> tuple[str, str]:
    """``(kind, target)`` of a run reference: an explicit ``local:``, ``wandb:`` or
    ``mlflow:`` prefix, else detected (a local run folder holds ``records/``, a W&B run
    folder ``run-*.wandb``; anything else is an MLflow run id or name)."""
    for kind in KINDS:
        if ref.startswith(kind + ":"):
            return kind, ref[len(kind) + 1 :]
    path = Path(ref)
    if path.is_dir() and (path / "records").is_dir():
        return "local", ref
    if _looks_like_wandb_folder(path):
        return "wandb", ref
    if path.exists():
        raise RunNotFoundError(
            f"{ref}: neither a local run folder (with records/) nor a W&B run folder "
            "(with run-*.wandb); prefix it with local: or wandb: to say which"
        )
    return "mlflow", ref


def _filter_prefix(records: list[EvalRecord], key_prefix: str | None, where: str) -> list[EvalRecord]:
    prefixes = sorted({r.key_prefix for r in records})
    if len(prefixes) <= 1:
        return records
    if key_prefix is None or key_prefix not in prefixes:
        raise RunNotFoundError(
            f"{where} holds curves under several key prefixes ({', '.join(prefixes)}); choose one with --key-prefix"
        )
    return [r for r in records if r.key_prefix == key_prefix]


def read_local_run(path: str | Path) -> tuple[str, list[EvalRecord]]:
    """(label, records) of a local run folder."""
    from bon_tracker.backends.local import read_records

    path = Path(path)
    if not (path / "records").is_dir():
        raise RunNotFoundError(f"{path}: not a local run folder (no records/ inside)")
    label = path.name
    meta = path / "run.json"
    if meta.is_file():
        with contextlib.suppress(OSError, ValueError):
            label = json.loads(meta.read_text(encoding="utf-8")).get("run_name") or label
    return label, read_records(path)


def read_wandb_run(target: str, key_prefix: str | None = None) -> tuple[str, list[EvalRecord]]:
    """(label, records) of a W&B run: a local run folder (offline, or the local copy of
    an online run), else ``entity/project/run_id`` through the public API."""
    path = Path(target)
    if path.exists():
        from bon_tracker.backends import wandb_transaction_log

        log = wandb_transaction_log.find_transaction_log(path)
        label = log.stem[len("run-") :] if log.stem.startswith("run-") else log.stem  # the run id
        for record in wandb_transaction_log.iter_records(log):  # the run's display name, from its "run" record
            if record.WhichOneof("record_type") == "run":
                label = record.run.display_name or label
                break
        return label, wandb_transaction_log.read_records(path)
    return _read_wandb_online(target, key_prefix or "bon")


def _read_wandb_online(run_path: str, key_prefix: str) -> tuple[str, list[EvalRecord]]:
    from bon_tracker.backends.wandb import RECORD_KEY
    from bon_tracker.optional import require

    wandb = require("wandb", "wandb")
    if run_path.count("/") != 2:
        raise RunNotFoundError(f"wandb:{run_path}: expected a run folder or ENTITY/PROJECT/RUN_ID")
    try:
        run = wandb.Api().run(run_path)
    except Exception as err:  # wandb raises CommError, ValueError... for a missing run or no login
        raise RunNotFoundError(f"wandb:{run_path}: cannot open the run through the W&B API ({err})") from None
    key = f"{key_prefix}/{RECORD_KEY}"
    records, seen = [], set()
    for row in run.scan_history(keys=[key]):
        value = row.get(key)
        if isinstance(value, str):
            record = EvalRecord.from_json(json.loads(value))
            if record.step not in seen:
                seen.add(record.step)
                records.append(record)
    return run.name or run.id, records


def _mlflow_run_id(client: Any, ref: str, experiment: str | None, tracking_uri: str) -> tuple[str, str]:
    """(run id, run name) of an MLflow run given by id or by name."""
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
            return run.info.run_id, run.info.run_name or ref
        except MlflowException:
            pass  # maybe a name that looks like an id
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise RunNotFoundError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quoted = ref.replace("'", "\\'")
    runs = (
        client.search_runs(experiment_ids, filter_string=f"attributes.run_name = '{quoted}'", max_results=50)
        if experiment_ids
        else []
    )
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not runs:
        raise RunNotFoundError(f"no MLflow run with id or name {ref!r} in {where} at {tracking_uri}")
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs[:5])
        raise RunNotFoundError(f"{len(runs)} MLflow runs are named {ref!r} in {where} ({ids}); pass a run id")
    return runs[0].info.run_id, ref


def read_mlflow_run(
    ref: str, *, tracking_uri: str | None = None, experiment: str | None = None
) -> tuple[str, str, list[EvalRecord]]:
    """(label, run id, records) of an MLflow run given by id or name."""
    from bon_tracker.backends import mlflow as mlflow_backend
    from bon_tracker.optional import require

    mlflow = require("mlflow", "mlflow")
    uri = tracking_uri or mlflow_backend.default_tracking_uri()
    client = mlflow.MlflowClient(tracking_uri=uri)
    with mlflow_backend.bounded_http(2, 30.0):
        run_id, name = _mlflow_run_id(client, ref, experiment, uri)
    return name, run_id, mlflow_backend.read_records(run_id, uri)


def resolve_run(
    ref: str,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    key_prefix: str | None = None,
) -> RunRecords:
    """Read the eval records of the run ``ref`` (see the module docstring for the forms).

    Raises:
        RunNotFoundError: no such run, or a run without eval records.
    """
    kind, target = run_kind(ref)
    if kind == "local":
        label, records = read_local_run(target)
        location = str(Path(target))
    elif kind == "wandb":
        try:
            label, records = read_wandb_run(target, key_prefix)
        except (FileNotFoundError, ValueError) as err:
            raise RunNotFoundError(f"{ref}: {err}") from None
        location = target
    else:
        label, location, records = read_mlflow_run(target, tracking_uri=tracking_uri, experiment=experiment)
    if not records:
        raise RunNotFoundError(f"{ref}: the {kind} run has no bon_tracker eval records")
    records = _filter_prefix(records, key_prefix, ref)
    return RunRecords(label, kind, location, tuple(sorted(records, key=lambda r: r.step)))


def unique_labels(runs: Sequence[RunRecords]) -> list[str]:
    """Legend labels: each run's label, made unique with its kind and location if needed."""
    labels = [r.label for r in runs]
    out = []
    for run, label in zip(runs, labels):
        if labels.count(label) > 1:
            short = Path(run.location).name if run.kind != "mlflow" else run.location[:8]
            label = f"{label} [{run.kind}:{short}]"
        out.append(label)
    for i, label in enumerate(out):  # still equal (same run twice): number them
        if out.count(label) > 1:
            out[i] = f"{label} #{out[:i].count(label) + 1}"
    return out


# ---- writing reports -----------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buffer.getvalue())
    tmp.replace(path)


def write_run_report(
    records: Sequence[EvalRecord],
    out_dir: str | Path,
    *,
    title: str | None = None,
    proxy_name: str | None = None,
    true_name: str | None = None,
    max_step_charts: int = MAX_STEP_CHARTS,
) -> Path:
    """Draw a run's charts into ``out_dir/charts`` (the curve of at most
    ``max_step_charts`` evenly spaced steps, the latest always; overlay; trend; RL when
    the policy KL was logged) and write ``out_dir/report.html``. Returns the report path."""
    from bon_tracker.reports import charts
    from bon_tracker.reports.html import html_report
    from bon_tracker.tracking.wal import atomic_write_text

    if not records:
        raise ValueError("no eval records to report")
    records = sorted(records, key=lambda r: r.step)
    out_dir = Path(out_dir)
    names = {"proxy_name": proxy_name, "true_name": true_name}
    for record in evenly_spaced(records, max_step_charts):
        _save(charts.curve_chart(record, **names), out_dir / "charts" / f"curve_step_{record.step:09d}.png")
    _save(charts.overlay_chart(records, **names), out_dir / "charts" / "overlay.png")
    _save(charts.trend_chart(records, **names), out_dir / "charts" / "trend.png")
    if any(r.policy is not None for r in records):
        _save(charts.rl_chart(records), out_dir / "charts" / "rl.png")
    report = out_dir / "report.html"
    atomic_write_text(report, html_report(out_dir, records, title=title))
    return report


def _fmt(value: float, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_comparison(
    runs: Sequence[RunRecords],
    out_dir: str | Path,
    *,
    step: int | None = None,
    n: int | None = None,
    sqrt_kl: bool = False,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Path:
    """Compare runs: ``compare_curves.png`` (each run's curve at its latest step, or at
    ``step``), ``runs_over_steps.png`` (true@n and the Goodhart point against training
    step) and ``compare.html`` with both and a summary table, in ``out_dir``."""
    from bon_tracker.reports import charts
    from bon_tracker.reports.html import REPORT_STYLE
    from bon_tracker.tracking.wal import atomic_write_text

    if not runs:
        raise ValueError("no runs to compare")
    out_dir = Path(out_dir)
    labels = unique_labels(runs)
    shown = [(label, run.at_step(step)) for label, run in zip(labels, runs)]
    histories = [(label, list(run.records)) for label, run in zip(labels, runs)]
    n = n if n is not None else charts.common_n(histories)
    names = {"proxy_name": proxy_name, "true_name": true_name}
    _save(charts.compare_chart(shown, sqrt_kl=sqrt_kl, **names), out_dir / "compare_curves.png")
    _save(charts.runs_trend_chart(histories, n=n, **names), out_dir / "runs_over_steps.png")

    at = f"@{n}" if n is not None else "@N"
    rows = []
    for (label, record), run in zip(shown, runs):
        c, ns = record.curve, record.curve.n.tolist()
        i = ns.index(n) if n is not None and n in ns else len(ns) - 1
        g = record.goodhart
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{cell}</td>"
                for cell in (
                    html.escape(label),
                    run.kind,
                    html.escape(run.location),
                    len(run.records),
                    record.step,
                    int(c.n_prompts[0]),
                    c.N,
                    _fmt(float(c.true_mean[ns.index(1)])) if 1 in ns else "–",
                    _fmt(float(c.true_mean[i])),
                    _fmt(float(c.proxy_mean[i])),
                    _fmt(g.n, 3) if g else "–",
                    _fmt(g.kl, 3) if g else "–",
                    ("yes" if g.within_range else "extrapolated") if g else "–",
                )
            )
            + "</tr>"
        )
    header = (
        "run",
        "kind",
        "location",
        "eval steps",
        "step shown",
        "prompts",
        "N",
        "true@1",
        f"true{at}",
        f"proxy{at}",
        "Goodhart n*",
        "Goodhart KL*",
        "peak measured",
    )
    title = f"Best-of-n comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)} — bon_tracker</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p class='note'>Curves: each run at "
        + ("its latest eval step" if step is None else f"its latest eval step at or before step {step}")
        + ". Stars: Goodhart points (the fitted peak of true reward; hollow when extrapolated past the "
        "largest n measured). Bands: ±1 standard error over prompts.</p>",
        _img(out_dir / "compare_curves.png", "best-of-n curves of the runs"),
        _img(out_dir / "runs_over_steps.png", "true reward and Goodhart point over training"),
        "<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *rows,
        "</table><p class='note'>Estimator: unbiased all-subsets best-of-n (Nakano et al. 2021); "
        "fit: Gao et al. 2022.</p></body></html>",
    ]
    report = out_dir / "compare.html"
    atomic_write_text(report, "\n".join(parts))
    return report
