"""trackio backend: scalars, the curve table, the chart and alerts in a trackio run.

trackio is local-first: a run lives in a SQLite file per project under trackio's folder
(``$TRACKIO_DIR``, default ``~/.cache/huggingface/trackio``; read once, when trackio is
first imported), and ``trackio show`` opens the dashboard. What one eval step writes, as
one ``run.log(..., step=<training step>)`` (``pre`` is the record's key prefix):

* every scalar of :meth:`EvalRecord.scalars`;
* ``{pre}/bon_curves``: the step's curve table (``trackio.Table``, columns ``TABLE_COLUMNS``,
  floats to ``TABLE_DIGITS`` significant digits: the dashboard shows every digit it is given);
* ``{pre}/bon_predictions``: the fitted law beyond the measured n, when there are predictions;
* ``{pre}/0_curve`` (:func:`~bon_tracker.record.curve_image_key`): the compact chart of
  :func:`bon_tracker.reports.charts.compact_chart` (true reward against n, legible in the
  dashboard's 182-px thumbnail), and ``{pre}/0_curve_full``: the full two-panel
  :func:`~bon_tracker.reports.charts.curve_chart` (``trackio.Image``, full size on a click);
* with texts: ``{pre}/bon_hacks`` (``trackio.Table``) and the text features as metrics
  ``{pre}/9_text/<feature>/pick`` ...; with selection statistics: ``{pre}/bon_selection``,
  ``{pre}/bon_frontier`` and the chart ``{pre}/0_frontier`` (docs/texts.md, docs/selection.md);
* ``{pre}/eval_record``: the record as a JSON string (not plotted), which
  :meth:`TrackioBackend.read_records` reads back exactly.

Alerts of the tracker (the Goodhart point passed, true reward falling while proxy rises)
go to trackio's own ``Run.alert``: printed, stored with the run, shown in the dashboard,
and POSTed to a webhook when one is configured (``TRACKIO_WEBHOOK_URL``). N, P, the n grid and
the reward names are the run's config.

Open the dashboard at :func:`dashboard_url` (``trackio show --project P``, then
``http://127.0.0.1:7860/?project=P&smoothing=0``): trackio's default smoothing averages up to
10 points around each, which over a run of a few eval steps turns a falling true reward into
a rising line and a 0/1 alert into a ramp.

The backend writes into the trackio run that is active on the training thread (the one
``trackio.init`` or transformers' ``report_to="trackio"`` started), or into ``run``;
otherwise it starts its own run on the first record and finishes only that one. A step
already in the run (logged by this process, or found in the local store) is skipped, so a
replayed record duplicates nothing.

A record counts as delivered only once it is in trackio's local store. ``run.log`` itself
only queues a row (trackio's own thread writes it up to half a second later) and never
raises: a row the store refuses (a full disk, a database locked by another process for
longer than trackio waits) is dropped with a warning. So for a run in the local store,
:meth:`TrackioBackend.log_eval` saves the chart image first (a refused file raises),
makes trackio write the queued row at once, and reads the step back from the store;
a step that is not there raises, and the delivery worker retries it. A process killed
after the acknowledgement therefore never loses the step, and a retry never writes it
twice (the store is asked first). A replay (``bon-tracker sync``) continues the run of
its own id, also when another run of the same name was started later.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sqlite3
import sys
import time
from collections.abc import Mapping
from typing import Any

from bon_tracker.backends.base import Backend, ConfigurationError, RejectedRecord, RunNotFoundError, classify_common
from bon_tracker.optional import MissingDependencyError, require
from bon_tracker.record import (
    PREDICTION_COLUMNS,
    PREDICTIONS_TABLE,
    TABLE_COLUMNS,
    TABLE_NAME,
    EvalRecord,
    curve_image_key,
)
from bon_tracker.reports import selection_tables, texts_tables

logger = logging.getLogger("bon_tracker")

DEFAULT_PROJECT = "bon_tracker"
RECORD_KEY = "eval_record"
_RESUME = ("never", "allow", "must")
_LEVELS = {"info": "info", "warn": "warn", "warning": "warn", "error": "error"}
TABLE_DIGITS = 6  # significant digits of the tables shown; the exact values are in the record
FULL_CHART_SUFFIX = "_full"  # {curve image key}_full: the full two-panel chart
LOCAL_UI = "http://127.0.0.1:7860"  # where `trackio show` serves by default (GRADIO_SERVER_PORT)
STORE_WAIT = 5.0  # seconds to wait for trackio's own thread to store a row, where it cannot be asked to


def dashboard_url(project: str, base_url: str = LOCAL_UI) -> str:
    """The dashboard of ``project`` with smoothing off (``&smoothing=0``).

    >>> dashboard_url("goodhart demo")
    'http://127.0.0.1:7860/?project=goodhart+demo&smoothing=0'
    """
    from urllib.parse import urlencode

    return f"{base_url.rstrip('/')}/?{urlencode({'project': project, 'smoothing': 0})}"


def _table_cell(value: Any) -> Any:
    """A table cell as shown: floats to ``TABLE_DIGITS`` significant digits (NaN stays NaN)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{TABLE_DIGITS}g}")
    return value


