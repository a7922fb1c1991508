"""The frontier chart: true reward against KL for every selection rule at one eval step.

One panel per true reward. Each rule's best-of-n curve is a solid line (its hedged optimum a
star), its Best-of-Poisson curve a dashed line in the same colour; the black steps are the
frontier, the best rule within each KL budget (core/frontier.py), each change of leader labelled
with the rule's name. Soft best-of-n's KL is a sample KL (docs/selection.md), not ranked on the
frontier, so it is left out of the chart (it is in the tables). Built without pyplot, like
:mod:`bon_tracker.reports.charts`; backends save it as PNG (:func:`frontier_png`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from bon_tracker.reports.charts import RUN_COLORS, _figure, _kl_label, _placeholder

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bon_tracker.core.selection_stats import SelectionStatistics
    from bon_tracker.record import EvalRecord

FRONTIER_COLOR = "#111111"
MAX_RULES_DRAWN = len(RUN_COLORS)  # more rules than colours: the first ones (members, then mean, worst, uwo)


def frontier_chart(record: EvalRecord) -> Figure:
    """True reward against KL for every rule of ``record.selection``, the best rule per KL budget marked.

    Raises:
        ValueError: the record has no selection statistics.
    """
    stats = record.selection
    if stats is None:
        raise ValueError(f"the record of step {record.step} has no selection statistics (record.selection is None)")
    names = list(stats.true_names)
    fig = _figure(7.5, 1.0 + 3.6 * len(names))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    for ax, true_name in zip(axes, names, strict=True):
        _frontier_panel(ax, stats, true_name)
        ax.set_ylabel(f"{true_name} reward (true)")
    axes[-1].set_xlabel(_kl_label(False, "selection"))
    fig.suptitle(f"Selection rules at step {record.step}: true reward against KL", fontsize=10)
    return fig


def _frontier_panel(ax: Axes, stats: SelectionStatistics, true_name: str) -> None:
    rules = list(stats.rules)[:MAX_RULES_DRAWN]
    drawn = False
    for i, rule in enumerate(rules):
        s = stats.get(rule, true_name)
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for family, style in (("bon", "-"), ("bop", "--")):
            c = s.curve(family)
            kl, true = np.asarray(c.kl, dtype=float), np.asarray(c.true_mean, dtype=float)
            ok = np.isfinite(kl) & np.isfinite(true)
            if ok.sum() < 1:
                continue
            label = rule if family == "bon" else None  # the title says what dashed is: one entry per rule
            ax.plot(kl[ok], true[ok], style, color=color, lw=1.6 if family == "bon" else 1.0, label=label)
            drawn = True
        optimum = s.optimum("bon")
        if math.isfinite(optimum.kl) and math.isfinite(optimum.true_mean):
            ax.plot([optimum.kl], [optimum.true_mean], "*", color=color, ms=11, mec="black", mew=0.5)
    points = [
        p for p in stats.frontier.get(true_name, []) if "rule" in p and math.isfinite(p.get("true_mean", math.nan))
    ]
    if points:
        budgets = [p["kl_budget"] for p in points]
        best = [p["true_mean"] for p in points]
        ax.step(budgets, best, where="post", color=FRONTIER_COLOR, lw=1.2, label="best rule within the KL budget")
        leader = None
        for p in points:
            if p["rule"] != leader:
                leader = p["rule"]
                ax.annotate(
                    leader,
                    (p["kl_budget"], p["true_mean"]),
                    xytext=(3, 5),
                    textcoords="offset points",
                    fontsize=7.5,
                    color=FRONTIER_COLOR,
                )
                ax.plot([p["kl_budget"]], [p["true_mean"]], "o", color=FRONTIER_COLOR, ms=3.5)
        drawn = True
    if not drawn:
        _placeholder(ax, f"no finite point for {true_name}")
        return
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(rules) > 3 else 1)
    ax.set_title(
        f"{true_name}: solid best-of-n (star: hedged optimum), dashed Best-of-Poisson; black: the frontier",
        fontsize=8.5,
    )


def frontier_png(record: EvalRecord) -> bytes:
    """PNG bytes of :func:`frontier_chart`, drawn in the chart process (backends call it from
    the delivery worker, never the training thread; matplotlib never holds the GIL against training)."""
    from bon_tracker.reports import render

    return render.render_png("frontier", [record])
