"""MLflow backend: metrics, per-step tables, record artifacts and charts in one MLflow run.

Every MLflow quirk lives here:

* key rules (``/``, ``\\w``, ``.``, ``-``, space; at most 250 characters; no ``..`` path
  tricks) and batch limits (1000 metrics and 100 tags per ``log_batch``);
* the HTTP client retries for minutes by default (7 retries with exponential backoff
  and a 120 s timeout per request); our own calls are bounded to a few seconds so a
  dead server makes ``log_eval`` fail fast and the tracker spools the record instead;
* ``log_table`` appends to an existing file (a replayed step would duplicate rows) and
  registers every table in the ``mlflow.loggedArtifacts`` run tag, which MLflow caps at
  8000 characters and then truncates into invalid JSON. So tables are written as files
  in ``log_table``'s own format (pandas ``split`` JSON, overwritten by path on a replay)
  and registered in that tag within a bounded budget;
* metric history has no "upsert": a replayed step is checked against the run's latest
  metrics before logging, and metric timestamps come from the record, so a store that
  deduplicates identical rows (SQL stores do) drops any leftover duplicate as well.

Params ``{prefix}.N``, ``.P``, ``.ns``, ``.proxy_name``, ``.true_name`` (set once); a new
run gets MLflow's source and user tags. Table artifacts round floats to 6 significant
digits (the record artifacts keep exact values). Link to a run with
:attr:`MlflowBackend.ui_url` (``?workflowType=machine_learning``: MLflow 3.x opens its GenAI
view otherwise, whatever the experiment's or run's tags say).

Alerts: the metric ``{prefix}/7_alert/<rule>`` (0/1 at every eval step) and, at each onset,
the run tag ``{prefix}.alert.<rule>`` listing the onset steps (``"600"``, then ``"600,1400"``):
MLflow has no alerts of its own, and runs can be filtered by tag. The sentences go into the
run's Description (the tag ``mlflow.note.content``, Markdown, rewritten at every step): the
latest step's Goodhart point with its interval, then every alert onset in a sentence
(:func:`run_description`). A Description someone else wrote (one not starting with
``**bon_tracker**``) is left alone.

The Model metrics view shows a ``log_image`` key as a card holding a ~256-px copy of the image
(its lower part cut off when the image is not a wide strip), with a step slider that opens at
the first step; so the image logged under ``{prefix}/0_curve`` is the compact chart
(:func:`bon_tracker.reports.charts.compact_chart`), and the full two-panel chart is the
artifact ``bon_tracker/charts/curve/step_*.png``. To compare runs, the experiment's chart view
(:func:`mlflow_experiment_url`) overlays them.

Artifacts of a run (``step`` zero-padded to 9 digits)::

    bon_curves/step_000000100.json               this step's curve table (UI table view)
    bon_curves.json                              every step's rows, written at finish()
    bon_predictions/step_000000100.json          the fitted law beyond the measured n (predicted rows)
    bon_tracker/records/step_000000100.json      the full EvalRecord (read_records())
    bon_tracker/charts/curve/step_000000100.png  true and proxy vs KL at this step (the full chart)
    images/bon~0_curve+step+100+...png          the compact chart via log_image(key=, step=): shown in
                                                 the Model metrics view with a step slider
    bon_tracker/charts/overlay.png, trend.png, rl.png   latest views over training
    bon_hacks/step_000000100.json                the hack table (texts were logged; docs/texts.md)
    bon_selection/, bon_frontier/step_000000100.json   the selection rules' optima, the best rule per KL
                                                 budget; bon_tracker/charts/frontier/step_*.png its chart
                                                 (the latest of each registered as a table and linked by
                                                 the run tags bon.bon_hacks, bon.bon_selection, ...)
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bon_tracker.backends.base import Backend, RunNotFoundError, classify_common
from bon_tracker.optional import require, require_installed
from bon_tracker.record import (
    PREDICTION_COLUMNS,
    PREDICTIONS_TABLE,
    TABLE_COLUMNS,
    TABLE_NAME,
    EvalRecord,
    curve_image_key,
    evenly_spaced,
)
from bon_tracker.reports import selection_tables, texts_tables
from bon_tracker.version import __version__

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

logger = logging.getLogger("bon_tracker")

DEFAULT_EXPERIMENT = "bon_tracker"
RECORDS_DIR = "bon_tracker/records"
CHARTS_DIR = "bon_tracker/charts"
CUMULATIVE_TABLE = f"{TABLE_NAME}.json"

# MLflow's limits (mlflow/utils/validation.py): MAX_METRICS_PER_BATCH,
# MAX_PARAMS_TAGS_PER_BATCH, MAX_ENTITY_KEY_LENGTH, MAX_TAG_VAL_LENGTH. A full metric
# batch stays far below MAX_BATCH_LOG_REQUEST_SIZE (1 MB): 1000 x (250-char key + ~70 B).
MAX_METRICS_PER_BATCH = 1000
MAX_TAGS_PER_BATCH = 100
MAX_KEY_LENGTH = 250
MAX_TAG_VALUE_LENGTH = 8000
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default
RUN_KEY_TAG = "bon_tracker.run_key"  # the client-chosen identity of a run this backend creates
_RUN_KEY = re.compile(r"[A-Za-z0-9_-]{8,64}")
LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS
# Per-step tables are registered in that tag up to this many characters (oldest of ours
# dropped first), leaving room for the cumulative table and for tables other code logs.
STEP_TABLES_TAG_BUDGET = 6000
MAX_CHART_RECORDS = 500  # trend and RL charts plot at most this many steps (constant cost)
OVERLAY_CURVES = 20

# MLflow error codes (mlflow/protos/databricks.proto) by what retrying can do about them.
_CONFIG_ERROR_CODES = frozenset(
    {
        "RESOURCE_DOES_NOT_EXIST",  # a run_id or experiment that is not there
        "ENDPOINT_NOT_FOUND",  # a tracking URI that is not an MLflow server
        "NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
        "NOT_IMPLEMENTED",
    }
)
_REJECTED_ERROR_CODES = frozenset({"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE"})
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

_KEY_BAD_CHARS = re.compile(r"[^/\w.\- ]")  # MLflow's rule, minus ":" (refused on Windows)


def mlflow_key(key: str) -> str:
    """A metric or tag key MLflow accepts: bad characters become ``_``, empty, ``.``
    and ``..`` path parts are dropped, at most 250 characters.

    >>> mlflow_key("bon/true/n16"), mlflow_key("bon/context/lr (x)"), mlflow_key("a//../b:c")
    ('bon/true/n16', 'bon/context/lr _x_', 'a/b_c')
    """
    parts = [part for part in _KEY_BAD_CHARS.sub("_", key).split("/") if part not in ("", ".", "..")]
    cleaned = "/".join(parts) or "_"
    if cleaned.startswith(".."):  # MLflow refuses keys that read as a parent path
        cleaned = "_" + cleaned
    return cleaned[:MAX_KEY_LENGTH].rstrip("/")


def _step_name(step: int) -> str:
    return f"step_{step:09d}.json"


def step_table_path(step: int) -> str:
    """Artifact path of one step's ``bon_curves`` table."""
    return f"{TABLE_NAME}/{_step_name(step)}"