class NotStoredError(RuntimeError):
    """trackio took a row but its local store does not hold it (trackio only warned): retried."""


def _current_run() -> Any:
    """The trackio run active in this thread's context, without importing trackio."""
    trackio = sys.modules.get("trackio")
    return trackio.context_vars.current_run.get() if trackio is not None else None


class TrackioBackend(Backend):
    """Logs eval records to a trackio run.

    Args:
        project: trackio project of a run this backend starts (default ``bon_tracker``).
        run: a ``trackio`` run object to write into.
        run_name: name of a run this backend starts.
        run_id: trackio's id of the run to continue (with ``run_name``), from :meth:`spec`.
        resume: ``trackio.init``'s ``resume`` for a run this backend starts:
            ``"never"`` (a new run), ``"allow"`` or ``"must"`` (continue ``run_name``).
        group: trackio group of a run this backend starts.
        charts: log the curve chart as an image per step (needs matplotlib).
        init_kwargs: more arguments for ``trackio.init`` (``config``, ``space_id``,
            ``server_url``, ``webhook_url``...). System-metric logging is off unless asked
            for (``auto_log_cpu=True``); the dashboard is never started here.

    Example:
        >>> backend = TrackioBackend(project="demo", run_name="ppo-1")
        >>> backend.run_id is None, backend.spec()["project"]
        (True, 'demo')
    """

    name = "trackio"
    extra = "trackio"

    def __init__(
        self,
        *,
        project: str | None = None,
        run: Any = None,
        run_name: str | None = None,
        run_id: str | None = None,
        resume: str = "never",
        group: str | None = None,
        charts: bool = True,
        init_kwargs: Mapping[str, Any] | None = None,
    ):
        if resume not in _RESUME:
            raise ValueError(f"resume must be one of {', '.join(_RESUME)}, got {resume!r}")
        if resume == "must" and not run_name:
            raise ValueError("resume='must' needs the run_name of the run to continue")
        if not isinstance(charts, bool):
            raise ValueError(f"charts must be true or false, got {charts!r}")
        self.project = project
        self.run_name = run_name
        self.resume = resume
        self.group = group
        self.charts = charts
        self.init_kwargs = dict(init_kwargs or {})
        self._given_run = run
        self._bound_run: Any = None
        self._run: Any = None
        self._run_id = run_id
        self._owns_run = False
        self._logged: set[tuple[str, int]] = set()  # (prefix, step) the run holds
        self._scanned = False  # the steps already in the open run's local store are in _logged
        self._last_step: int | None = None
        self._warned_no_charts = False

    # ---- identity ----------------------------------------------------------------------
    @property
    def run(self) -> Any:
        """The trackio run written to (None before the first :meth:`log_eval`)."""
        return self._run

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else self._run_id

    @property
    def location(self) -> str | None:
        run = self._run
        if run is None:
            return None
        return (
            f"trackio run {run.name} in project {run.project} "
            f"(view: trackio show --project {run.project}, then {dashboard_url(run.project)})"
        )

    def spec(self) -> dict[str, Any]:
        """Rebuilds a backend that continues this run: ``resume="must"`` once it holds a
        record (before, ``"allow"``: a run trackio's store does not know yet cannot be resumed)."""
        run = self._run or self._given_run or self._bound_run
        if run is None:
            resume = self.resume
        elif self._run is not None and self._owns_run and not self._logged:
            resume = "allow"  # a run this backend started that holds nothing yet: trackio may not know it
        else:
            resume = "must"
        spec: dict[str, Any] = {
            "backend": self.name,
            "project": run.project if run is not None else self.project or DEFAULT_PROJECT,
            "run_name": run.name if run is not None else self.run_name,
            "run_id": self.run_id,
            "resume": resume,
        }
        if self.group is not None:
            spec["group"] = self.group
        if not self.charts:
            spec["charts"] = False
        if self.init_kwargs:
            spec["init_kwargs"] = self.init_kwargs
        return spec

    def bind(self) -> None:
        """Remember the trackio run active on the caller's (training) thread: trackio keeps
        it in a context variable, which the delivery thread does not see."""
        if self._given_run is None and self._bound_run is None:
            self._bound_run = _current_run()

    def check(self) -> None:
        """Raise :class:`ConfigurationError` for a project name trackio refuses."""
        require("trackio", "trackio")
        from trackio.sqlite_storage import SQLiteStorage

        try:
            SQLiteStorage.validate_project_name(self.project or DEFAULT_PROJECT)
        except ValueError as err:
            raise ConfigurationError(str(err)) from err

    def classify(self, error: BaseException) -> str:
        """A locked or busy SQLite store is retried; a value trackio cannot take (a table
        or image it refuses) rejects the record."""
        if isinstance(error, (ConfigurationError, MissingDependencyError, RejectedRecord)):
            return classify_common(error)
        if isinstance(error, (sqlite3.OperationalError, NotStoredError, OSError)):
            return "transient"  # a busy, locked or full store or disk: it may take the row later
        if isinstance(error, (ValueError, TypeError)):
            return "rejected"
        return classify_common(error)

    # ---- writing -------------------------------------------------------------------------
    def log_eval(self, record: EvalRecord) -> None:
        """Log the step's scalars, table, chart and record in one ``run.log`` call; for a run
        in the local store, return only once the store holds the step (see the module docstring)."""
        trackio = require("trackio", "trackio")
        run = self._open(trackio, record)
        key = (record.key_prefix, record.step)
        local = _in_local_store(run)
        if key in self._logged or (local and _stored(run, key)):  # the store first: an earlier attempt may be there
            logger.debug("bon_tracker: trackio run %s already has %s step %d; skipped", run.name, *key)
            self._logged.add(key)
            return
        row = self._row(trackio, record, run)
        run.log(row, step=record.step)
        if local:
            _write_now(run)
            if not _wait_stored(run, key):
                raise NotStoredError(
                    f"trackio did not store step {record.step} of run {run.name!r} in "
                    f"{_db_path(run)} (trackio's warning says why); retried"
                )
        self._logged.add(key)
        self._last_step = record.step

    def alert(self, title: str, text: str, level: str = "WARN", *, step: int | None = None) -> None:
        """Raise a trackio alert on the run, at ``step`` (default: the last eval step logged)."""
        trackio = require("trackio", "trackio")
        run = self._open(trackio)
        alert_level = trackio.AlertLevel(_LEVELS.get(str(level).lower(), "warn"))
        run.alert(title=title, text=text, level=alert_level, step=self._last_step if step is None else step)
        if _in_local_store(run):
            _write_now(run)  # stored now, not half a second later (a crash would lose it)

    def finish(self) -> None:
        """Finish the run if this backend started it (trackio then writes what it queued)."""
        run, self._run = self._run, None
        if run is None:
            return
        self._scanned = False
        self._run_id, self.run_name, self.project = run.id, run.name, run.project
        if self._owns_run:
            run.finish()
            trackio = sys.modules.get("trackio")
            if trackio is not None and trackio.context_vars.current_run.get() is run:
                trackio.context_vars.current_run.set(None)
            if self._logged:
                self.resume = "must"  # a later log_eval continues this same run
            else:
                self._run_id = None  # it holds nothing: trackio's store knows no such run
        self._owns_run = False

    # ---- internals -----------------------------------------------------------------------
    def _open(self, trackio: Any, record: EvalRecord | None = None) -> Any:
        """The run to write into: the one given, the training thread's, this thread's, or a new one."""
        if self._run is not None:
            if not self._scanned:
                self._scan()
            return self._run
        run = self._given_run or self._bound_run or trackio.context_vars.current_run.get()
        if run is not None:
            self._run, self._owns_run = run, False
        else:
            options: dict[str, Any] = {
                "project": self.project or DEFAULT_PROJECT,
                "name": self.run_name,
                "group": self.group,
                "resume": self.resume,
                "embed": False,
                "auto_log_gpu": False,
                "auto_log_cpu": False,
                **self.init_kwargs,
            }
            if record is not None:  # N, P, the grid and reward names as the run's config
                options["config"] = {**record.run_params(), **(options.get("config") or {})}
            try:
                self._run = trackio.init(**{k: v for k, v in options.items() if v is not None})
            except ValueError as err:  # a refused project name, resume="must" without such a run
                raise ConfigurationError(f"trackio.init failed: {err}") from err
            self._owns_run = True
            if self._run_id is not None and self._run.id != self._run_id:
                self._run = self._continue_by_id(trackio, self._run, options)
        self._scan()
        return self._run

    def _scan(self) -> None:
        """The steps already in the open run's local store (a resumed or attached run)."""
        self._logged |= _stored_steps(self._run)
        self._scanned = True

    def _continue_by_id(self, trackio: Any, resumed: Any, options: dict[str, Any]) -> Any:
        """trackio resumes the latest run of a name; a replay belongs to the run of its own
        id (two processes may have started runs of the same name). Continue that one when
        the local store has it."""
        if not _in_local_store(resumed) or not _run_exists(resumed.project, self._run_id):
            logger.warning(
                "bon_tracker: trackio resumed run %s with id %s, not %s", resumed.name, resumed.id, self._run_id
            )
            return resumed
        resumed.finish()  # nothing logged to it: it writes nothing
        run = trackio.Run(
            url=None,
            project=resumed.project,
            client=None,
            name=resumed.name,
            run_id=self._run_id,
            group=options.get("group"),
            config=options.get("config"),
            auto_log_gpu=False,
            auto_log_cpu=False,
        )
        trackio.context_vars.current_run.set(run)
        logger.info("bon_tracker: continuing trackio run %s of id %s (not the latest of that name)", run.name, run.id)
        return run

    def _row(self, trackio: Any, record: EvalRecord, run: Any) -> dict[str, Any]:
        pre = record.key_prefix
        row: dict[str, Any] = {**record.scalars(), **texts_tables.text_scalars(record)}
        row[f"{pre}/{TABLE_NAME}"] = trackio.Table(
            columns=list(TABLE_COLUMNS),
            data=[[_table_cell(r[c]) for c in TABLE_COLUMNS] for r in record.table_rows()],
        )
        predictions = record.prediction_rows()
        if predictions:
            row[f"{pre}/{PREDICTIONS_TABLE}"] = trackio.Table(
                columns=list(PREDICTION_COLUMNS),
                data=[[_table_cell(r[c]) for c in PREDICTION_COLUMNS] for r in predictions],
            )
        for chart, key in (("compact", curve_image_key(pre)), ("curve", curve_image_key(pre) + FULL_CHART_SUFFIX)):
            image = self._curve_image(trackio, record, chart)
            if image is not None:
                _save_media(image, run, record.step)
                row[key] = image
        row.update(self._selection_and_text_media(trackio, record, run))
        row[f"{pre}/{RECORD_KEY}"] = json.dumps(record.to_json(), allow_nan=True, separators=(",", ":"))
        return row

    def _selection_and_text_media(self, trackio: Any, record: EvalRecord, run: Any) -> dict[str, Any]:
        """``{pre}/bon_hacks`` (the hack table), ``{pre}/bon_selection`` and ``{pre}/bon_frontier``
        (``trackio.Table``, floats to ``TABLE_DIGITS`` digits, texts as they are) and ``{pre}/0_frontier``
        (the frontier chart, ``trackio.Image``); only what the record holds."""
        pre, out = record.key_prefix, {}
        tables = []
        if record.hacks is not None:
            tables.append((texts_tables.HACKS_TABLE, texts_tables.hack_table(record)))
        if record.selection is not None:
            tables.append((selection_tables.SELECTION_TABLE, selection_tables.selection_table(record)))
            tables.append((selection_tables.FRONTIER_TABLE, selection_tables.frontier_table(record)))
        for name, (columns, rows) in tables:
            out[f"{pre}/{name}"] = trackio.Table(
                columns=list(columns), data=[[_table_cell(v) for v in row] for row in rows]
            )
        if record.selection is not None and self.charts:
            try:
                from bon_tracker.reports.selection_charts import frontier_png

                png = frontier_png(record)
            except MissingDependencyError as err:
                if not self._warned_no_charts:
                    logger.warning("bon_tracker: no frontier images in trackio: %s", err)
                    self._warned_no_charts = True
                return out
            from PIL import Image  # a dependency of trackio (and of matplotlib)

            image = trackio.Image(Image.open(io.BytesIO(png)), caption=f"selection rules at step {record.step}")
            _save_media(image, run, record.step)
            out[selection_tables.frontier_image_key(pre)] = image
        return out

    def _curve_image(self, trackio: Any, record: EvalRecord, chart: str = "curve") -> Any:
        if not self.charts:
            return None
        try:
            from bon_tracker.reports.render import render_png

            png = render_png(chart, [record])  # drawn in the chart process: no GIL held here
        except MissingDependencyError as err:
            if not self._warned_no_charts:
                logger.warning("bon_tracker: no curve images in trackio: %s", err)
                self._warned_no_charts = True
            return None
        from PIL import Image  # a dependency of trackio (and of matplotlib)

        return trackio.Image(Image.open(io.BytesIO(png)), caption=f"best-of-n at step {record.step}")

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[str, list[EvalRecord]]:
        """``(label, records)`` of the run ``ref`` = ``PROJECT/RUN_NAME`` in the local store
        (the latest run of that name, as ``trackio.init(resume=...)`` picks it; pass
        ``run_id=`` to choose another). The label is the run's name.

        Raises:
            RunNotFoundError: no such project or run in the local store.
        """
        require("trackio", "trackio")
        import trackio

        project, _, run_name = ref.partition("/")
        if not project or not run_name:
            raise RunNotFoundError(f"trackio:{ref}: expected PROJECT/RUN_NAME")
        try:
            runs = [r for r in trackio.Api().runs(project) if r.name == run_name]
        except ValueError as err:  # "Project ... does not exist"
            raise RunNotFoundError(f"trackio:{ref}: {err}") from None
        run_id = options.get("run_id")
        if run_id is not None:
            runs = [r for r in runs if r.id == run_id]
        if not runs:
            where = f" with id {run_id}" if run_id else ""
            raise RunNotFoundError(f"trackio:{ref}: project {project!r} has no run named {run_name!r}{where}")
        return run_name, _records(project, runs[-1].name, runs[-1].id)


