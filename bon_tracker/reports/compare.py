"""Read runs back from any backend; report one run, compare several.

Reading is dispatch: each backend reads back what it wrote (``Backend.read_records``).
A run reference (``bon-tracker compare RUN...``) is one of:

* ``BACKEND:REF`` for any registered backend, e.g. ``local:PATH``, ``wandb:PATH`` or
  ``wandb:ENTITY/PROJECT/RUN_ID``, ``mlflow:ID_OR_NAME``;
* a path a backend recognises as its own (a local run folder holding ``records/``, a W&B
  run folder holding ``run-*.wandb``, ...);
* a path that does not exist: an error naming it (nothing is created by a lookup);
* anything else: an MLflow run id (32 hex digits) or run name, at the tracking URI given
  (default ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``), optionally in one experiment.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bon_tracker.backends import BACKENDS, RunNotFoundError, backend_class
from bon_tracker.record import EvalRecord, evenly_spaced

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MAX_STEP_CHARTS = 20


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


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.startswith(".") or ref.startswith("~")


def run_kind(ref: str) -> tuple[str, str]:
    """``(backend name, target)`` of a run reference (see the module docstring)."""
    for name in BACKENDS:
        if ref.startswith(name + ":"):
            return name, ref[len(name) + 1 :]
    for name in BACKENDS:
        try:
            if backend_class(name).claims(ref):
                return name, ref
        except ImportError:  # that backend's extra is not installed: it cannot own the run
            continue
    path = Path(ref).expanduser()
    if path.exists():
        raise RunNotFoundError(
            f"{ref}: not a run folder of any backend ({', '.join(BACKENDS)}); prefix it with the backend, "
            "e.g. local: or wandb:, to say which"
        )
    if _looks_like_path(ref):
        raise RunNotFoundError(f"{ref}: no such run folder or file")
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
    options = {"tracking_uri": tracking_uri, "experiment": experiment, "key_prefix": key_prefix}
    result = backend_class(kind).read_records(target, **options)
    label, location, records = result if len(result) == 3 else (result[0], target, result[1])
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
    from bon_tracker.files import atomic_write_text
    from bon_tracker.reports import charts
    from bon_tracker.reports.html import html_report

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


def _goodhart_cells(record: EvalRecord) -> tuple[str, str, str]:
    """The comparison table's n*, KL* and "peak measured" cells: n* = 1 when the true reward falls
    from the start, "beyond n = …" past the horizon (never a far extrapolated number), "–" without a peak."""
    from bon_tracker.reports.charts import NOT_RESOLVED, n_text

    g, status = record.goodhart, record.goodhart_status()
    if g is None or status == "none":
        return "–", "–", "–"
    if status == "beyond":
        return n_text(math.inf, record.horizon_n), "–", "beyond the measured range"
    if g.falls_from_start:
        return "1", _fmt(g.kl, 3), "n* = 1: true falls from n = 1"
    where = "yes" if status == "measured" else "extrapolated"
    if record.goodhart_resolved() is False:
        where += f" ({NOT_RESOLVED})"
    return _fmt(g.n, 3), _fmt(g.kl, 3), where


def _path_cell(path: str) -> str:
    """A path that may break after a ``/`` and nowhere else (not at a ``-`` inside a name).

    >>> _path_cell("runs/ppo-a")
    "<span class='nobr'>runs/</span><wbr><span class='nobr'>ppo-a</span>"
    """
    parts = path.split("/")
    pieces = [part + "/" for part in parts[:-1]] + [parts[-1]]
    return "<wbr>".join(f"<span class='nobr'>{html.escape(piece)}</span>" for piece in pieces if piece)


def runs_alerts_section(runs: Sequence[tuple[str, RunRecords]]) -> str:
    """Every run's alert onsets, one sentence each (when it cleared, if it did), or that it
    had none: a comparison that hides one run's alert reads as if that run were fine."""
    parts = ["<h2>Alerts</h2>"]
    for label, run in runs:
        records = run.records
        cleared = {(e.rule, e.onset_step): e.step for r in records for e in r.alerts if e.kind == "clear"}
        items = []
        for record in records:
            for alert in record.onsets:
                until = cleared.get((alert.rule, alert.step))
                note = f" <span class='note'>(cleared at step {until})</span>" if until is not None else ""
                items.append(f"<li data-rule='{html.escape(alert.rule)}'>{html.escape(alert.message)}{note}</li>")
        count = f"{len(items)} alert{'s' if len(items) != 1 else ''}"
        heading = f"<h3 class='run-alerts'>{html.escape(label)}: {count}</h3>"
        body = f"<ul class='alerts' data-run='{html.escape(label)}'>{''.join(items)}</ul>" if items else ""
        parts.append(heading + (body or "<p class='note'>No alert fired in this run.</p>"))
    return "".join(parts)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def check_n(runs: Sequence[RunRecords], n: int, step: int | None = None) -> None:
    """``n`` (``compare --n``) must be on the grid of every run at the step shown (its latest, or
    the latest at or before ``step``), which the table and the panels show it at; a ValueError
    names a run without it and the largest n every run has there.

    >>> import numpy as np
    >>> from bon_tracker.core import bon_curve
    >>> run = RunRecords("a", "local", "bon_runs/a", (EvalRecord.build(0, bon_curve(np.eye(16), np.eye(16))),))
    >>> check_n([run], 64)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: --n 64: run 'a' has no n = 64 at step 0 (N = 16; its n: 1, 2, 4, 8, 16); the largest n ...
    """
    shown = [(run, run.at_step(step)) for run in runs]
    missing = [(run, record) for run, record in shown if n not in record.curve.n.tolist()]
    if not missing:
        return
    run, record = missing[0]
    shared = set.intersection(*(set(r.curve.n.tolist()) for _, r in shown))
    largest = f"the largest n every run has there is {max(shared)}" if shared else "the runs share no n"
    grid = ", ".join(str(v) for v in record.curve.n.tolist())
    raise ValueError(
        f"--n {n}: run {run.label!r} has no n = {n} at step {record.step} (N = {record.curve.N}; its n: {grid}); "
        f"{largest}"
    )


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
    step) and ``compare.html`` with both and a summary table, in ``out_dir``. ``n``: the n of
    true@n in the table and the panel (default the largest n every step of every run has); it
    must be on every run's grid at the step shown (:func:`check_n`: a ValueError otherwise)."""
    from bon_tracker.files import atomic_write_text
    from bon_tracker.reports import charts
    from bon_tracker.reports.html import REPORT_STYLE

    if not runs:
        raise ValueError("no runs to compare")
    out_dir = Path(out_dir)
    labels = unique_labels(runs)
    shown = [(label, run.at_step(step)) for label, run in zip(labels, runs)]
    histories = [(label, list(run.records)) for label, run in zip(labels, runs)]
    if n is not None:
        check_n(runs, n, step)  # never a table of another n under the heading true@n
    n = n if n is not None else charts.common_n(histories)
    names = {"proxy_name": proxy_name, "true_name": true_name}
    _save(charts.compare_chart(shown, sqrt_kl=sqrt_kl, **names), out_dir / "compare_curves.png")
    _save(charts.runs_trend_chart(histories, n=n, **names), out_dir / "runs_over_steps.png")

    at = f"@{n}" if n is not None else "@N"
    from bon_tracker.reports.html import _span

    rows = []
    for (label, record), run in zip(shown, runs):
        c, ns = record.curve, record.curve.n.tolist()
        i = ns.index(n) if n is not None and n in ns else len(ns) - 1
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{cell}</td>"
                for cell in (
                    html.escape(label),
                    run.kind,
                    _path_cell(run.location),
                    len(run.records),
                    record.step,
                    int(c.n_prompts[0]),
                    c.N,
                    _fmt(float(c.true_mean[ns.index(1)])) if 1 in ns else "–",
                    _fmt(float(c.true_mean[i])),
                    _fmt(float(c.proxy_mean[i])),
                    *_goodhart_cells(record)[:1],
                    _span(record),
                    *_goodhart_cells(record)[1:],
                    len([a for r in run.records for a in r.onsets]),
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
        "n* 95 % interval",
        "Goodhart KL*",
        "peak measured",
        "alerts",
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
        "<p class='note'>Below the reward: n* of each run over training, its 95 % interval from "
        "resampling prompts as a bar at each step.</p>",
        "<table id='compare-table' class='runs'><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>",
        *rows,
        "</table>",
        runs_alerts_section(list(zip(labels, runs))),
        "<p class='note'>Estimator: unbiased all-subsets best-of-n (Nakano et al. 2021); "
        "fit: Gao et al. 2022.</p></body></html>",
    ]
    report = out_dir / "compare.html"
    atomic_write_text(report, "\n".join(parts))
    return report
