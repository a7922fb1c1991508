"""A self-contained HTML report of one run: charts inlined, tables, the Goodhart point."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

from bon_tracker.core import BonCurve
from bon_tracker.core.fit import GOODHART_HORIZON
from bon_tracker.record import EvalRecord
from bon_tracker.reports.charts import _plain, n_text

REPORT_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
figure { margin: 0 0 1em; }
figcaption { color: #555; font-size: 0.85em; }
.summary { font-size: 1.05em; background: #f6faf6; border-left: 4px solid #2ca02c; padding: 0.5em 0.8em; }
.note { color: #555; font-size: 0.9em; }
.alerts { background: #fff6f0; border-left: 4px solid #d62728; padding: 0.4em 0.8em 0.4em 2em; }
.alerts li { margin: 0.3em 0; }
.predicted { color: #666; font-style: italic; }
/* break a long cell between words or at a path's "/", never inside a word */
td, th { overflow-wrap: normal; word-break: keep-all; hyphens: none; }
table.runs td:first-child { white-space: nowrap; text-align: left; }
table.runs td:nth-child(3) { text-align: left; max-width: 16em; }
.nobr { white-space: nowrap; }
table.hacks td { text-align: left; vertical-align: top; }
table.hacks td.text { white-space: pre-wrap; overflow-wrap: anywhere; max-width: 24em; font-family: monospace; }
/* a long completion scrolls inside its cell instead of stretching the table */
table.hacks td.text div { max-height: 14em; overflow-y: auto; }
"""


def samples_text(curve: BonCurve) -> str:
    """How many prompts and samples a curve stands on; for ragged prompts, how many reach
    the largest n (a best-of-11 over 4 of 30 prompts is not a best-of-11 over 30)."""
    total, top = int(curve.n_prompts.max()), int(curve.n_prompts[-1])
    if top == total:
        return f"{total} prompts, N = {curve.N} samples per prompt"
    return (
        f"{total} prompts with up to N = {curve.N} samples each (ragged: n = {int(curve.n[-1])} averages "
        f"only the {top} of {total} prompts with that many)"
    )


def _fmt(value: float, digits: int = 4) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _img(path: Path, alt: str, caption: str = "") -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    note = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{note}</figure>'


def goodhart_summary(record: EvalRecord) -> str:
    """The report's one-paragraph answer: where the Goodhart point of ``record`` lies."""
    g, status = record.goodhart, record.goodhart_status()
    step = record.step
    N = int(record.curve.n.max())
    if g is None or status == "none":
        return f"<b>No Goodhart point</b> at step {step}: the fitted true reward still rises with n up to n = {N}."
    if g.falls_from_start:
        return (
            f"<b>Goodhart point n* = 1</b> at step {step}: any selection on this proxy already lowers the true "
            f"reward (the fitted true reward falls from n = 1 to n = {N}; KL* = 0). "
            f"Fit R²(true) = {g.true_r2:.3f}."
        )
    if status == "beyond":
        return (
            f"<b>Goodhart point beyond the measured range</b> at step {step}: beyond n = {_plain(record.horizon_n)} "
            f"({GOODHART_HORIZON} × the largest n measured, {N}), an extrapolation of the fit; the fitted true "
            f'reward still rises over the measured n: treat it as "no peak in sight". Fit R²(true) = {g.true_r2:.3f}.'
        )
    if record.goodhart_resolved() is False:
        return (
            f"<b>Goodhart point not resolved</b> at step {step}: the fit peaks at n* ≈ {_plain(g.n)} "
            f"(KL* = {g.kl:.3g} nats), but its interval spans the measured range, so the data do not say "
            f"whether true reward peaks within n ≤ {N}. Fit R²(true) = {g.true_r2:.3f}."
        )
    where = "within the measured range" if status == "measured" else f"extrapolated past the largest n measured ({N})"
    return (
        f"<b>Goodhart point</b> at step {step}: n* ≈ {_plain(g.n)}, KL* = {g.kl:.3g} nats ({where}); "
        f"past it, more best-of-n optimisation lowers the true reward. Fit R²(true) = {g.true_r2:.3f}."
    )


def alerts_section(records: Sequence[EvalRecord]) -> str:
    """Every alert onset of the run, one sentence each, and when it cleared; "" without alerts."""
    cleared = {(e.rule, e.onset_step): e.step for r in records for e in r.alerts if e.kind == "clear"}
    items = []
    for record in records:
        for alert in record.onsets:
            until = cleared.get((alert.rule, alert.step))
            note = f" <span class='note'>(cleared at step {until})</span>" if until is not None else ""
            items.append(f"<li data-rule='{html.escape(alert.rule)}'>{html.escape(alert.message)}{note}</li>")
    if not items:
        return ""
    active = sorted({rule for rule, state in (records[-1].alert_states or {}).items() if state})
    now = f" Active at the latest step: {', '.join(active)}." if active else " None is active at the latest step."
    return (
        f"<h2>Alerts</h2><p class='note'>{len(items)} alert(s) fired during training.{now}</p>"
        f"<ul id='alerts' class='alerts'>{''.join(items)}</ul>"
    )