def _records(project: str, run_name: str, run_id: str | None) -> list[EvalRecord]:
    from trackio.sqlite_storage import SQLiteStorage

    records: dict[tuple[str, int], EvalRecord] = {}
    for row in SQLiteStorage.get_logs(project, run=run_name, run_id=run_id):
        for key, value in row.items():
            if key.endswith(f"/{RECORD_KEY}") and isinstance(value, str):
                record = EvalRecord.from_json(json.loads(value))
                records[(record.key_prefix, record.step)] = record
    return sorted(records.values(), key=lambda r: (r.step, r.key_prefix))


def _in_local_store(run: Any) -> bool:
    """Whether the run writes trackio's local SQLite store (not a Space, a server, or
    trackio's JSONL fragments), which this process can read back."""
    if getattr(run, "url", None) is not None or getattr(run, "_is_local", True) is False:
        return False
    return getattr(run, "_storage_mode", "sqlite") == "sqlite"


def _db_path(run: Any) -> Any:
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage.get_project_db_path(run.project)


def _query(project: str, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Rows of a read-only query on a project's local store ([] before it exists). A plain
    connection: trackio's own set one up first (a write), which a full disk refuses."""
    from trackio.sqlite_storage import SQLiteStorage

    path = SQLiteStorage.get_project_db_path(project)
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(str(path), timeout=30)) as conn:
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as err:
            if "no such table" in str(err):
                return []
            raise


