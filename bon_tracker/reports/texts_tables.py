"""The hack table and the text features as every tracking UI shows them (one builder, every backend).

A completion is data, never markup: each medium gets its own escaping here, so that a backend only
calls these builders. Names (see :mod:`bon_tracker.record` for the numbered sections)::

    bon/9_text/length_chars/pick     a text feature of best-of-N's pick, per eval step (also /all, /diff)
    bon/9_text/losing/share          share of prompts where best-of-N by proxy loses true reward
    bon_hacks                        the hack table of the step (step, then HackStatistics.table()'s columns)

Example:
    >>> markdown_cell("a|b\\n<i>")
    'a\\\\|b<br>&lt;i&gt;'
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bon_tracker.record import EvalRecord

HACKS_TABLE = "bon_hacks"
TEXT_SECTION = "9_text"  # after record.METRIC_SECTIONS' 8_agreement: the UIs sort sections by name
TABLE_DIGITS = 6  # significant digits of floats in markdown tables (the records keep every digit)

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_-]+")  # "." nests in W&B, other characters MLflow refuses
# Markdown's ASCII punctuation that changes rendering (emphasis, links, code, headings, tables):
# each is written with a backslash, so the cell shows the text as it is.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


def text_key(name: str, part: str, prefix: str = "bon") -> str:
    """The name of a text feature's scalar: ``{prefix}/9_text/{name}/{part}``, the feature's name
    with characters other than letters, digits, ``_`` and ``-`` written ``_``.

    >>> text_key("length_chars", "pick"), text_key("my.feature", "diff", "rm")
    ('bon/9_text/length_chars/pick', 'rm/9_text/my_feature/diff')
    """
    return f"{prefix}/{TEXT_SECTION}/{_UNSAFE_NAME.sub('_', name).strip('_') or 'feature'}/{part}"


def text_scalars(record: EvalRecord) -> dict[str, float]:
    """The text features of ``record`` as scalars (:func:`text_key`) and the share of prompts where
    best-of-N by proxy loses true reward (``{prefix}/9_text/losing/share``); empty without texts."""
    hacks = record.hacks
    if hacks is None:
        return {}
    out: dict[str, float] = {}
    for key, value in hacks.feature_scalars().items():
        name, part = key.rsplit("/", 1)
        if value is not None and math.isfinite(value):
            out[text_key(name, part, record.key_prefix)] = float(value)
    if hacks.prompts:
        out[text_key("losing", "share", record.key_prefix)] = hacks.prompts_losing / hacks.prompts
    return out


def hack_table(record: EvalRecord) -> tuple[tuple[str, ...], list[list[Any]]]:
    """``(columns, rows)`` of the step's hack table: ``step``, then the columns of
    :meth:`~bon_tracker.texts.HackStatistics.table`; ``(("step",), [])`` without texts."""
    if record.hacks is None:
        return ("step",), []
    columns, rows = record.hacks.table()
    return ("step", *columns), [[record.step, *row] for row in rows]


def hack_rows(record: EvalRecord) -> list[dict[str, Any]]:
    """The hack table as one dict per row (the local run folder's JSONL lines)."""
    columns, rows = hack_table(record)
    return [dict(zip(columns, row, strict=True)) for row in rows]


# ---- markdown (TensorBoard's text summaries) -----------------------------------------------------------


def markdown_cell(value: Any) -> str:
    """One markdown table cell showing ``value`` as it is: markdown punctuation backslashed, ``&``,
    ``<``, ``>`` as entities (TensorBoard's renderer passes no raw HTML), a newline as ``<br>``.
    Floats keep :data:`TABLE_DIGITS` significant digits; NaN and infinities show as ``–``/``inf``."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.{TABLE_DIGITS}g}"
    if value is None:
        return "–"
    text = str(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return text.replace("\r\n", "<br>").replace("\r", "<br>").replace("\n", "<br>")


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured markdown table (TensorBoard renders it in its Text tab), every cell escaped."""
    head = "| " + " | ".join(markdown_cell(c) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def hacks_summary(record: EvalRecord) -> str:
    """One sentence: how many prompts best-of-N by proxy loses true reward on, how many rows are shown."""
    h = record.hacks
    if h is None:
        return "no texts were logged at this step"
    shown = f"the {len(h.rows)} with the largest gap shown" if h.rows else "none to show"
    dropped = f" ({h.rows_dropped} more left out to bound the table's size)" if h.rows_dropped else ""
    return (
        f"step {record.step}: best-of-N by proxy loses true reward on {h.prompts_losing} of {h.prompts} "
        f"prompts; {shown}{dropped}; texts cut to {h.max_chars:,} characters"
    )


def hacks_markdown(record: EvalRecord) -> str:
    """The step's hack table for a TensorBoard text summary: a sentence, then the table."""
    columns, rows = hack_table(record)
    return markdown_cell(hacks_summary(record)) + "\n\n" + markdown_table(columns, rows)
