"""The embedded default backend: a run folder, no server, no account.

Layout of ``<root>/<run_id>/``::

    run.json                 run metadata (id, name, version, grid, N, P)
    scalars.jsonl            one line per eval step: {"step": s, "bon/true/n1": ..., ...}
    bon_curves.jsonl/.csv    the bon_curves table, one row per (step, n)
    records/step_<step>.json the full EvalRecord of each step (what readers use)
    charts/                  curve_step_<step>.png, overlay.png, trend.png, rl.png
    report.html              a self-contained report (charts inlined)

Whole files are written atomically (temporary file + rename). The two tables and
scalars grow by appending whole lines in one write; a torn last line left by a
crash is cut off when the run is reopened, and the per-step record files (written
atomically, before the tables) are the source of truth that rebuilds them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from bon_tracker.backends.base import Backend
from bon_tracker.backends.chart_worker import ChartWorker
from bon_tracker.optional import MissingDependencyError, require
from bon_tracker.record import TABLE_COLUMNS, TABLE_NAME, EvalRecord
from bon_tracker.tracking.wal import atomic_write_text
from bon_tracker.version import __version__

logger = logging.getLogger("bon_tracker")

MAX_OVERLAY_CURVES = 20


def default_root() -> Path:
    """``$BON_TRACKER_DIR``, else ``./bon_runs``."""
    return Path(os.environ.get("BON_TRACKER_DIR") or "bon_runs")


def _append_lines(path: Path, lines: list[str]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, "".join(lines).encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: Path) -> None:
    """Drop a partial last line (a crash mid-append) so the file parses again."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)