def _stored(run: Any, key: tuple[str, int]) -> bool:
    """Whether the run's local store holds the record of (prefix, step)."""
    prefix, step = key
    try:
        rows = _query(run.project, "SELECT metrics FROM metrics WHERE run_id = ? AND step = ?", (run.id, step))
    except sqlite3.OperationalError as err:
        if "no such column" not in str(err):
            raise
        return key in _stored_steps(run)  # a store from before trackio kept run ids
    name = f"{prefix}/{RECORD_KEY}"
    for (metrics,) in rows:
        with contextlib.suppress(ValueError, TypeError):
            if name in json.loads(metrics):
                return True
    return False


def _run_exists(project: str, run_id: str | None) -> bool:
    try:
        return bool(_query(project, "SELECT 1 FROM metrics WHERE run_id = ? LIMIT 1", (run_id,)))
    except sqlite3.OperationalError:
        return False


def _write_now(run: Any) -> None:
    """Have trackio write what it queued now, on this thread (its own thread would, within
    half a second). Private to trackio: without it, :func:`_wait_stored` waits instead."""
    flush, lock = getattr(run, "_flush_queues_inline", None), getattr(run, "_client_lock", None)
    if callable(flush) and lock is not None:
        with lock:
            flush()


def _wait_stored(run: Any, key: tuple[str, int]) -> bool:
    """Whether the store holds the step once trackio wrote it (at once, or within STORE_WAIT)."""
    if _stored(run, key):
        return True
    if callable(getattr(run, "_flush_queues_inline", None)):
        return False  # written at once, and not there: refused
    deadline = time.monotonic() + STORE_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if _stored(run, key):
            return True
    return False


def _save_media(media: Any, run: Any, step: int) -> None:
    """Save a chart's file before ``run.log``, which would drop a file the disk refuses
    (with a warning) and store the row without it; here the refusal raises instead."""
    save = getattr(media, "_save", None)
    if not callable(save):
        return
    try:
        save(run.project, run.name, step)
    except ValueError as err:  # trackio wraps a refused folder in a ValueError
        if isinstance(err.__context__, OSError):
            raise OSError(err.__context__.errno, f"trackio could not save the chart: {err}") from err
        raise


def _stored_steps(run: Any) -> set[tuple[str, int]]:
    """(prefix, step) of the records already in a local run (a resumed or attached run)."""
    if not _in_local_store(run):  # a Space or server: its store is not local
        return set()
    from trackio.sqlite_storage import SQLiteStorage

    steps = set()
    for row in SQLiteStorage.get_logs(run.project, run=run.name, run_id=run.id):
        for key, value in row.items():
            if key.endswith(f"/{RECORD_KEY}") and isinstance(value, str):
                steps.add((key[: -len(RECORD_KEY) - 1], int(row["step"])))
    return steps