def _interval_text(record: EvalRecord) -> str:
    """How sure the Goodhart point is: its interval from resampling prompts."""
    i = record.interval
    if i is None or record.goodhart is None:
        return ""
    pct = f"{100 * i.level:g} %"
    horizon = record.horizon_n
    high = "no peak in sight" if not math.isfinite(i.n_high) else n_text(i.n_high, horizon)
    gain_high = _fmt(i.gain_high, 3) if i.n_high <= horizon else "–"
    return (
        f" {pct} interval from resampling the {i.n_prompts} prompts: n* from {n_text(i.n_low, horizon)} to {high}, "
        f"KL* from {i.kl_low:.3g} to {_fmt(i.kl_high, 3)} nats, peak gain {i.gain_low:+.3g} to {gain_high}."
    )


def _goodhart_cells(record: EvalRecord) -> tuple[str, str]:
    g, status = record.goodhart, record.goodhart_status()
    if g is None or status == "none":
        return "–", "–"
    if status == "beyond":
        return f"beyond n = {_plain(record.horizon_n)}", "beyond range"
    if g.falls_from_start:
        return "1 (falls from n = 1)", _fmt(g.kl, 3)
    mark = "" if status == "measured" else " (extrap.)"
    if record.goodhart_resolved() is False:
        mark += " (not resolved)"
    return _fmt(g.n, 3) + mark, _fmt(g.kl, 3)


def _span(record: EvalRecord) -> str:
    """n*'s interval for the steps table: plain numbers, "beyond n = …" past the horizon."""
    i = record.interval
    if i is None:
        return "–"
    return f"{n_text(i.n_low, record.horizon_n)}–{n_text(i.n_high, record.horizon_n)}"