def record_path(step: int) -> str:
    """Artifact path of one step's full record (JSON of :meth:`EvalRecord.to_json`)."""
    return f"{RECORDS_DIR}/{_step_name(step)}"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` (``mlflow.set_tracking_uri`` sets it too), else
    ``sqlite:///<working dir>/mlflow.db``, MLflow 3's own default, made absolute."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath("mlflow.db")


def _local_sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other stores)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts beside a local sqlite database (``<db dir>/mlartifacts``), so they never
    land in ``./mlruns`` of whatever directory the process runs in; None (the server
    decides) for other stores."""
    db = _local_sqlite_path(tracking_uri)
    return None if db is None else (db.absolute().parent / "mlartifacts").as_uri()


_BOUNDED_LOCK = threading.Lock()
_bounded_users = 0
_saved_environment: dict[str, str | None] = {}


@contextlib.contextmanager
def bounded_http(max_retries: int, timeout: float) -> Iterator[None]:
    """Bound MLflow's HTTP retries and timeout (and mute its progress bars) for the
    calls made inside this block.

    MLflow reads ``MLFLOW_HTTP_REQUEST_*`` from the environment on every request
    (``mlflow/utils/rest_utils.py``), with defaults that keep a call retrying for
    minutes. They are set while any bon_tracker call is inside such a block (the chart
    thread's too: the first to enter sets them, the last to leave restores the
    user's values), so the user's own MLflow calls keep their settings. (Another
    thread calling MLflow meanwhile sees the bounded values: the environment is
    process-wide.)
    """
    global _bounded_users
    bounded = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",  # the spool is the slow retry
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),  # MLflow parses an int
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bars on the user's stderr
    }
    with _BOUNDED_LOCK:
        if _bounded_users == 0:
            _saved_environment.clear()
            _saved_environment.update({key: os.environ.get(key) for key in bounded})
            os.environ.update(bounded)
        _bounded_users += 1
    try:
        yield
    finally:
        with _BOUNDED_LOCK:
            _bounded_users -= 1
            if _bounded_users == 0:
                for key, value in _saved_environment.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value


def _client(tracking_uri: str) -> MlflowClient:
    mlflow = require("mlflow", "mlflow")
    return mlflow.MlflowClient(tracking_uri=tracking_uri)


def _json_number(value: Any) -> Any:
    """NaN and infinities as JSON null, as pandas writes them (the UI parses strict JSON)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


MLFLOW_VIEW = "workflowType=machine_learning"  # MLflow 3.x opens experiments in its GenAI view otherwise
TABLE_DIGITS = 6  # significant digits of the table artifacts: the UI shows every digit it is given


def _table_number(value: Any) -> Any:
    """A table cell: floats rounded to ``TABLE_DIGITS`` significant digits (the exact values
    stay in the record artifacts, which :func:`read_records` reads), non-finite as null."""
    value = _json_number(value)
    return float(f"{value:.{TABLE_DIGITS}g}") if isinstance(value, float) else value


def table_json(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS, *, exact: bool = False) -> str:
    """``bon_curves`` rows (or ``bon_predictions`` rows, with their ``columns``) in the format of
    MLflow's ``log_table`` (pandas ``split`` orient), so the UI shows them as a table and
    ``MlflowClient.load_table`` reads them. Per-step previews are rounded to ``TABLE_DIGITS``
    significant digits so the columns fit the screen; ``exact`` keeps every digit (the
    cumulative table, for analysis)."""
    cell = _json_number if exact else _table_number
    data = [[cell(row[column]) for column in columns] for row in rows]
    return json.dumps({"columns": list(columns), "data": data})


def mlflow_run_url(base_url: str, experiment_id: str, run_id: str, tab: str = "model-metrics") -> str:
    """The MLflow UI page of a run, in the training view (``?workflowType=machine_learning``).

    MLflow 3.x keys its GenAI vs training view on the URL's ``workflowType`` parameter
    alone (else the choice the browser last made with the sidebar switch, GenAI by
    default); neither experiment nor run tags change it.

    >>> mlflow_run_url("http://127.0.0.1:5000/", "1", "abc")
    'http://127.0.0.1:5000/#/experiments/1/runs/abc/model-metrics?workflowType=machine_learning'
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}/{tab}?{MLFLOW_VIEW}"


NOTE_TAG = "mlflow.note.content"  # the run's Description in the MLflow UI (Markdown)
NOTE_MARK = "**bon_tracker** "  # a Description that starts so is ours to update
MAX_NOTE_ALERTS = 30  # the Description lists at most this many alert onsets (the latest)


def mlflow_experiment_url(base_url: str, experiment_id: str) -> str:
    """The experiment's runs in MLflow's chart view, in the training view: one chart per
    metric with every selected run overlaid, the way to compare runs inside MLflow (the
    runs table's Compare button opens a parallel-coordinates plot instead).

    >>> mlflow_experiment_url("http://127.0.0.1:5000", "1")
    'http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART&workflowType=machine_learning'
    """
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART&{MLFLOW_VIEW}"


def alert_line(alert: Any) -> str:
    """One Markdown list item of the Description: the rule and its sentence.

    >>> from bon_tracker.core import Alert
    >>> alert_line(Alert(400, "goodhart_kl", "At step 400 the policy's KL reached 2 nats.", 2.0, 1.5, 0))
    "- **goodhart_kl** (step 400): At step 400 the policy's KL reached 2 nats."
    """
    return f"- **{alert.rule}** (step {alert.step}): {_markdown_text(alert.message)}"


def _markdown_text(text: str) -> str:
    """Text for a Markdown note: ``n*`` and ``KL*`` are no emphasis."""
    return text.replace("*", "\\*")


def _note_alerts(note: str | None) -> list[str]:
    """The alert lines of a Description this backend wrote earlier (a resumed run)."""
    if not note or not note.startswith(NOTE_MARK):
        return []
    return [line for line in note.splitlines() if line.startswith("- **")]


def run_description(records: Sequence[EvalRecord], alert_lines: Sequence[str] = ()) -> str:
    """The run's Description: the latest step's headline and Goodhart point with its
    interval, then every alert onset in one sentence each (the latest ``MAX_NOTE_ALERTS``).

    >>> from bon_tracker.core import bon_curve
    >>> import numpy as np
    >>> run_description([EvalRecord.build(7, bon_curve(np.eye(4), np.eye(4)))]).splitlines()[0]
    '**bon_tracker** best-of-n at step 7 (N = 4, 4 prompts; 1 eval step logged)'
    """
    from bon_tracker.reports.charts import goodhart_text  # the CLI's and reports' wording

    last = records[-1]
    prompts = int(last.curve.n_prompts.max())
    count = f"{len(records)} eval step{'s' if len(records) != 1 else ''} logged"
    alerts = f": {len(alert_lines)} alert{'s' if len(alert_lines) != 1 else ''}" if alert_lines else ""
    lines = [  # the first two lines show before the UI's "Show more"
        f"{NOTE_MARK}best-of-n at step {last.step} (N = {last.curve.N}, {prompts} prompts; {count}){alerts}",
        "",
        _markdown_text(goodhart_text(last)),
        "",
    ]
    shown = list(alert_lines)[-MAX_NOTE_ALERTS:]
    if shown:
        lines.append(
            f"Alerts ({len(alert_lines)}):" if len(shown) == len(alert_lines) else f"Alerts (latest {len(shown)}):"
        )
        lines += shown
    else:
        lines.append("No alerts so far.")
    lines += ["", "Curves: the bon/0_curve image (step slider), full charts and tables under Artifacts."]
    return "\n".join(lines)[:MAX_TAG_VALUE_LENGTH]


def alert_tag(key_prefix: str, rule: str) -> str:
    """The run tag listing the onset steps of an alert rule, comma-separated.

    >>> alert_tag("bon", "goodhart_kl")
    'bon.alert.goodhart_kl'
    """
    return mlflow_key(f"{key_prefix}.alert.{rule}")


def _registered_tables(current: str | None, path: str, budget: int) -> str | None:
    """New value of the ``mlflow.loggedArtifacts`` tag with ``path`` registered as a
    table, or None when nothing should change (already there, tag unreadable, no room).

    Our oldest per-step tables are dropped to stay within ``budget`` characters; entries
    written by other code are never touched, and the tag is never truncated (MLflow
    would cut it into invalid JSON, which breaks every later ``log_table`` on the run).
    """
    try:
        entries = json.loads(current) if current else []
    except json.JSONDecodeError:
        return None
    if not isinstance(entries, list):
        return None
    entry = {"path": path, "type": "table"}
    if entry in entries:
        return None
    entries.append(entry)
    ours = [e for e in entries[:-1] if isinstance(e, dict) and str(e.get("path", "")).startswith(f"{TABLE_NAME}/")]
    while len(json.dumps(entries)) > budget:
        if not ours:
            return None
        entries.remove(ours.pop(0))
    return json.dumps(entries)


def _registered_latest(current: str | None, paths: Sequence[str]) -> str | None:
    """New value of the ``mlflow.loggedArtifacts`` tag with each of ``paths`` registered as a table in
    place of an earlier step's table of the same folder (``bon_hacks/step_*.json``: only the latest),
    or None when nothing changes (already there, tag unreadable, or no room within its 8000 characters)."""
    try:
        entries = json.loads(current) if current else []
    except json.JSONDecodeError:
        return None
    if not isinstance(entries, list) or not paths:
        return None
    folders = {path.split("/", 1)[0] + "/" for path in paths}
    kept = [e for e in entries if not (isinstance(e, dict) and str(e.get("path", "")).startswith(tuple(folders)))]
    new = kept + [{"path": path, "type": "table"} for path in paths]
    value = json.dumps(new)
    if new == entries or len(value) > MAX_TAG_VALUE_LENGTH:
        return None
    return value


class MlflowBackend(Backend):
    """Logs best-of-n eval records to an MLflow run.

    Nothing is touched until the first :meth:`log_eval`: then the backend attaches to
    ``run_id`` if given, else to the active fluent run (``mlflow.active_run()``, e.g.
    the one transformers' ``MLflowCallback`` started), else to ``$MLFLOW_RUN_ID``,
    else starts a new run in ``experiment``. :meth:`finish` ends only a run it started.

    Args:
        tracking_uri: where to log; default ``$MLFLOW_TRACKING_URI``, else
            ``sqlite:///<working dir>/mlflow.db`` (artifacts in ``mlartifacts`` beside it).
        experiment: experiment name for a new run (default ``"bon_tracker"``; created
            if missing).
        run_id: an existing run to log into (e.g. Lightning's ``MLFlowLogger.run_id``).
        run_name: name of a new run.
        artifact_location: artifact root for a new experiment; default beside a local
            sqlite database, else the server's choice.
        max_retries: HTTP retries per MLflow request made by this backend (MLflow's
            default is 7 with exponential backoff).
        timeout: seconds per HTTP request made by this backend (MLflow's default: 120).
        charts: log PNG charts (curve per step; overlay, trend, RL views).
        end_run: end the run at :meth:`finish` (default: only a run this backend started;
            ``bon-tracker sync`` passes it on, so a replay ends the run the tracker started).
        run_key: the client-chosen identity of a new run (default: a fresh random key). It
            is in :meth:`spec`, hence in the write-ahead log, before the run exists, and the
            run is created with it as the tag ``bon_tracker.run_key``: a process killed at any
            point (even while ``create_run`` was in flight) is continued by ``bon-tracker
            sync`` or a resumed tracker in that same run, never in a second one.

    Example:
        >>> backend = MlflowBackend(tracking_uri="sqlite:////tmp/demo/mlflow.db", experiment="demo")
        >>> backend.run_id is None, backend.spec()["experiment"]
        (True, 'demo')
    """

    name = "mlflow"
    extra = "mlflow"

    def __init__(
        self,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        run_id: str | None = None,
        run_name: str | None = None,
        artifact_location: str | None = None,
        max_retries: int = 1,
        timeout: float = 10.0,
        charts: bool = True,
        end_run: bool | None = None,
        run_key: str | None = None,
    ):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise ValueError(f"timeout must be a number of seconds, got {timeout!r:.60} ({type(timeout).__name__})")
        if run_key is not None and not (isinstance(run_key, str) and _RUN_KEY.fullmatch(run_key)):
            raise ValueError(f"run_key must be 8 to 64 letters, digits, '-' or '_', got {run_key!r:.80}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or not 0 <= max_retries <= 10:
            raise ValueError(f"max_retries must be an integer from 0 to 10 (MLflow's limit), got {max_retries!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self._tracking_uri = tracking_uri
        self._experiment = experiment
        self._run_id = run_id
        self._run_name = run_name
        self._artifact_location = artifact_location
        self.max_retries = max_retries
        self.timeout = float(timeout)
        self.charts = charts
        self._client_obj: MlflowClient | None = None
        self._owns_run = False
        self._finished = False
        self._history: dict[int, EvalRecord] = {}  # this process's records, by step
        self._end_run = end_run
        self._bound_run_id: str | None = None  # the caller's active fluent run, seen by bind()
        self._views_stale = False
        self._experiment_id_cache: str | None = None
        self._image_steps: set[int] | None = None  # steps whose curve image the run holds
        self._alert_lines: list[str] | None = None  # the Description's alert sentences, in onset order
        self.run_key = run_key or uuid.uuid4().hex

    # ---- identity ----------------------------------------------------------------------
    @property
    def tracking_uri(self) -> str:
        """The tracking URI in use (resolved on first use, then fixed)."""
        if self._tracking_uri is None:
            self._tracking_uri = default_tracking_uri()
        return self._tracking_uri

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def ui_url(self) -> str | None:
        """The run's Model metrics page in MLflow's training view (None before the first
        write): on the tracking server for an ``http(s)`` URI; for a local store (the
        default sqlite file), the page that ``mlflow ui --backend-store-uri <uri>`` serves at
        its default address, ``http://127.0.0.1:5000`` (:attr:`location` says the command).
        MLflow 3.x opens its GenAI view unless the URL carries ``?workflowType=machine_learning``."""
        if self._run_id is None:
            return None
        local = not self.tracking_uri.startswith(("http://", "https://"))
        return mlflow_run_url(LOCAL_UI if local else self.tracking_uri, self.experiment_id or "0", self._run_id)

    @property
    def location(self) -> str | None:
        """The run's page for a server; for a local store, the run id and how to open it."""
        if self._run_id is None:
            return None
        if self.tracking_uri.startswith(("http://", "https://")):
            return self.ui_url
        uri = self.tracking_uri
        return f"MLflow run {self._run_id} in {uri}; view: mlflow ui --backend-store-uri {uri}, then {self.ui_url}"

    @property
    def experiment_id(self) -> str | None:
        """The id of the run's experiment (None when unknown; looked up once)."""
        if self._experiment_id_cache is None and self._run_id is not None:
            with contextlib.suppress(Exception), bounded_http(self.max_retries, self.timeout):  # a link: never an error
                client = self._client_obj or _client(self.tracking_uri)
                self._experiment_id_cache = client.get_run(self._run_id).info.experiment_id
        return self._experiment_id_cache

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "backend": self.name,
            "tracking_uri": self.tracking_uri,
            "run_id": self._run_id,
            "experiment": self._experiment or DEFAULT_EXPERIMENT,
        }
        # Only what differs from the defaults, so a rebuilt backend behaves the same.
        for key, value, default in (
            ("run_name", self._run_name, None),
            ("artifact_location", self._artifact_location, None),
            ("max_retries", self.max_retries, 1),
            ("timeout", self.timeout, 10.0),
            ("charts", self.charts, True),
        ):
            if value != default:
                spec[key] = value
        if self._run_id is None:
            spec["run_key"] = self.run_key  # names the run before it exists; then its id does
        # Always present (None: the backend decides, by whether it started the run), so that
        # `bon-tracker sync` can say False for a run whose process crashed before finishing.
        spec["end_run"] = self._end_run if self._end_run is not None else (self._owns_run or None)
        return spec

    def check(self) -> None:
        require_installed("mlflow", "mlflow")  # a missing extra is an error now, not an outage later

    def bind(self) -> None:
        """Remember the caller's active fluent run: MLflow keeps it per thread, and records
        are written from the delivery thread."""
        if self._run_id is not None or self._bound_run_id is not None:
            return
        mlflow = sys.modules.get("mlflow")  # never imported here just to look
        active_run = getattr(mlflow, "active_run", None)  # absent while the worker is still importing mlflow
        try:
            active = active_run() if active_run is not None else None
        except Exception:  # mlflow half imported by the delivery thread: no run of the caller's yet
            active = None
        if active is not None:
            self._bound_run_id = active.info.run_id

    def classify(self, error: BaseException) -> str:
        """MLflow's error codes: a missing run or refused credentials are configuration
        errors; 400 (an invalid value) rejects the record; 429, 5xx and the network retry."""
        code = getattr(error, "error_code", None)
        if isinstance(code, str) and type(error).__name__ in ("MlflowException", "RestException"):
            if code in _CONFIG_ERROR_CODES:
                return "config"
            if code in _REJECTED_ERROR_CODES:
                return "rejected"
            return "transient"
        return classify_common(error)

    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[str, str, list[EvalRecord]]:
        """``ref``: a run id or name (``experiment=`` narrows the search), in
        ``tracking_uri`` (default as for the backend)."""
        mlflow = require("mlflow", "mlflow")
        uri = options.get("tracking_uri") or default_tracking_uri()
        if _local_sqlite_path(uri) is not None and not _local_sqlite_path(uri).exists():
            raise RunNotFoundError(f"no MLflow database at {uri} (looked up {ref!r})")
        client = mlflow.MlflowClient(tracking_uri=uri)
        with bounded_http(2, 30.0):
            run_id, name = _mlflow_run_id(client, ref, options.get("experiment"), uri)
        return name, run_id, read_records(run_id, uri)

    # ---- logging -------------------------------------------------------------------------
    def log_eval(self, record: EvalRecord) -> None:
        """Write one eval step: record, table and chart artifacts, run tags, then metrics.

        Artifacts and tags overwrite by path and key; metrics are the only append-only
        write, so they go last, each key logged only if the run lacks it at this step.
        A failure anywhere leaves a state that calling again with the same record
        completes, writing each metric exactly once.
        """
        if self._finished:
            raise RuntimeError("this MlflowBackend is finished; create a new one to log more")
        self._history[record.step] = record
        with bounded_http(self.max_retries, self.timeout):
            client, run_id = self._open()
            run = client.get_run(run_id)  # latest metrics and tags: constant size per step
            if self._alert_lines is None:  # a resumed run: the alerts its Description already lists
                self._alert_lines = _note_alerts(run.data.tags.get(NOTE_TAG))
            for alert in record.onsets:
                line = alert_line(alert)
                if line not in self._alert_lines:
                    self._alert_lines.append(line)
            client.log_text(run_id, json.dumps(record.to_json(), allow_nan=True), record_path(record.step))
            client.log_text(run_id, table_json(record.table_rows()), step_table_path(record.step))
            predictions = record.prediction_rows()
            if predictions:
                path = f"{PREDICTIONS_TABLE}/{_step_name(record.step)}"
                client.log_text(run_id, table_json(predictions, PREDICTION_COLUMNS), path)
            display = self._log_display_tables(client, run_id, record)
            if self.charts:
                self._log_step_chart(client, run_id, record)
            self._log_params(client, run, record)
            tags = self._changed_tags(run, record)
            registered = _registered_tables(
                run.data.tags.get(LOGGED_ARTIFACTS_TAG), step_table_path(record.step), STEP_TABLES_TAG_BUDGET
            )
            if registered is not None:
                tags[LOGGED_ARTIFACTS_TAG] = registered
            tags.update(self._display_tags(run, record, display, tags.get(LOGGED_ARTIFACTS_TAG)))
            for alert in record.onsets:  # bon.alert.<rule>: the onset steps, beside the 0/1 metric
                key = alert_tag(record.key_prefix, alert.rule)
                steps = [s for s in (run.data.tags.get(key) or "").split(",") if s]
                if str(alert.step) not in steps:
                    tags[key] = ",".join([*steps, str(alert.step)])[-MAX_TAG_VALUE_LENGTH:]
            note = self._description(run)
            if note is not None:
                tags[NOTE_TAG] = note
            self._log_tags(client, run_id, tags)
            self._log_metrics(client, run, record)

    def finish(self) -> None:
        """Write the cumulative ``bon_curves.json`` table, then end the run if this
        backend started it. Safe to call twice; touches nothing if nothing was logged."""
        if self._finished or self._client_obj is None or self._run_id is None:
            self._finished = True
            return
        client, run_id = self._client_obj, self._run_id
        with bounded_http(self.max_retries, self.timeout):
            try:
                self.refresh_views()
                if self._history:
                    self._write_cumulative_table(client, run_id)
            finally:
                if self._end_run if self._end_run is not None else self._owns_run:
                    client.set_terminated(run_id, "FINISHED")
        self._finished = True

    # ---- internals -----------------------------------------------------------------------
    def _open(self) -> tuple[MlflowClient, str]:
        """The client and the run: attach to a run or start one (once), within this
        backend's HTTP bounds whoever calls (MLflow's defaults retry for about 4 minutes)."""
        if self._client_obj is not None and self._run_id is not None:
            return self._client_obj, self._run_id
        with bounded_http(self.max_retries, self.timeout):
            return self._attach_or_start_run()

    def _attach_or_start_run(self) -> tuple[MlflowClient, str]:
        mlflow = require("mlflow", "mlflow")
        client = self._client_obj or _client(self.tracking_uri)
        self._client_obj = client
        if self._run_id is not None:  # given: must exist (get_run raises otherwise)
            run = client.get_run(self._run_id)
            self._experiment = self._experiment or client.get_experiment(run.info.experiment_id).name
            return client, self._run_id
        candidate = self._bound_run_id or os.environ.get("MLFLOW_RUN_ID")
        if candidate:
            try:
                run = client.get_run(candidate)
            except mlflow.exceptions.MlflowException as err:
                if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                logger.warning(
                    "bon_tracker: MLflow run %s (the active run or $MLFLOW_RUN_ID) is not in %s; starting a new run",
                    candidate,
                    self.tracking_uri,
                )
            else:
                self._run_id = run.info.run_id
                self._experiment = self._experiment or client.get_experiment(run.info.experiment_id).name
                return client, self._run_id
        experiment_id = self._experiment_id(client)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{self.run_key}'", max_results=1
        )
        if found:  # created by this backend's run_key before a kill or a lost response: continue it
            self._run_id, self._owns_run = found[0].info.run_id, True
            return client, self._run_id
        tags = {**_new_run_tags(), RUN_KEY_TAG: self.run_key}
        run = client.create_run(experiment_id, run_name=self._run_name, tags=tags)
        self._run_id, self._owns_run = run.info.run_id, True
        url = self.location
        if url is not None:
            logger.info("bon_tracker: MLflow run %s: %s", run.info.run_name, url)
        return client, self._run_id

    def _experiment_id(self, client: MlflowClient) -> str:
        mlflow = require("mlflow", "mlflow")
        name = self._experiment = self._experiment or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = self._artifact_location or default_artifact_location(self.tracking_uri)
        try:
            return client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
                raise
            return client.get_experiment_by_name(name).experiment_id

    def _description(self, run: Run) -> str | None:
        """The run's Description (``mlflow.note.content``) as of the latest step, or None when
        it must not change: a note the user (or another tool) wrote is never overwritten."""
        current = run.data.tags.get(NOTE_TAG)
        if current is not None and not current.startswith(NOTE_MARK):
            return None
        note = run_description([self._history[step] for step in sorted(self._history)], self._alert_lines)
        return None if note == current else note

    def _changed_tags(self, run: Run, record: EvalRecord) -> dict[str, str]:
        curve = record.curve
        ns = curve.n.tolist()
        prompts = int(curve.n_prompts[ns.index(1)] if 1 in ns else curve.n_prompts.max())
        wanted = {
            "bon_tracker.version": __version__,
            "bon_tracker.N": str(curve.N),
            "bon_tracker.P": str(prompts),
            "bon_tracker.ns": ",".join(str(n) for n in ns)[:MAX_TAG_VALUE_LENGTH],
            "bon_tracker.key_prefix": record.key_prefix,
        }
        return {key: value for key, value in wanted.items() if run.data.tags.get(key) != value}

    @staticmethod
    def _log_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, len(items), MAX_TAGS_PER_BATCH):
            client.log_batch(run_id, tags=items[start : start + MAX_TAGS_PER_BATCH], synchronous=True)

    def _log_metrics(self, client: MlflowClient, run: Run, record: EvalRecord) -> None:
        from mlflow.entities import Metric

        step = record.step
        scalars = {**record.scalars(), **texts_tables.text_scalars(record)}
        values = {mlflow_key(key): value for key, value in scalars.items()}
        missing = self._missing_keys(client, run, list(values), step)
        # The record's own time: identical rows on a replay, which SQL stores deduplicate.
        timestamp = int(record.timestamp * 1000)
        metrics = [Metric(key, float(values[key]), timestamp, step) for key in missing]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            # synchronous=True: MLFLOW_ENABLE_ASYNC_LOGGING would hide failures from the spool.
            client.log_batch(run.info.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH], synchronous=True)

    @staticmethod
    def _missing_keys(client: MlflowClient, run: Run, keys: list[str], step: int) -> list[str]:
        """Keys without a value at ``step`` yet, from the run's latest metrics.

        MLflow keeps, per key, the metric with the largest (step, timestamp, value): a
        latest step equal to ``step`` means logged, smaller or absent means not. Only a
        key whose latest step is later (a replay after later steps were written) needs
        its history read.
        """
        latest_objs = getattr(run.data, "_metric_objs", None)  # Metric objects, with their step
        if latest_objs is None:  # no such view in this MLflow version: unknown, read histories
            latest: dict[str, int | None] = {key: None for key in keys if key in run.data.metrics}
        else:
            latest = {m.key: m.step for m in latest_objs}
        missing = []
        for key in keys:
            if latest.get(key, math.nan) == step:
                continue
            before = key not in latest or (latest[key] is not None and latest[key] < step)
            if before or all(m.step != step for m in client.get_metric_history(run.info.run_id, key)):
                missing.append(key)
        return missing

    def _log_display_tables(self, client: MlflowClient, run_id: str, record: EvalRecord) -> dict[str, str]:
        """The step's hack, selection and frontier tables as ``log_table`` artifacts (``bon_hacks/step_*.json``
        ...; overwritten by path on a replay) and the frontier chart (``bon_tracker/charts/frontier/``);
        returns ``{table name: artifact path}`` of what was written."""
        tables = []
        if record.hacks is not None:
            tables.append((texts_tables.HACKS_TABLE, texts_tables.hack_table(record)))
        if record.selection is not None:
            tables.append((selection_tables.SELECTION_TABLE, selection_tables.selection_table(record)))
            tables.append((selection_tables.FRONTIER_TABLE, selection_tables.frontier_table(record)))
        paths = {}
        for name, (columns, rows) in tables:
            path = f"{name}/{_step_name(record.step)}"
            client.log_text(run_id, table_json([dict(zip(columns, row)) for row in rows], columns), path)
            paths[name] = path
        if record.selection is not None and self.charts:
            from bon_tracker.reports.selection_charts import frontier_png

            image = f"frontier/{_step_name(record.step).removesuffix('.json')}.png"
            _upload(client, run_id, frontier_png(record), image)
            paths["frontier_chart"] = f"{CHARTS_DIR}/{image}"
        return paths

    def _display_tags(
        self, run: Run, record: EvalRecord, paths: dict[str, str], artifacts: str | None
    ) -> dict[str, str]:
        """Run tags that point at the latest display tables: ``{prefix}.bon_hacks`` (and ``.bon_selection``,
        ``.bon_frontier``, ``.frontier_chart``) hold the artifact's path and its page in the UI; the
        tables are registered in ``mlflow.loggedArtifacts`` (the latest step of each, so the tag stays
        bounded) for MLflow's table view."""
        tags: dict[str, str] = {}
        current = artifacts if artifacts is not None else run.data.tags.get(LOGGED_ARTIFACTS_TAG)
        registered = _registered_latest(current, [p for name, p in paths.items() if name != "frontier_chart"])
        if registered is not None:
            tags[LOGGED_ARTIFACTS_TAG] = registered
        local = not self.tracking_uri.startswith(("http://", "https://"))
        base = LOCAL_UI if local else self.tracking_uri
        for name, path in paths.items():
            url = mlflow_run_url(base, run.info.experiment_id, run.info.run_id, f"artifacts/{path}")
            value = f"{path} (step {record.step}): {url}"
            key = mlflow_key(f"{record.key_prefix}.{name}")
            if run.data.tags.get(key) != value:
                tags[key] = value[:MAX_TAG_VALUE_LENGTH]
        return tags

    def _log_step_chart(self, client: MlflowClient, run_id: str, record: EvalRecord) -> None:
        """This step's curve chart (on the delivery worker's thread, drawn in the chart process)."""
        from bon_tracker.reports.render import render_png

        # The metrics view shows log_image's images as ~256-px cards: the compact chart there,
        # the full two-panel chart as an artifact (the full size one click away).
        self._log_curve_image(client, run_id, record, render_png("compact", [record]))
        png = render_png("curve", [record])
        _upload(client, run_id, png, f"curve/{_step_name(record.step).removesuffix('.json')}.png")
        self._views_stale = True

    def _log_curve_image(self, client: MlflowClient, run_id: str, record: EvalRecord, png: bytes) -> None:
        """The chart as ``log_image(key=..., step=...)``: the Model metrics view shows it with
        a step slider. ``log_image`` names each file with a fresh uuid, so a replayed step
        would show twice: the steps the run already holds are read once, then tracked."""
        from PIL import Image  # matplotlib depends on pillow

        key = mlflow_key(curve_image_key(record.key_prefix))
        if self._image_steps is None:
            # A run this backend created holds no images yet; any other may (a replay, a resume).
            self._image_steps = set() if self._owns_run else _image_steps(client, run_id, key)
        if record.step in self._image_steps:
            return
        with Image.open(io.BytesIO(png)) as image:
            client.log_image(
                run_id,
                image.convert("RGB"),
                key=key,
                step=record.step,
                timestamp=int(record.timestamp * 1000),
                synchronous=True,
            )
        self._image_steps.add(record.step)

    def _log_params(self, client: MlflowClient, run: Run, record: EvalRecord) -> None:
        """N, P, the n grid and the reward names as params (``{prefix}.N``, ...), so that runs
        can be filtered and compared by them. MLflow params never change: a value the run
        already holds is kept (a later step with another N shows in the tags and tables)."""
        from mlflow.entities import Param

        wanted = {f"{record.key_prefix}.{name}": value for name, value in record.run_params().items()}
        missing = [
            Param(key, value[:MAX_PARAM_VALUE_LENGTH]) for key, value in wanted.items() if key not in run.data.params
        ]
        if missing:
            client.log_batch(run.info.run_id, params=missing, synchronous=True)

    def refresh_views(self) -> None:
        """Overview charts over the run so far (drawn when delivery is idle: latest wins)."""
        if not (self.charts and self._views_stale and self._client_obj is not None and self._run_id is not None):
            return
        from bon_tracker.reports.render import render_png

        self._views_stale = False
        client, run_id = self._client_obj, self._run_id
        records = [self._history[step] for step in sorted(self._history)]
        spaced = evenly_spaced(records, MAX_CHART_RECORDS)
        overlay = evenly_spaced(records, OVERLAY_CURVES)
        with bounded_http(self.max_retries, self.timeout):
            _upload(client, run_id, render_png("overlay", overlay, max_curves=OVERLAY_CURVES), "overlay.png")
            _upload(client, run_id, render_png("trend", spaced), "trend.png")
            if any(r.policy is not None for r in records):
                _upload(client, run_id, render_png("rl", spaced), "rl.png")

    def _write_cumulative_table(self, client: MlflowClient, run_id: str) -> None:
        """``bon_curves.json``: rows of every step, merged with a table an earlier process
        wrote to this run (its steps that this process re-logged are replaced)."""
        rows: dict[int, list[dict[str, Any]]] = {}
        existing = [f.path for f in client.list_artifacts(run_id)]
        if CUMULATIVE_TABLE in existing:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, CUMULATIVE_TABLE, tmp)
                data = json.loads(Path(local).read_text(encoding="utf-8"))
            for values in data.get("data", []):
                row = dict(zip(data["columns"], values, strict=True))
                rows.setdefault(int(row["step"]), []).append(row)
        for step, record in self._history.items():
            rows[step] = record.table_rows()
        every = [row for step in sorted(rows) for row in rows[step]]
        client.log_text(run_id, table_json(every, exact=True), CUMULATIVE_TABLE)
        registered = _registered_tables(
            client.get_run(run_id).data.tags.get(LOGGED_ARTIFACTS_TAG), CUMULATIVE_TABLE, MAX_TAG_VALUE_LENGTH
        )
        if registered is not None:
            client.set_tag(run_id, LOGGED_ARTIFACTS_TAG, registered)


def _upload(client: MlflowClient, run_id: str, png: bytes, path: str) -> None:
    """A PNG as the artifact ``bon_tracker/charts/<path>`` (overwritten by path on a replay)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(path).name
        local.write_bytes(png)
        client.log_artifact(run_id, str(local), f"{CHARTS_DIR}/{Path(path).parent}".rstrip("/."))


def _mlflow_run_id(client: Any, ref: str, experiment: str | None, tracking_uri: str) -> tuple[str, str]:
    """(run id, run name) of an MLflow run given by id or by name."""
    from mlflow.exceptions import MlflowException

    if _RUN_ID.match(ref):
        try:
            run = client.get_run(ref)
            return run.info.run_id, run.info.run_name or ref
        except MlflowException:
            pass  # maybe a name that looks like an id
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise RunNotFoundError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    quoted = ref.replace("'", "\\'")
    runs = (
        client.search_runs(experiment_ids, filter_string=f"attributes.run_name = '{quoted}'", max_results=50)
        if experiment_ids
        else []
    )
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    if not runs:
        raise RunNotFoundError(f"no MLflow run with id or name {ref!r} in {where} at {tracking_uri}")
    if len(runs) > 1:
        ids = ", ".join(r.info.run_id for r in runs[:5])
        raise RunNotFoundError(f"{len(runs)} MLflow runs are named {ref!r} in {where} ({ids}); pass a run id")
    return runs[0].info.run_id, ref


def read_records(
    run_id: str, tracking_uri: str | None = None, *, max_retries: int = 2, timeout: float = 30.0
) -> list[EvalRecord]:
    """The eval records an :class:`MlflowBackend` wrote to a run, in step order.

    Args:
        run_id: the MLflow run.
        tracking_uri: where it lives; default as for :class:`MlflowBackend`.
        max_retries: HTTP retries per request.
        timeout: seconds per HTTP request.
    """
    client = _client(tracking_uri or default_tracking_uri())
    with bounded_http(max_retries, timeout):
        if not client.list_artifacts(run_id, RECORDS_DIR):
            return []
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(client.download_artifacts(run_id, RECORDS_DIR, tmp))
            records = [
                EvalRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
                for path in folder.glob("step_*.json")
            ]
    return sorted(records, key=lambda r: r.step)


MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's MAX_PARAM_VAL_LENGTH


def _new_run_tags() -> dict[str, str]:
    """Tags of a run this backend creates: MLflow's own context (user, source file and
    type, git commit), as ``mlflow.start_run`` resolves them, and our version."""
    tags = {"bon_tracker.version": __version__}
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {**resolve_tags(), **tags}
    except Exception:  # an internal module: without it, the run lacks source and user only
        return tags


def _image_steps(client: MlflowClient, run_id: str, key: str) -> set[int]:
    """Steps of the images logged under ``key`` (``log_image`` file names:
    ``images/<key with / as ~>+step+<step>+timestamp+...``)."""
    prefix = key.replace("/", "~") + "+step+"
    steps = set()
    for item in client.list_artifacts(run_id, "images"):
        name = item.path.rsplit("/", 1)[-1]
        if name.startswith(prefix) and not name.endswith("+compressed.webp"):
            with contextlib.suppress(ValueError):
                steps.add(int(name[len(prefix) :].split("+", 1)[0]))
    return steps
