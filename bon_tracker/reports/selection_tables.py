"""The selection statistics as every tracking UI shows them: the optima table and the frontier table.

One builder per table, shared by every backend (W&B and trackio tables, MLflow table artifacts,
TensorBoard text summaries, the local run folder and its report)::

    bon_selection   per (true reward, rule, family, method): the optimum, its interval, status,
                    the true reward and the KL there (SelectionStatistics.table())
    bon_frontier    per (true reward, KL budget): the best rule within the budget, its family
                    and parameter value, its KL and true reward (SelectionStatistics.frontier)
    bon/0_frontier  the chart (bon_tracker.reports.selection_charts.frontier_chart)

Non-finite numbers (an optimum beyond the grid is ``inf``; its ``status`` says so) are ``None``
in the tables, as MLflow's and pandas' JSON writes them; the records keep every value.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from bon_tracker.reports.texts_tables import markdown_cell, markdown_table

if TYPE_CHECKING:
    from bon_tracker.record import EvalRecord

SELECTION_TABLE = "bon_selection"
FRONTIER_TABLE = "bon_frontier"
SELECTION_COLUMNS = (
    "step",
    "true",
    "rule",
    "family",
    "parameter",
    "method",
    "optimum",
    "low",
    "high",
    "status",
    "true_mean",
    "kl",
)
FRONTIER_COLUMNS = ("step", "true", "kl_budget", "rule", "family", "value", "kl", "true_mean", "true_se")


def frontier_image_key(prefix: str = "bon") -> str:
    """The key of the per-step frontier chart, listed after the curve's (``{prefix}/0_curve``).

    >>> frontier_image_key()
    'bon/0_frontier'
    """
    return f"{prefix}/0_frontier"


def table_cell(value: Any) -> Any:
    """A table cell: a non-finite float as None (strict JSON, every UI), anything else as it is."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def selection_table(record: EvalRecord) -> tuple[tuple[str, ...], list[list[Any]]]:
    """``(SELECTION_COLUMNS, rows)``: every rule's optima at this step; no rows without selection statistics."""
    stats = record.selection
    if stats is None:
        return SELECTION_COLUMNS, []
    rows = [{"step": record.step, **row} for row in stats.table()]
    return SELECTION_COLUMNS, [[table_cell(row.get(c)) for c in SELECTION_COLUMNS] for row in rows]


def frontier_table(record: EvalRecord) -> tuple[tuple[str, ...], list[list[Any]]]:
    """``(FRONTIER_COLUMNS, rows)``: the best rule within each KL budget, per true reward (a budget that
    no rule fits has only its ``kl_budget``)."""
    stats = record.selection
    if stats is None:
        return FRONTIER_COLUMNS, []
    rows = []
    for true_name in stats.true_names:
        for point in stats.frontier.get(true_name, []):
            row = {"step": record.step, "true": true_name, **point}
            rows.append([table_cell(row.get(c)) for c in FRONTIER_COLUMNS])
    return FRONTIER_COLUMNS, rows


def as_dicts(table: tuple[tuple[str, ...], list[list[Any]]]) -> list[dict[str, Any]]:
    """The rows of ``(columns, rows)`` as dicts (the local run folder's JSONL lines)."""
    columns, rows = table
    return [dict(zip(columns, row, strict=True)) for row in rows]


def best_rules(record: EvalRecord) -> dict[str, str]:
    """Per true reward, the rule with the highest true reward at its hedged optimum (``derivative_root``
    of best-of-n), the sentence's subject; empty without selection statistics."""
    stats = record.selection
    if stats is None:
        return {}
    out = {}
    for true_name in stats.true_names:
        scored = [
            (o.true_mean, s.rule)
            for s in stats.statistics
            if s.true_name == true_name
            for o in s.optima
            if o.family == "bon" and o.method == "derivative_root" and math.isfinite(o.true_mean)
        ]
        if scored:
            out[true_name] = max(scored)[1]
    return out


def selection_summary(record: EvalRecord) -> str:
    """One sentence per true reward: which rule reaches the highest true reward at its optimum."""
    best = best_rules(record)
    if not best:
        return "no selection statistics at this step"
    return "; ".join(
        f"step {record.step}, {name}: best rule at its hedged optimum is {rule}" for name, rule in best.items()
    )


def selection_markdown(record: EvalRecord) -> str:
    """The step's optima and frontier for a TensorBoard text summary: a sentence, then both tables."""
    return "\n\n".join(
        [
            markdown_cell(selection_summary(record)),
            "**optima**",
            markdown_table(*selection_table(record)),
            "**best rule per KL budget**",
            markdown_table(*frontier_table(record)),
        ]
    )