def _csv_line(values: list[Any]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


class LocalBackend(Backend):
    """Writes each eval step into a run folder (tables, PNG charts, an HTML report).

    Args:
        root: the folder holding runs (default ``$BON_TRACKER_DIR`` or ``./bon_runs``).
        run_name: a readable name; the run folder is ``<run_name>`` if free, else
            ``<run_name>-<suffix>``.
        run_id: reopen an existing run folder ``<root>/<run_id>`` (resuming).
        charts: draw PNG charts and inline them in the report (needs matplotlib).
        background_charts: draw them on a background thread, so a step does not wait
            for matplotlib; :meth:`finish` waits for them (up to ``chart_timeout`` s).
    """

    name = "local"

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        charts: bool = True,
        background_charts: bool = True,
        chart_timeout: float = 120.0,
    ):
        self.root = Path(root) if root is not None else default_root()
        self.run_name = run_name
        self._run_id = run_id
        self.charts = charts
        self.run_dir: Path | None = None
        self._steps: set[int] = set()
        self._history: list[EvalRecord] = []
        self._warned_no_charts = False
        self._tables_suspect = False
        self.chart_timeout = chart_timeout
        self._worker = ChartWorker("local", background=background_charts)

    # ---- Backend interface --------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self._run_id

    def spec(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "root": str(self.root.resolve()),
            "run_id": self._run_id,
            "run_name": self.run_name,
            "charts": self.charts,
        }

    def log_eval(self, record: EvalRecord) -> None:
        run_dir = self._open()
        if self._tables_suspect:  # an earlier write failed midway: rebuild from the record files
            self._resume_existing(run_dir)
            self._tables_suspect = False
        if record.step not in self._steps:
            # The record file first: it is the source of truth if we crash below.
            atomic_write_text(run_dir / "records" / f"step_{record.step:09d}.json", json.dumps(record.to_json()))
            rows = record.table_rows()
            self._tables_suspect = True  # until all three appends are done
            _append_lines(run_dir / f"{TABLE_NAME}.jsonl", [json.dumps(r) + "\n" for r in rows])
            _append_lines(run_dir / f"{TABLE_NAME}.csv", [_csv_line([r[c] for c in TABLE_COLUMNS]) for r in rows])
            _append_lines(run_dir / "scalars.jsonl", [json.dumps({"step": record.step, **record.scalars()}) + "\n"])
            self._tables_suspect = False
            self._steps.add(record.step)
            self._history.append(record)
            self._write_meta(record)
        self._draw(record)

    def finish(self) -> None:
        self._worker.close(timeout=self.chart_timeout)
        if self.run_dir is not None and self._history:
            self._write_report(self._history)

    # ---- internals -----------------------------------------------------------------------
    def _open(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        if self._run_id is None:
            base = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_name) if self.run_name else time.strftime("%Y%m%d-%H%M%S")
            self._run_id = base if not (self.root / base).exists() else f"{base}-{uuid.uuid4().hex[:6]}"
        run_dir = self.root / self._run_id
        (run_dir / "records").mkdir(parents=True, exist_ok=True)
        (run_dir / "charts").mkdir(exist_ok=True)
        self.run_dir = run_dir
        self._resume_existing(run_dir)
        return run_dir

    def _resume_existing(self, run_dir: Path) -> None:
        """Reopening a run: load its records; rebuild the tables if a crash left them short."""
        self._history = read_records(run_dir)
        self._steps = {r.step for r in self._history}
        for name in (f"{TABLE_NAME}.jsonl", f"{TABLE_NAME}.csv", "scalars.jsonl"):
            _cut_torn_tail(run_dir / name)
        expected = [(r.step, int(n)) for r in self._history for n in r.curve.n]
        table = run_dir / f"{TABLE_NAME}.jsonl"
        logged = []
        if table.exists():
            logged = [(row["step"], row["n"]) for row in map(json.loads, table.read_text().splitlines())]
        scalars = run_dir / "scalars.jsonl"
        scalar_steps = (
            [json.loads(line)["step"] for line in scalars.read_text().splitlines()] if scalars.exists() else []
        )
        csv_path = run_dir / f"{TABLE_NAME}.csv"
        csv_rows = len(csv_path.read_text().splitlines()) - 1 if csv_path.exists() else -1
        if logged != expected or scalar_steps != [r.step for r in self._history] or csv_rows != len(expected):
            self._rebuild_tables(run_dir)

    def _rebuild_tables(self, run_dir: Path) -> None:
        rows = [row for r in self._history for row in r.table_rows()]
        atomic_write_text(run_dir / f"{TABLE_NAME}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(
            run_dir / f"{TABLE_NAME}.csv",
            _csv_line(list(TABLE_COLUMNS)) + "".join(_csv_line([r[c] for c in TABLE_COLUMNS]) for r in rows),
        )
        atomic_write_text(
            run_dir / "scalars.jsonl",
            "".join(json.dumps({"step": r.step, **r.scalars()}) + "\n" for r in self._history),
        )

    def _write_meta(self, record: EvalRecord) -> None:
        assert self.run_dir is not None
        meta = {
            "run_id": self._run_id,
            "run_name": self.run_name,
            "bon_tracker_version": __version__,
            "N": record.curve.N,
            "P": int(record.curve.n_prompts[0]),
            "ns": record.curve.n.tolist(),
            "steps": len(self._steps),
            "last_step": max(self._steps),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_text(self.run_dir / "run.json", json.dumps(meta, indent=2))

    def _draw(self, record: EvalRecord) -> None:
        """Queue this step's chart and the overview charts and report (drawn off-thread)."""
        if not self.charts:
            return
        try:
            require("matplotlib", "charts")
        except MissingDependencyError as err:
            if not self._warned_no_charts:
                logger.warning("bon_tracker: no charts in the local run folder: %s", err)
                self._warned_no_charts = True
            return
        from bon_tracker.reports import charts

        assert self.run_dir is not None
        out, history = self.run_dir / "charts", list(self._history)
        self._worker.submit(
            f"curve:{record.step}",
            lambda: _save_png(charts.curve_chart(record), out / f"curve_step_{record.step:09d}.png"),
        )

        def overview() -> None:
            _save_png(charts.overlay_chart(history, max_curves=MAX_OVERLAY_CURVES), out / "overlay.png")
            _save_png(charts.trend_chart(history), out / "trend.png")
            if any(r.policy is not None for r in history):
                _save_png(charts.rl_chart(history), out / "rl.png")
            self._write_report(history)

        self._worker.submit("overview", overview)

    def _write_report(self, history: list[EvalRecord]) -> None:
        from bon_tracker.reports.html import html_report

        assert self.run_dir is not None
        atomic_write_text(self.run_dir / "report.html", html_report(self.run_dir, history))


def _save_png(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _atomic_write_bytes(path, buffer.getvalue())


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_records(run_dir: str | Path) -> list[EvalRecord]:
    """The EvalRecords of a local run folder, by step."""
    records_dir = Path(run_dir) / "records"
    if not records_dir.is_dir():
        return []
    return [
        EvalRecord.from_json(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(records_dir.glob("step_*.json"))
    ]