def html_report(run_dir: Path, records: Sequence[EvalRecord], title: str | None = None) -> str:
    """Render the report; charts are read from ``run_dir/charts`` if present."""
    charts = Path(run_dir) / "charts"
    last = records[-1]
    c = last.curve
    name = html.escape(title or Path(run_dir).name)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{name} — bon_tracker</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>Best-of-n report: {name}</h1>",
        f"<p class='note'>{len(records)} eval step(s); latest step {last.step}: "
        + samples_text(c)
        + (
            "; proxy has ties, so KL is the exact value over proxy levels (kl_bound is the continuous formula)"
            if c.has_ties
            else ""
        )
        + ".</p>",
        f"<p id='goodhart-summary' class='summary'>{goodhart_summary(last)}{html.escape(_interval_text(last))}</p>",
        alerts_section(records),
        hacks_section(records),
        selection_section(charts, records),
        _img(
            charts / f"curve_step_{last.step:09d}.png",
            f"best-of-n curve at step {last.step}",
            "True (top) and proxy (bottom) reward of best-of-n against KL, ±1 SE; the fit is dashed where "
            "measured, dotted where extrapolated.",
        ),
        _img(charts / "trend.png", "reward against training step", "Reward at a few n, and n*, over training."),
        _img(charts / "overlay.png", "curves over training", "Every eval step's curve, coloured by step."),
        _img(
            charts / "rl.png",
            "RL versus best-of-n",
            "The trained policy's true reward against its KL (labels: step), beside best-of-n.",
        ),
    ]
    parts.append(f"<h2>Curve at step {last.step}</h2><table id='curve-table'><tr>")
    columns = ["n", "kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts"]
    parts.append("".join(f"<th>{col}</th>" for col in columns) + "</tr>")
    for row in c.rows():
        parts.append("<tr>" + "".join(f"<td>{_fmt(row[col])}</td>" for col in columns) + "</tr>")
    for row in last.prediction_rows():  # the fitted law beyond the measured n, marked as such
        cells = {"n": f"{row['n']} (predicted)", "kl": _fmt(row["kl"]), "kl_bound": _fmt(row["kl"])}
        cells["true_mean"] = f"{_fmt(row['true_mean'])} [{_fmt(row['true_mean_low'])}, {_fmt(row['true_mean_high'])}]"
        cells["proxy_mean"] = (
            f"{_fmt(row['proxy_mean'])} [{_fmt(row['proxy_mean_low'])}, {_fmt(row['proxy_mean_high'])}]"
        )
        parts.append("<tr class='predicted'>" + "".join(f"<td>{cells.get(col, '–')}</td>" for col in columns) + "</tr>")
    parts.append(
        "</table><h2>Over training</h2><table id='steps-table'><tr><th>step</th><th>true@1</th>"
        f"<th>true@{c.n[-1]}</th><th>proxy@{c.n[-1]}</th><th>Goodhart n*</th><th>n* interval</th>"
        "<th>Goodhart KL*</th><th>agreement top 1/4</th><th>alerts</th></tr>"
    )
    for r in records:
        ns = r.curve.n.tolist()
        top = len(ns) - 1
        t1 = _fmt(float(r.curve.true_mean[ns.index(1)])) if 1 in ns else "–"
        gn, gk = _goodhart_cells(r)
        span = _span(r)
        agree = "–"
        if r.agreement is not None and 0.25 in r.agreement.q:
            at = r.agreement.q.index(0.25)
            agree = f"{_fmt(r.agreement.mean[at], 3)} ± {_fmt(r.agreement.se[at], 2)}"
        fired = ", ".join(a.rule for a in r.onsets) or ""
        parts.append(
            f"<tr><td>{r.step}</td><td>{t1}</td><td>{_fmt(float(r.curve.true_mean[top]))}</td>"
            f"<td>{_fmt(float(r.curve.proxy_mean[top]))}</td><td>{gn}</td><td>{span}</td><td>{gk}</td>"
            f"<td>{agree}</td><td>{html.escape(fired)}</td></tr>"
        )
    parts.append(
        "</table><p class='note'>Tables: bon_curves.csv / bon_curves.jsonl in the run folder; predicted rows "
        "(the fitted law beyond the measured n, with 95 % intervals) in bon_predictions.csv; alerts in "
        "alerts.jsonl. n* interval: 95 % from resampling prompts (“beyond n = …”: past "
        f"{GOODHART_HORIZON} × the largest n measured, maybe no peak). "
        "Estimator: unbiased all-subsets best-of-n (Nakano et al. 2021); fit: Gao et al. 2022.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def _cell(value: object) -> str:
    """A table cell's text, HTML-escaped (quotes too): a completion is data, never markup."""
    if value is None:  # a non-finite number in a table (its status column says why)
        return "–"
    return html.escape(_fmt(value) if isinstance(value, float) else str(value), quote=True)


def hacks_section(records: Sequence[EvalRecord]) -> str:
    """The latest step's hack table: per prompt, the proxy's pick and the true reward's pick side by
    side with their scores; every text escaped. "" when no step has texts."""
    from bon_tracker.reports.texts_tables import hacks_summary

    record = next((r for r in reversed(records) if r.hacks is not None), None)
    if record is None:
        return ""
    h = record.hacks
    assert h is not None
    rows = []
    for r in h.rows:
        p, t = r.proxy_pick, r.true_pick
        rows.append(
            "<tr>"
            f"<td>{r.prompt_index}</td><td class='text prompt'><div>{_cell(r.prompt)}</div></td>"
            f"<td class='text proxy-pick'><div>{_cell(p.text)}</div></td>"
            f"<td>{_cell(p.proxy)}</td><td>{_cell(p.true)}</td>"
            f"<td class='text true-pick'><div>{_cell(t.text)}</div></td>"
            f"<td>{_cell(t.proxy)}</td><td>{_cell(t.true)}</td>"
            f"<td>{_cell(r.gap)}</td><td>{r.proxy_pick_true_rank} of {r.samples}</td>"
            "</tr>"
        )
    features = ", ".join(
        f"{html.escape(f.name)} {_cell(f.pick)} (all samples {_cell(f.all)})" for f in h.features if f.pick is not None
    )
    return (
        f"<h2>Where the proxy loses true reward (step {record.step})</h2>"
        f"<p class='note'>{html.escape(hacks_summary(record))}. Features of the proxy's picks: "
        f"{features or '–'}. Table: bon_hacks/step_{record.step:09d}.jsonl.</p>"
        "<table id='hacks-table' class='hacks'><tr><th>prompt #</th><th>prompt</th><th>proxy's pick</th>"
        f"<th>{html.escape(record.proxy_name)}</th><th>{html.escape(record.true_name)}</th><th>true reward's pick</th>"
        f"<th>{html.escape(record.proxy_name)}</th><th>{html.escape(record.true_name)}</th><th>gap</th>"
        "<th>proxy's pick by true</th></tr>" + "".join(rows) + "</table>"
    )


def selection_section(charts: Path, records: Sequence[EvalRecord]) -> str:
    """The latest step's frontier chart and every rule's optima; "" when no step has selection statistics."""
    from bon_tracker.reports.selection_tables import selection_summary, selection_table

    record = next((r for r in reversed(records) if r.selection is not None), None)
    if record is None:
        return ""
    columns, rows = selection_table(record)
    shown = [c for c in columns if c != "step"]
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row[columns.index(c)])}</td>" for c in shown) + "</tr>" for row in rows
    )
    chart = _img(
        charts / f"frontier_step_{record.step:09d}.png",
        f"selection rules at step {record.step}",
        "True reward against KL for every rule (solid best-of-n, dashed Best-of-Poisson, star: hedged "
        "optimum); black steps: the best rule within each KL budget.",
    )
    return (
        f"<h2>Selection rules (step {record.step})</h2><p class='note'>{html.escape(selection_summary(record))}. "
        f"Tables: bon_selection/ and bon_frontier/ (step_{record.step:09d}.jsonl).</p>{chart}"
        "<table id='selection-table'><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in shown) + "</tr>"
        f"{body}</table>"
    )
