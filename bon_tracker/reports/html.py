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
.note { color: #555; font-size: 0.9em; }
"""


def _fmt(value: float, digits: int = 4) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _img(path: Path, alt: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def html_report(run_dir: Path, records: Sequence[EvalRecord], title: str | None = None) -> str:
    """Render the report; charts are read from ``run_dir/charts`` if present."""
    charts = Path(run_dir) / "charts"
    last = records[-1]
    c = last.curve
    name = html.escape(title or Path(run_dir).name)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{name} — bon_tracker</title><style>{REPORT_STYLE}</style></head><body>",
        f"<h1>Best-of-n report: {html.escape(title or Path(run_dir).name)}</h1>",
        f"<p class='note'>{len(records)} eval step(s); latest step {last.step}: "
        f"{int(c.n_prompts[0])} prompts, N = {c.N} samples per prompt"
        + (
            "; proxy has ties, so KL is the exact value over proxy levels (kl_bound is the continuous formula)"
            if c.has_ties
            else ""
        )
        + ".</p>",
    ]
    g = last.goodhart
    if g is not None:
        where = "within the measured range" if g.within_range else "extrapolated beyond the largest n measured"
        parts.append(
            f"<p><b>Goodhart point</b> at step {last.step}: n ≈ {g.n:.3g}, KL = {g.kl:.3g} nats ({where}); "
            f"past it, more best-of-n optimisation lowers the true reward. Fit R²(true) = {g.true_r2:.3f}.</p>"
        )
    else:
        parts.append(f"<p><b>No Goodhart point</b> at step {last.step}: the fitted true reward does not peak.</p>")
    parts.append(_img(charts / f"curve_step_{last.step:09d}.png", f"best-of-n curve at step {last.step}"))
    parts.append(_img(charts / "overlay.png", "curves over training"))
    parts.append(_img(charts / "trend.png", "reward against training step"))
    parts.append(_img(charts / "rl.png", "RL versus best-of-n"))
    parts.append(f"<h2>Curve at step {last.step}</h2><table><tr>")
    columns = ["n", "kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts"]
    parts.append("".join(f"<th>{col}</th>" for col in columns) + "</tr>")
    for row in c.rows():
        parts.append("<tr>" + "".join(f"<td>{_fmt(row[col])}</td>" for col in columns) + "</tr>")
    parts.append(
        "</table><h2>Over training</h2><table><tr><th>step</th><th>true@1</th>"
        f"<th>true@{c.n[-1]}</th><th>proxy@{c.n[-1]}</th><th>Goodhart n*</th><th>Goodhart KL*</th></tr>"
    )
    for r in records:
        ns = r.curve.n.tolist()
        top = len(ns) - 1
        t1 = _fmt(float(r.curve.true_mean[ns.index(1)])) if 1 in ns else "–"
        gn = _fmt(r.goodhart.n, 3) if r.goodhart else "–"
        gk = _fmt(r.goodhart.kl, 3) if r.goodhart else "–"
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
