"""A self-contained HTML report of one run: charts inlined, tables, the Goodhart point."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path

from bon_tracker.record import EvalRecord

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
"""


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
    if g is None or status == "none":
        return (
            f"<b>No Goodhart point</b> at step {step}: the fitted true reward still rises with n "
            f"up to n = {int(record.curve.n.max())}."
        )
    if status == "beyond":
        return (
            f"<b>Goodhart point beyond the measured range</b> at step {step}: the fit puts the peak of "
            f"true reward at n ≈ {g.n:.2g} (KL ≈ {g.kl:.3g} nats), far past the largest n measured "
            f'({int(record.curve.n.max())}); treat it as "no peak in sight". Fit R²(true) = {g.true_r2:.3f}.'
        )
    where = (
        "within the measured range"
        if status == "measured"
        else f"extrapolated past the largest n measured ({int(record.curve.n.max())})"
    )
    return (
        f"<b>Goodhart point</b> at step {step}: n* ≈ {g.n:.3g}, KL* = {g.kl:.3g} nats ({where}); "
        f"past it, more best-of-n optimisation lowers the true reward. Fit R²(true) = {g.true_r2:.3f}."
    )


def _goodhart_cells(record: EvalRecord) -> tuple[str, str]:
    g, status = record.goodhart, record.goodhart_status()
    if g is None or status == "none":
        return "–", "–"
    if status == "beyond":
        return "beyond range", "beyond range"
    mark = "" if status == "measured" else " (extrap.)"
    return _fmt(g.n, 3) + mark, _fmt(g.kl, 3)


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
        f"{int(c.n_prompts.max())} prompts, N = {c.N} samples per prompt"
        + (
            "; proxy has ties, so KL is the exact value over proxy levels (kl_bound is the continuous formula)"
            if c.has_ties
            else ""
        )
        + ".</p>",
        f"<p id='goodhart-summary' class='summary'>{goodhart_summary(last)}</p>",
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
    parts.append(
        "</table><h2>Over training</h2><table id='steps-table'><tr><th>step</th><th>true@1</th>"
        f"<th>true@{c.n[-1]}</th><th>proxy@{c.n[-1]}</th><th>Goodhart n*</th><th>Goodhart KL*</th></tr>"
    )
    for r in records:
        ns = r.curve.n.tolist()
        top = len(ns) - 1
        t1 = _fmt(float(r.curve.true_mean[ns.index(1)])) if 1 in ns else "–"
        gn, gk = _goodhart_cells(r)
        parts.append(
            f"<tr><td>{r.step}</td><td>{t1}</td><td>{_fmt(float(r.curve.true_mean[top]))}</td>"
            f"<td>{_fmt(float(r.curve.proxy_mean[top]))}</td><td>{gn}</td><td>{gk}</td></tr>"
        )
    parts.append(
        "</table><p class='note'>Tables: bon_curves.csv / bon_curves.jsonl in the run folder. "
        "Estimator: unbiased all-subsets best-of-n (Nakano et al. 2021); fit: Gao et al. 2022.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)
