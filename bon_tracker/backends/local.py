"""The embedded default backend: a run folder, no server, no account.

Layout of ``<root>/<run_id>/``::

    run.json                 run metadata (id, name, version, grid, N, P)
    scalars.jsonl            one line per eval step: {"step": s, "bon/true/n1": ..., ...}
    bon_curves.jsonl/.csv    the bon_curves table, one row per (step, n)
    bon_predictions.jsonl/.csv  the fitted law beyond the measured n, every row predicted=True
    alerts.jsonl             one line per alert onset or clear: {"step", "rule", "kind", "message", ...}
    records/step_<step>.json the full EvalRecord of each step (what readers use)
    bon_hacks/step_<step>.jsonl      the hack table of the step (texts were logged; docs/texts.md)
    bon_selection/step_<step>.jsonl  every selection rule's optima (selection statistics; docs/selection.md)
    bon_frontier/step_<step>.jsonl   the best rule per KL budget; charts/frontier_step_<step>.png its chart
    charts/                  curve_step_<step>.png, overlay.png, trend.png, rl.png
    report.html              a self-contained report (charts inlined)

Whole files are written atomically (temporary file + rename; no temporary file is
left when the disk refuses). The two tables and scalars grow by whole lines only
(:func:`bon_tracker.files.append_whole`: checked writes, a refused append is truncated
back), and the per-step record files (written atomically, before the tables) are the
source of truth that rebuilds them. One process writes a run folder: it holds
``<run>/.lock`` (``flock``, with its pid inside) while it lives; a second writer of the
same folder gets a :class:`ConfigurationError` naming the holder, and a new run whose
name is taken gets a folder of its own.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import io
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from bon_tracker.backends.base import Backend, ConfigurationError, classify_common
from bon_tracker.files import append_whole, atomic_write_bytes, atomic_write_text
from bon_tracker.optional import MissingDependencyError, require_installed
from bon_tracker.record import PREDICTION_COLUMNS, PREDICTIONS_TABLE, TABLE_COLUMNS, TABLE_NAME, EvalRecord
from bon_tracker.reports import selection_tables, texts_tables
from bon_tracker.version import __version__

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("bon_tracker")

MAX_OVERLAY_CURVES = 20
LOCK_FILE = ".lock"
RUN_KEY_FILE = ".run_key"  # the client-chosen identity of the run that made the folder
ALERTS_FILE = "alerts.jsonl"


def default_root() -> Path:
    """``$BON_TRACKER_DIR``, else ``./bon_runs``."""
    return Path(os.environ.get("BON_TRACKER_DIR") or "bon_runs")


def _append_lines(path: Path, lines: list[str]) -> None:
    append_whole(path, "".join(lines).encode("utf-8"))


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
        run_key, run_folder: the identity of a new run, chosen at construction and kept in
            :meth:`spec` (hence in the write-ahead log) before the folder exists, and the
            folder name it is made under; a process killed during its first delivery is
            continued in that same folder by ``bon-tracker sync``, never in a second one.
    """

    name = "local"
    extra = "charts"
    completes_at_finish = True

    def __init__(
        self,
        *,
        root: str | Path | None = None,
        run_name: str | None = None,
        run_id: str | None = None,
        charts: bool = True,
        run_key: str | None = None,
        run_folder: str | None = None,
    ):
        if root is not None and not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root must be a folder path (a string or a Path), got {type(root).__name__}")
        if run_name is not None and (not isinstance(run_name, str) or len(run_name) > 200 or not run_name.strip()):
            raise ValueError(f"run_name must be a string of 1 to 200 characters, got {run_name!r:.80}")
        self.root = Path(root) if root is not None else default_root()
        self.run_name = run_name
        self._run_id = run_id
        # Chosen now, so that the spec in the write-ahead log names the folder before it exists.
        self.run_key = run_key or uuid.uuid4().hex
        if run_folder is None:
            run_folder = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name) if run_name else time.strftime("%Y%m%d-%H%M%S")
        self._base_name = run_folder.strip(".") or "run"  # never "..": the folder stays under root
        self.charts = charts
        self.run_dir: Path | None = None
        self._lock_fd: int | None = None
        self._steps: set[int] = set()
        self._history: list[EvalRecord] = []
        self._warned_no_charts = False
        self._tables_suspect = False
        self._views_stale = False

    # ---- Backend interface --------------------------------------------------------------
    @property
    def run_id(self) -> str | None:
        return self._run_id

    def spec(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "root": str(self.root.absolute()),
            "run_id": self._run_id,
            "run_name": self.run_name,
            "charts": self.charts,
            **({"run_key": self.run_key, "run_folder": self._base_name} if self._run_id is None else {}),
        }

    def check(self) -> None:
        """Reopening a run folder that another live process writes is an error now."""
        if self._run_id is None or fcntl is None:
            return
        lock = self.root / self._run_id / LOCK_FILE
        if not lock.exists():
            return
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigurationError(_held_message(self.root / self._run_id, fd)) from None
        finally:
            os.close(fd)  # closing releases a lock taken just to look

    def classify(self, error: BaseException) -> str:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
            return "transient"  # the disk may take it later: keep retrying, never drop
        return classify_common(error)

    def log_eval(self, record: EvalRecord) -> None:
        run_dir = self._open()
        if self._tables_suspect:  # an earlier write failed midway: rebuild from the record files
            self._resume_existing(run_dir)
            self._tables_suspect = False
        if record.step not in self._steps:
            # Everything encoded before anything is written: a record that cannot be encoded
            # (rejected, dead-lettered) leaves neither a file nor a trace in this backend's state.
            record_text = json.dumps(record.to_json())
            rows = record.table_rows()
            table_lines = [json.dumps(r) + "\n" for r in rows]
            csv_lines = [_csv_line([r[c] for c in TABLE_COLUMNS]) for r in rows]
            scalar_line = json.dumps({"step": record.step, **_scalars(record)}) + "\n"
            # The record file first: it is the source of truth if we crash below.
            atomic_write_text(run_dir / "records" / f"step_{record.step:09d}.json", record_text)
            self._steps.add(record.step)
            self._history.append(record)
            self._history.sort(key=lambda r: r.step)
            self._tables_suspect = True  # until all three appends are done
            _append_lines(run_dir / f"{TABLE_NAME}.jsonl", table_lines)
            _append_lines(run_dir / f"{TABLE_NAME}.csv", csv_lines)
            _append_lines(run_dir / "scalars.jsonl", [scalar_line])
            self._append_extras(run_dir, [record])
            self._tables_suspect = False
            self._write_meta(record)
        self._write_step_tables(run_dir, record)
        self._draw_step(record)
        self._views_stale = True

    def refresh_views(self) -> None:
        """Overview charts and the report, over every step (drawn when delivery is idle)."""
        if self.run_dir is None or not self._views_stale:
            return
        self._views_stale = False
        if self._charts_available():
            from bon_tracker.reports.render import render_png

            out, history = self.run_dir / "charts", list(self._history)
            atomic_write_bytes(out / "overlay.png", render_png("overlay", history, max_curves=MAX_OVERLAY_CURVES))
            atomic_write_bytes(out / "trend.png", render_png("trend", history))
            if any(r.policy is not None for r in history):
                atomic_write_bytes(out / "rl.png", render_png("rl", history))
        self._write_report(self._history)

    def finish(self) -> None:
        if self.run_dir is not None and self._history:
            try:
                self.refresh_views()
            finally:
                self._release()

    def release(self) -> None:
        self._release()

    @property
    def location(self) -> str | None:
        if self.run_dir is None:
            return None
        report = self.run_dir / "report.html"
        return f"{self.run_dir}" + (f" (report: {report})" if report.exists() else "")

    @classmethod
    def claims(cls, ref: str) -> bool:
        return (Path(ref) / "records").is_dir()

    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[str, list[EvalRecord]]:
        path = Path(ref)
        if not (path / "records").is_dir():
            raise LookupError(f"{path}: not a local run folder (no records/ inside)")
        label = path.name
        meta = path / "run.json"
        if meta.is_file():
            with contextlib.suppress(OSError, ValueError):
                label = json.loads(meta.read_text(encoding="utf-8")).get("run_name") or label
        return label, read_records(path)

    # ---- internals -----------------------------------------------------------------------
    def _open(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        self.root.mkdir(parents=True, exist_ok=True)
        if self._run_id is None:
            self._run_id = self._folder_of_run_key() or self._new_folder()
        run_dir = self.root / self._run_id
        (run_dir / "records").mkdir(parents=True, exist_ok=True)
        (run_dir / "charts").mkdir(exist_ok=True)
        self._lock(run_dir)
        self.run_dir = run_dir
        self._resume_existing(run_dir)
        return run_dir

    def _new_folder(self) -> str:
        """A new run folder, named after the run, holding this backend's run key.

        The folder is made under a hidden name with the key inside, then renamed into place:
        a process killed at any moment leaves either no folder or one that names its run (a
        replay finds it by the key), and of two processes opening the same name one gets a
        new folder (a rename onto a folder holding a key fails)."""
        base = self._base_name
        staging = self.root / f".{base}.{self.run_key}.new"
        staging.mkdir(exist_ok=True)  # a killed attempt's staging folder is taken up again
        atomic_write_text(staging / RUN_KEY_FILE, self.run_key)
        run_id = base
        while True:
            try:
                os.rename(staging, self.root / run_id)  # atomic; onto an existing folder only if it is empty
                break
            except OSError as err:
                if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                    raise
                run_id = f"{base}-{uuid.uuid4().hex[:6]}"
        if run_id != base:
            logger.warning(
                "bon_tracker: the run folder %s holds another run; this run is written to %s "
                "(to continue that run instead, pass run_id=%r)",
                self.root / base,
                self.root / run_id,
                base,
            )
        return run_id

    def _folder_of_run_key(self) -> str | None:
        """The folder this backend's run key made before (a process killed during its first
        delivery, continued by ``bon-tracker sync`` or a resumed tracker): never a second one."""
        base = self._base_name
        for folder in sorted(self.root.glob(f"{glob.escape(base)}*")):
            with contextlib.suppress(OSError):
                if (folder.name == base or folder.name.startswith(f"{base}-")) and (
                    (folder / RUN_KEY_FILE).read_text(encoding="utf-8") == self.run_key
                ):
                    return folder.name
        return None

    def _lock(self, run_dir: Path) -> None:
        """Hold the run folder's lock while this backend lives (one writer per folder)."""
        if fcntl is None:
            return
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            message = _held_message(run_dir, fd)
            os.close(fd)
            raise ConfigurationError(message) from None
        with contextlib.suppress(OSError):  # the pid is for messages only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _resume_existing(self, run_dir: Path) -> None:
        """Reopening a run: load its records; rebuild the tables if a crash left them short."""
        self._history = read_records(run_dir)
        self._steps = {r.step for r in self._history}
        expected = [(r.step, int(n)) for r in self._history for n in r.curve.n]
        table = run_dir / f"{TABLE_NAME}.jsonl"
        logged = []
        with contextlib.suppress(ValueError):
            if table.exists():
                logged = [(row["step"], row["n"]) for row in map(json.loads, _whole_lines(table))]
        scalars = run_dir / "scalars.jsonl"
        scalar_steps = []
        with contextlib.suppress(ValueError):
            scalar_steps = [json.loads(line)["step"] for line in _whole_lines(scalars)] if scalars.exists() else []
        csv_path = run_dir / f"{TABLE_NAME}.csv"
        csv_rows = len(_whole_lines(csv_path)) - 1 if csv_path.exists() else -1
        alert_lines = len(_whole_lines(run_dir / ALERTS_FILE)) if (run_dir / ALERTS_FILE).exists() else 0
        short = alert_lines != sum(len(r.alerts) for r in self._history)
        if short or logged != expected or scalar_steps != [r.step for r in self._history] or csv_rows != len(expected):
            self._rebuild_tables(run_dir)

    @staticmethod
    def _append_extras(run_dir: Path, records: list[EvalRecord]) -> None:
        """The alerts and predictions of ``records`` (files made on their first line)."""
        alerts = [json.dumps(_alert_line(r, e)) + "\n" for r in records for e in r.alerts]
        if alerts:
            _append_lines(run_dir / ALERTS_FILE, alerts)
        rows = [row for r in records for row in r.prediction_rows()]
        if rows:
            csv_path = run_dir / f"{PREDICTIONS_TABLE}.csv"
            header = [] if csv_path.exists() else [_csv_line(list(PREDICTION_COLUMNS))]
            _append_lines(run_dir / f"{PREDICTIONS_TABLE}.jsonl", [json.dumps(r) + "\n" for r in rows])
            _append_lines(csv_path, header + [_csv_line([r[c] for c in PREDICTION_COLUMNS]) for r in rows])

    def _rebuild_tables(self, run_dir: Path) -> None:
        rows = [row for r in self._history for row in r.table_rows()]
        atomic_write_text(run_dir / f"{TABLE_NAME}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_text(
            run_dir / f"{TABLE_NAME}.csv",
            _csv_line(list(TABLE_COLUMNS)) + "".join(_csv_line([r[c] for c in TABLE_COLUMNS]) for r in rows),
        )
        atomic_write_text(
            run_dir / "scalars.jsonl",
            "".join(json.dumps({"step": r.step, **_scalars(r)}) + "\n" for r in self._history),
        )
        for name in (ALERTS_FILE, f"{PREDICTIONS_TABLE}.jsonl", f"{PREDICTIONS_TABLE}.csv"):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
        self._append_extras(run_dir, self._history)

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

    def _charts_available(self) -> bool:
        if not self.charts:
            return False
        try:
            require_installed("matplotlib", "charts")
        except MissingDependencyError as err:
            if not self._warned_no_charts:
                logger.warning("bon_tracker: no charts in the local run folder: %s", err)
                self._warned_no_charts = True
            return False
        return True

    def _draw_step(self, record: EvalRecord) -> None:
        """This step's curve chart (the delivery worker's thread: training does not wait)."""
        if not self._charts_available():
            return
        from bon_tracker.reports.render import render_png

        assert self.run_dir is not None
        png = render_png("curve", [record])  # drawn in the chart process: no GIL held here
        atomic_write_bytes(self.run_dir / "charts" / f"curve_step_{record.step:09d}.png", png)

    def _write_step_tables(self, run_dir: Path, record: EvalRecord) -> None:
        """The step's hack, selection and frontier tables (JSONL, one row a line; texts as JSON strings)
        and the frontier chart; written whole by path, so a replayed step rewrites the same files."""
        name = f"step_{record.step:09d}"
        tables = {
            texts_tables.HACKS_TABLE: texts_tables.hack_rows(record) if record.hacks is not None else None,
            selection_tables.SELECTION_TABLE: None,
            selection_tables.FRONTIER_TABLE: None,
        }
        if record.selection is not None:
            tables[selection_tables.SELECTION_TABLE] = selection_tables.as_dicts(
                selection_tables.selection_table(record)
            )
            tables[selection_tables.FRONTIER_TABLE] = selection_tables.as_dicts(selection_tables.frontier_table(record))
        for table, rows in tables.items():
            if rows is not None:
                lines = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
                atomic_write_text(run_dir / table / f"{name}.jsonl", lines)
        if record.selection is not None and self._charts_available():
            from bon_tracker.reports.selection_charts import frontier_png

            atomic_write_bytes(run_dir / "charts" / f"frontier_{name}.png", frontier_png(record))

    def _write_report(self, history: list[EvalRecord]) -> None:
        from bon_tracker.reports.html import html_report

        assert self.run_dir is not None
        atomic_write_text(self.run_dir / "report.html", html_report(self.run_dir, history))


def _scalars(record: EvalRecord) -> dict[str, float]:
    """One line of ``scalars.jsonl``: the record's scalars and its text features (docs/texts.md)."""
    return {**record.scalars(), **texts_tables.text_scalars(record)}


def _held_message(run_dir: Path, lock_fd: int) -> str:
    holder = "another process"
    with contextlib.suppress(OSError, ValueError):
        holder = f"process {int(os.pread(lock_fd, 32, 0).decode().strip())}"
    return (
        f"the local run folder {run_dir} is being written by {holder}; one writer per run folder: "
        "use another run_name, or wait until that process has finished"
    )


def _alert_line(record: EvalRecord, event: Any) -> dict[str, Any]:
    return {"step": record.step, "key_prefix": record.key_prefix, **event.to_dict()}


def read_alerts(run_dir: str | Path) -> list[dict[str, Any]]:
    """The lines of a local run's ``alerts.jsonl`` (onsets and clears, by step); [] without alerts."""
    path = Path(run_dir) / ALERTS_FILE
    return [json.loads(line) for line in _whole_lines(path)] if path.exists() else []


def _whole_lines(path: Path) -> list[str]:
    """The complete lines of a file (an unterminated last line, torn by a crash, left out)."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1].decode("utf-8").splitlines()


def read_records(run_dir: str | Path) -> list[EvalRecord]:
    """The EvalRecords of a local run folder, by step."""
    records_dir = Path(run_dir) / "records"
    if not records_dir.is_dir():
        return []
    return [
        EvalRecord.from_json(json.loads(p.read_text(encoding="utf-8"))) for p in sorted(records_dir.glob("step_*.json"))
    ]
