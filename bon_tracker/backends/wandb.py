"""Weights & Biases backend: scalars, tables and native charts in the user's W&B run.

What one eval step writes (``pre`` is the record's key prefix, ``bon`` by default),
as one ``run.log`` call so a step is all there or not there:

* ``{step_metric}``: the training step (``bon/step`` unless you pick another); every
  ``{pre}/*`` key is plotted against it (``define_metric``), never against W&B's
  ``_step``, which belongs to the trainer;
* every scalar of :meth:`EvalRecord.scalars` (``{pre}/true/n16``, ``{pre}/kl/n16``, ...);
* ``{pre}/bon_curves``: the step's curve table (columns ``TABLE_COLUMNS``);
* ``{pre}/curve_chart`` and ``{pre}/curve_chart_proxy``: native line charts of the true and of
  the proxy reward against KL, each with its ±1 SE lines, on separate axes (their scales
  differ: on one axis the true reward's peak is a flat line); their tables
  (``{pre}/curve_chart_table``, ...) have an ``n`` column for each point;
* ``{pre}/overlay/true`` and ``{pre}/overlay/proxy``: one line per eval step, at most
  ``overlay_steps`` evenly spaced steps, so each step's cost stays bounded;
* ``{pre}/0_curve``: the compact chart of :func:`bon_tracker.reports.charts.compact_chart` (true
  reward against n, legible in a media panel) as an image, and ``{pre}/0_curve_full`` the full
  two-panel :func:`~bon_tracker.reports.charts.curve_chart` (on by default; drawn in the chart
  process, so training does not wait for them). W&B names media files by its own ``_step``;
  the training step is the image's caption;
* ``{pre}/4_goodhart/over_steps``: n* and the bounds of its 95 % interval against training
  step, one chart (where they lie within the horizon);
* ``{pre}/1_true/over_steps``, ``{pre}/2_proxy/over_steps``: reward at n = 1, the middle n and
  the largest n against training step, with ±1 SE lines;
* ``{pre}/eval_record``: the record as JSON (hidden), which
  :func:`bon_tracker.backends.wandb_transaction_log.read_records` reads back exactly;
* ``{pre}/bon_predictions``: the fitted law's predictions beyond the measured n (when there are any);
* with texts (docs/texts.md): ``{pre}/bon_hacks``, the hack table, and the text features as scalars
  ``{pre}/9_text/<feature>/pick``, ``/all``, ``/diff``; with selection statistics (docs/selection.md):
  ``{pre}/bon_selection``, ``{pre}/bon_frontier``, the native ``{pre}/frontier_chart`` and the image
  ``{pre}/0_frontier`` (:mod:`bon_tracker.reports.selection_tables`, ``texts_tables``).

An alert's onset also raises W&B's own alert (``run.alert``: email or Slack, as the user's
W&B settings say), from the delivery worker; its 0/1 state is the ``{pre}/7_alert/<rule>`` scalar.

The latest Goodhart point also goes to ``run.summary`` (``{pre}/4_goodhart/n``, ``/kl``,
``/peak_gain``, ``/within_range`` and ``/step``, the eval step it was fitted at), with the
reports' sentence on it and its interval (``{pre}/4_goodhart/sentence``) and every alert onset
so far, one sentence each (``{pre}/7_alert/sentences``); the run's config gets N, P, the n grid
and the reward names (``{pre}.N``, ``{pre}.P``, ``{pre}.ns``, ``{pre}.proxy_name``,
``{pre}.true_name``), as MLflow gets them as params.

Exit: W&B's own exit hook waits, with no bound, for its service process (``wandb-core``),
which waits on the network (``wandb.init`` alone waits 90 s for an unreachable server).
When the process exits while a call of this backend into W&B is still in flight, or the
last one failed on the network (the tracker's ``finish`` already gave up on it), the
service gets :data:`EXIT_GRACE` seconds to shut down and is then stopped: what it had not
uploaded stays in the run's local folder (``wandb sync``), our records in bon_tracker's
write-ahead log (``bon-tracker sync``).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import subprocess
import sys
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from bon_tracker.backends.base import Backend, ConfigurationError, RunNotFoundError, classify_common
from bon_tracker.backends.wandb_transaction_log import RECORD_KEY, wait_until_complete
from bon_tracker.optional import require
from bon_tracker.record import (
    PREDICTION_COLUMNS,
    PREDICTIONS_TABLE,
    TABLE_COLUMNS,
    TABLE_NAME,
    EvalRecord,
    curve_image_key,
    evenly_spaced,
    metric_key,
)
from bon_tracker.reports import selection_tables, texts_tables

logger = logging.getLogger("bon_tracker")

CURVE_CHART_KEY = "curve_chart"
FULL_CHART_SUFFIX = "_full"  # {curve image key}_full: the full two-panel chart
MAX_SUMMARY_ALERTS = 30  # the summary lists at most this many alert onsets (the latest)
OVERLAY_KEY = "overlay"
EXIT_GRACE = 2.0  # seconds W&B's service gets at exit when W&B is stuck, before it is stopped
_MODES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
    "shared": "shared",
}


class WandbBackend(Backend):
    """Logs eval records to a Weights & Biases run.

    It writes into the active ``wandb.run`` when there is one (the run that
    transformers' ``WandbCallback`` or Lightning's ``WandbLogger`` started), or into
    ``run`` when given; otherwise it starts its own run on the first :meth:`log_eval`
    and finishes it in :meth:`finish`. A run it attached to is never finished here.

    Args:
        project: W&B project of a run this backend starts.
        entity: W&B entity (user or team) of a run this backend starts.
        run: a ``wandb`` run object to write into.
        run_name: display name of a run this backend starts.
        run_id: id of a run to continue (``resume="allow"``), e.g. from :meth:`spec`.
        mode: ``"online"``, ``"offline"`` or ``"disabled"``; default: W&B's own
            (``WANDB_MODE``).
        dir: folder under which W&B writes its ``wandb/`` run folders.
        step_metric: the key that carries the training step and is the x-axis of
            every ``{prefix}/*`` chart; default ``{prefix}/step``. Pass the trainer's
            step key (e.g. ``train/global_step``) to share its x-axis.
        images: also log the matplotlib curve chart as an image (needs matplotlib; drawn
            on the delivery thread, so training does not wait for it).
        overlay_steps: most eval steps drawn in the overlay charts.
        init_kwargs: more arguments for ``wandb.init`` (``tags``, ``group``, ``config``...).
        finish_timeout: seconds :meth:`finish` waits, after finishing a run it started,
            for W&B to close the run's local log (``run-<id>.wandb``); 0: do not wait.
        run_key: the id a new run gets (default: chosen now, at random). It is in
            :meth:`spec`, hence in the write-ahead log and a saved state, before the run
            exists, so a process killed before its first delivery is continued in that same
            run (``resume="allow"``) by ``bon-tracker sync`` or a resumed tracker.
    """

    name = "wandb"
    extra = "wandb"

    def __init__(
        self,
        *,
        project: str | None = None,
        entity: str | None = None,
        run: Any = None,
        run_name: str | None = None,
        run_id: str | None = None,
        mode: str | None = None,
        dir: str | Path | None = None,  # the name wandb.init uses
        step_metric: str | None = None,
        images: bool = True,
        overlay_steps: int = 20,
        init_kwargs: Mapping[str, Any] | None = None,
        finish_timeout: float = 30.0,
        run_key: str | None = None,
    ):
        if mode is not None and mode not in _MODES.values():
            raise ValueError(f"mode must be 'online', 'offline', 'disabled', 'shared' or None, got {mode!r}")
        if isinstance(overlay_steps, bool) or not isinstance(overlay_steps, int) or overlay_steps < 1:
            raise ValueError(f"overlay_steps must be a positive integer, got {overlay_steps!r}")
        self.project = project
        self.entity = entity
        self.run_name = run_name
        self.mode = mode
        self.dir = None if dir is None else str(dir)
        self.step_metric = step_metric
        self.images = images
        self.overlay_steps = overlay_steps
        self.init_kwargs = dict(init_kwargs or {})
        self.finish_timeout = float(finish_timeout)
        self._given_run = run
        self._run: Any = None
        self._run_id = run_id
        self.run_key = run_key or uuid.uuid4().hex[:16]  # W&B run ids: letters and digits
        self._owns_run = False
        self._defined: set[str] = set()  # key prefixes whose define_metric calls are done
        self._configured: set[str] = set()  # key prefixes whose N, P, ... the run's config holds
        self._logged: set[tuple[str, int]] = set()  # (prefix, step) written by this process
        self._history: dict[str, list[EvalRecord]] = {}  # per prefix, for the overlay charts
        self._calls = 0  # calls into W&B in flight (the delivery worker's, finish's)
        self._calls_lock = threading.Lock()
        self._failed = False  # the last call into W&B failed on the network
        self._exiting = False  # the process is exiting and W&B was stopped: call it no more

    # ---- Backend interface ----------------------------------------------------------
    @property
    def run(self) -> Any:
        """The W&B run written to (None before the first :meth:`log_eval`)."""
        return self._run

    @property
    def run_id(self) -> str | None:
        run = self._run if self._run is not None else self._given_run
        return run.id if run is not None else self._run_id

    @property
    def location(self) -> str | None:
        run = self._run if self._run is not None else self._given_run
        if run is None:
            return None
        url = getattr(run, "url", None)
        if url:
            return str(url)
        folder = getattr(getattr(run, "settings", None), "sync_dir", None)
        return f"W&B run {run.id}" + (f" in {folder} (upload: wandb sync {folder})" if folder else "")

    def spec(self) -> dict[str, Any]:
        run = self._run if self._run is not None else self._given_run
        mode, root = self.mode, self.dir
        if run is not None:
            # Older SDKs call the modes "run" and "dryrun".
            mode = mode or _MODES.get(getattr(run.settings, "mode", None))
            root = root or getattr(run.settings, "root_dir", None)
        return {
            "backend": self.name,
            "project": (run.project if run is not None else None) or self.project,
            "entity": (run.entity if run is not None else None) or self.entity,
            "run_id": self.run_id,
            "run_key": self.run_key,
            "run_name": self.run_name,
            "mode": mode,
            "dir": None if root is None else str(root),
            "step_metric": self.step_metric,
            "images": self.images,
            "overlay_steps": self.overlay_steps,
        }

    def check(self) -> None:
        """A missing extra or invalid W&B settings (e.g. ``WANDB_SILENT=`` empty) are errors
        now, never an outage later. Reads the environment the way ``wandb.setup`` does."""
        wandb = require("wandb", "wandb")
        try:
            settings = wandb.Settings()
            settings.update_from_env_vars(dict(os.environ))
            if self.mode is not None:
                settings.mode = self.mode
        except Exception as err:  # pydantic's ValidationError: names the setting and the value
            raise ConfigurationError(f"invalid W&B settings: {err}") from None
        given = self.init_kwargs.get("settings")
        mode = self.mode or self.init_kwargs.get("mode") or getattr(given, "mode", None) or settings.mode
        if _MODES.get(mode, mode) == "online" and self._given_run is None and wandb.run is None:
            base_url = getattr(given, "base_url", None) or settings.base_url
            if not (getattr(given, "api_key", None) or _has_credentials(settings, base_url)):
                raise ConfigurationError(
                    f"W&B is online but no API key for {base_url} was found: run `wandb login`, set "
                    "WANDB_API_KEY, or log offline (mode='offline', or WANDB_MODE=offline)"
                )

    def classify(self, error: BaseException) -> str:
        """W&B's own errors: ``CommError`` is the network (retry), ``AuthenticationError`` and
        ``UsageError`` are configuration; settings that fail validation too."""
        wandb_errors = getattr(sys.modules.get("wandb"), "errors", None)
        if wandb_errors is not None:
            if isinstance(error, getattr(wandb_errors, "AuthenticationError", ())):
                return "config"
            if isinstance(error, getattr(wandb_errors, "CommError", ())):
                return "transient"
            if isinstance(error, getattr(wandb_errors, "UsageError", ())):
                return "config"
        if type(error).__name__ == "ValidationError":  # pydantic: an invalid setting
            return "config"
        if self._exiting:  # whatever W&B raised once it was stopped: the record waits in the log
            return "transient"
        return classify_common(error)

    @classmethod
    def claims(cls, ref: str) -> bool:
        path = Path(ref)
        return (path.is_file() and path.suffix == ".wandb") or (
            path.is_dir() and (any(path.glob("run-*.wandb")) or any(path.glob("*/run-*.wandb")))
        )

    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[str, list[EvalRecord]]:
        """``ref``: a local run folder (offline, or the local copy of an online run), else
        ``entity/project/run_id`` through the public API."""
        from bon_tracker.backends import wandb_transaction_log as txlog

        path = Path(ref)
        if path.exists():
            try:
                log = txlog.find_transaction_log(path)
            except (FileNotFoundError, ValueError) as err:
                raise RunNotFoundError(f"wandb:{ref}: {err}") from None
            label = log.stem[len("run-") :] if log.stem.startswith("run-") else log.stem  # the run id
            for item in txlog.iter_records(log):  # the run's display name, from its "run" record
                if item.WhichOneof("record_type") == "run":
                    label = item.run.display_name or label
                    break
            return label, txlog.read_records(path)
        return _read_online(ref, options.get("key_prefix") or "bon")

    def log_eval(self, record: EvalRecord) -> None:
        pre = record.key_prefix
        if (pre, record.step) in self._logged:  # a replay of a step already written: keep one copy
            logger.debug("bon_tracker: wandb already has %s step %d; skipped", pre, record.step)
            return
        wandb = require("wandb", "wandb")
        with self._calling_wandb():
            run = self._open(wandb)
            self._define_metrics(run, pre)
            history = [r for r in self._history.get(pre, []) if r.step != record.step] + [record]
            history.sort(key=lambda r: r.step)

            # Summary first: setting it again on a retry is harmless, logging a row twice is not.
            self._update_config(run, record)
            run.summary.update(_summary_texts(history))
            if record.goodhart is not None:
                g, scalars = record.goodhart, record.scalars()
                n_key, kl_key = metric_key("goodhart", "n", pre), metric_key("goodhart", "kl", pre)
                run.summary.update(
                    {
                        # The logged scalars decide: none beyond the horizon (a fit may say 4e7).
                        n_key: scalars.get(n_key),
                        kl_key: scalars.get(kl_key),
                        metric_key("goodhart", "status", pre): record.goodhart_status(),
                        metric_key("goodhart", "peak_gain", pre): float(g.peak_gain),
                        metric_key("goodhart", "within_range", pre): bool(g.within_range),
                        metric_key("goodhart", "step", pre): record.step,
                    }
                )
            # One call, and no step=: the trainer owns W&B's step; ours is the step metric.
            run.log(self._row(wandb, record, history))
        self._logged.add((pre, record.step))
        self._history[pre] = history

    def alert(self, title: str, text: str, level: str = "WARN", *, step: int | None = None) -> None:
        """``run.alert``: W&B emails or posts it to Slack as the user's settings say; offline runs
        keep it in their transaction log (``bon-tracker`` reads it back, ``wandb sync`` sends it)."""
        wandb = require("wandb", "wandb")
        with self._calling_wandb():
            run = self._open(wandb)
            name = str(level).upper()
            run.alert(title=title[:63], text=text, level=getattr(wandb.AlertLevel, name, wandb.AlertLevel.WARN))

    def finish(self) -> None:
        run, self._run = self._run, None
        self._defined.clear()
        self._configured.clear()
        if run is not None:
            self._run_id = run.id  # a later log_eval continues this same run
            if self._owns_run:
                with self._calling_wandb():
                    run.finish()
                self._wait_for_log(run)
        self._owns_run = False

    # ---- internals ------------------------------------------------------------------
    @contextlib.contextmanager
    def _calling_wandb(self) -> Iterator[None]:
        """Around every call into W&B: counts the calls in flight and remembers whether the
        last one failed on the network, which is what decides how the process exits."""
        if self._exiting:
            raise ConnectionError("the process is exiting and W&B was stopped")
        _watch_exit(self)
        with self._calls_lock:
            self._calls += 1
        try:
            yield
        except Exception as err:
            self._failed = self.classify(err) == "transient"
            raise
        else:
            self._failed = False
        finally:
            with self._calls_lock:
                self._calls -= 1

    @property
    def _stuck(self) -> bool:
        """A call into W&B is in flight, or the last one failed on the network."""
        return self._calls > 0 or self._failed

    def _wait_for_log(self, run: Any) -> None:
        """Return from finish() only once the run's local log is whole, so that the run
        folder can be read (``bon-tracker compare``) right away in this process."""
        log = getattr(run.settings, "sync_file", None)
        if not log or not Path(log).is_file() or self.finish_timeout <= 0:
            return
        if not wait_until_complete(log, timeout=self.finish_timeout):
            logger.warning("bon_tracker: W&B had not closed %s %.0f s after finish()", log, self.finish_timeout)

    def _open(self, wandb: Any) -> Any:
        """The run to write into: the one given, the active one, or a new one."""
        if self._run is not None:
            if not getattr(self._run, "_is_finished", False):
                return self._run
            # Its owner (e.g. a trainer callback at train end) finished it: continue it by id.
            self._run_id, self._run = self._run.id, None
            self._defined.clear()
            self._configured.clear()
        run = self._given_run if self._given_run is not None else wandb.run
        if run is not None and getattr(run, "_is_finished", False):
            self._run_id, run = self._run_id or run.id, None
        if run is not None:
            if self._run_id is not None and run.id != self._run_id:
                # The trainer's run decides where its metrics go; the curves belong beside them.
                logger.warning("bon_tracker: writing to the active W&B run %s, not to run_id %s", run.id, self._run_id)
            self._run, self._owns_run = run, False
            return run
        options: dict[str, Any] = {
            "project": self.project,
            "entity": self.entity,
            "name": self.run_name,
            "mode": self.mode,
            **self.init_kwargs,
        }
        if self.dir is not None:
            Path(self.dir).mkdir(parents=True, exist_ok=True)  # wandb ignores a missing dir
            options["dir"] = self.dir
        options.update(id=self._run_id or self.run_key, resume="allow")
        self._run = wandb.init(**{k: v for k, v in options.items() if v is not None})
        self._owns_run = True
        return self._run

    def _update_config(self, run: Any, record: EvalRecord) -> None:
        """N, P, the n grid and the reward names as the run's config, once per key prefix (a
        later step with another N shows in its tables), keeping values the run already holds."""
        pre = record.key_prefix
        if pre in self._configured:
            return
        wanted = {f"{pre}.{name}": value for name, value in record.run_params().items()}
        missing = {key: value for key, value in wanted.items() if key not in run.config}
        if missing:
            run.config.update(missing, allow_val_change=True)
        self._configured.add(pre)

    def _define_metrics(self, run: Any, pre: str) -> None:
        if pre in self._defined:
            return
        step_metric = self.step_metric or f"{pre}/step"
        run.define_metric(step_metric)
        run.define_metric(f"{pre}/*", step_metric=step_metric)
        run.define_metric(f"{pre}/{RECORD_KEY}", hidden=True, summary="none")
        self._defined.add(pre)

    def _row(self, wandb: Any, record: EvalRecord, history: list[EvalRecord]) -> dict[str, Any]:
        pre, c = record.key_prefix, record.curve
        row: dict[str, Any] = {
            self.step_metric or f"{pre}/step": record.step,
            **record.scalars(),
            **texts_tables.text_scalars(record),
        }
        table_rows = record.table_rows()
        row[f"{pre}/{TABLE_NAME}"] = wandb.Table(
            columns=list(TABLE_COLUMNS), data=[[r[col] for col in TABLE_COLUMNS] for r in table_rows]
        )
        predictions = record.prediction_rows()
        if predictions:
            row[f"{pre}/{PREDICTIONS_TABLE}"] = wandb.Table(
                columns=list(PREDICTION_COLUMNS), data=[[r[col] for col in PREDICTION_COLUMNS] for r in predictions]
            )
        # Long format, so that one line-series chart draws a curve and its ±1 SE lines, each point
        # keeping its n; true and proxy each in their own chart (their scales differ).
        for kind, key, name in (
            ("true", CURVE_CHART_KEY, record.true_name),
            ("proxy", f"{CURVE_CHART_KEY}_proxy", record.proxy_name),
        ):
            mean, se = getattr(c, f"{kind}_mean"), getattr(c, f"{kind}_se")
            points = [
                [
                    float(c.kl[i]),
                    f"{kind}{label}",
                    float(mean[i] + sign * se[i]) if sign else float(mean[i]),
                    int(c.n[i]),
                ]
                for label, sign in (("", 0), (" -1 SE", -1), (" +1 SE", 1))
                for i in range(len(c.n))
                if not sign or math.isfinite(float(se[i]))
            ]
            row[f"{pre}/{key}"] = wandb.plot_table(
                "wandb/lineseries/v0",
                wandb.Table(columns=["kl", "series", "reward", "n"], data=points),
                fields={"step": "kl", "lineKey": "series", "lineVal": "reward"},
                string_fields={
                    "title": f"best-of-n at step {record.step}: {name} ({kind}) reward vs KL, ±1 SE",
                    "xname": "KL (nats)",
                },
            )
        shown = evenly_spaced(history, self.overlay_steps)
        for series in ("true", "proxy"):
            row[f"{pre}/{OVERLAY_KEY}/{series}"] = wandb.plot.line_series(
                xs=[r.curve.kl.tolist() for r in shown],
                ys=[getattr(r.curve, f"{series}_mean").tolist() for r in shown],
                keys=[f"step {r.step}" for r in shown],
                title=f"{series} reward vs KL by eval step ({len(shown)} of {len(history)} steps)",
                xname="KL (nats)",
            )
        row.update(self._over_steps_panels(wandb, record, shown, len(history)))
        goodhart = _goodhart_panel(wandb, record, shown, len(history))
        if goodhart is not None:
            row[metric_key("goodhart", "over_steps", pre)] = goodhart
        for chart, key in (("compact", curve_image_key(pre)), ("curve", curve_image_key(pre) + FULL_CHART_SUFFIX)):
            image = self._curve_image(wandb, record, chart)
            if image is not None:
                row[key] = image
        row.update(self._selection_and_text_panels(wandb, record))
        row[f"{pre}/{RECORD_KEY}"] = json.dumps(record.to_json(), separators=(",", ":"))
        return row

    def _selection_and_text_panels(self, wandb: Any, record: EvalRecord) -> dict[str, Any]:
        """``{pre}/bon_hacks`` (the hack table: a media panel with a step slider), ``{pre}/bon_selection``
        and ``{pre}/bon_frontier`` (the optima and the best rule per KL budget), ``{pre}/frontier_chart``
        (true reward against KL per rule and true reward, a native chart) and ``{pre}/0_frontier`` (the
        chart as an image); only what the record holds (texts, selection statistics)."""
        pre, out = record.key_prefix, {}
        tables = []
        if record.hacks is not None:
            tables.append((texts_tables.HACKS_TABLE, texts_tables.hack_table(record)))
        stats = record.selection
        if stats is not None:
            tables.append((selection_tables.SELECTION_TABLE, selection_tables.selection_table(record)))
            tables.append((selection_tables.FRONTIER_TABLE, selection_tables.frontier_table(record)))
        for name, (columns, rows) in tables:
            out[f"{pre}/{name}"] = wandb.Table(columns=list(columns), data=rows, allow_mixed_types=True)
        if stats is None:
            return out
        curves = [(s, s.curve("bon")) for s in stats.statistics]
        out[f"{pre}/frontier_chart"] = wandb.plot.line_series(
            xs=[list(c.kl) for _, c in curves],
            ys=[list(c.true_mean) for _, c in curves],
            keys=[f"{s.rule} ({s.true_name})" for s, _ in curves],
            title=f"selection rules at step {record.step}: true reward of best-of-n vs KL (table: bon_frontier)",
            xname="KL (nats)",
        )
        if self.images:
            try:
                from PIL import Image  # matplotlib depends on pillow

                from bon_tracker.reports.selection_charts import frontier_png

                png = frontier_png(record)
            except ImportError as err:
                logger.warning("bon_tracker: no frontier images in W&B (%s)", err)
                return out
            image = Image.open(io.BytesIO(png))
            out[selection_tables.frontier_image_key(pre)] = wandb.Image(image, caption=f"step {record.step}")
        return out

    @staticmethod
    def _over_steps_panels(wandb: Any, record: EvalRecord, shown: list[EvalRecord], total: int) -> dict[str, Any]:
        """``{pre}/1_true/over_steps`` and ``{pre}/2_proxy/over_steps``: the reward at a few n
        (1, the middle of the grid, the largest) against training step, each with its ±1 SE
        lines (W&B's line panels have no error bands of their own), over ``shown`` steps."""
        pre, grid = record.key_prefix, record.curve.n.tolist()
        ns = sorted({1, grid[len(grid) // 2], grid[-1]} & set(grid))
        panels: dict[str, Any] = {}
        for kind in ("true", "proxy"):
            xs, ys, keys = [], [], []
            for n in ns:
                at = [(r.step, r.curve.n.tolist().index(n)) for r in shown if n in r.curve.n.tolist()]
                mean = [float(getattr(r.curve, f"{kind}_mean")[i]) for r, (_, i) in zip(shown, at)]
                se = [float(getattr(r.curve, f"{kind}_se")[i]) for r, (_, i) in zip(shown, at)]
                steps = [step for step, _ in at]
                for label, values in (
                    (f"n={n}", mean),
                    (f"n={n} -1 SE", [m - e for m, e in zip(mean, se)]),
                    (f"n={n} +1 SE", [m + e for m, e in zip(mean, se)]),
                ):
                    xs.append(steps)
                    ys.append(values)
                    keys.append(label)
            name = record.true_name if kind == "true" else record.proxy_name
            panels[metric_key(kind, "over_steps", pre)] = wandb.plot.line_series(
                xs=xs,
                ys=ys,
                keys=keys,
                title=f"{name} reward of best-of-n over training, ±1 SE ({len(shown)} of {total} eval steps)",
                xname="training step",
            )
        return panels

    def _curve_image(self, wandb: Any, record: EvalRecord, chart: str = "curve") -> Any:
        if not self.images:
            return None
        try:
            from PIL import Image  # matplotlib depends on pillow

            from bon_tracker.reports.render import render_png

            # Drawn in the chart process (no GIL held here); wandb.Image(figure) would also patch matplotlib.
            png = render_png(chart, [record])
        except ImportError as err:
            logger.warning("bon_tracker: no curve images in W&B (%s)", err)
            self.images = False  # say it once
            return None
        return wandb.Image(Image.open(io.BytesIO(png)), caption=f"step {record.step}")


def _summary_texts(history: list[EvalRecord]) -> dict[str, str]:
    """The run summary's sentences: the latest Goodhart point with its interval, and every
    alert onset so far (the latest ``MAX_SUMMARY_ALERTS``), one line each."""
    from bon_tracker.reports.charts import goodhart_text  # the CLI's and reports' wording

    last = history[-1]
    pre = last.key_prefix
    onsets = [f"step {a.step}, {a.rule}: {a.message}" for r in history for a in r.onsets][-MAX_SUMMARY_ALERTS:]
    return {
        metric_key("goodhart", "sentence", pre): f"step {last.step}: {goodhart_text(last)}",
        metric_key("alert", "sentences", pre): "\n".join(onsets) if onsets else "no alerts so far",
    }


def _goodhart_panel(wandb: Any, record: EvalRecord, shown: list[EvalRecord], total: int) -> Any:
    """n* and its interval's bounds against training step as one line chart (W&B's line
    panels have no bands): the values :meth:`EvalRecord.scalars` logs, none beyond the horizon."""
    pre = record.key_prefix
    xs, ys, keys = [], [], []
    scalars = [(r.step, r.scalars()) for r in shown]
    for name, label in (("n", "n*"), ("n_low", "n* 95 % low"), ("n_high", "n* 95 % high")):
        key = metric_key("goodhart", name, pre)
        points = [(step, values[key]) for step, values in scalars if key in values]
        if points:
            xs.append([step for step, _ in points])
            ys.append([value for _, value in points])
            keys.append(label)
    if not keys:
        return None
    return wandb.plot.line_series(
        xs=xs,
        ys=ys,
        keys=keys,
        title=f"Goodhart point n* over training, with its 95 % interval ({len(shown)} of {total} eval steps)",
        xname="training step",
    )


# ---- the process's exit -----------------------------------------------------------------
_BACKENDS: weakref.WeakSet[WandbBackend] = weakref.WeakSet()
_EXIT_HOOKED = False
_EXIT_LOCK = threading.Lock()


def _watch_exit(backend: WandbBackend) -> None:
    """Hook the process's exit once, before the first call into W&B.

    W&B's own hook (``atexit``, registered when its service starts) waits for the service;
    ours must run first. ``threading._register_atexit`` (what ``concurrent.futures`` uses)
    runs at the start of the interpreter's shutdown, before every ``atexit`` hook."""
    global _EXIT_HOOKED
    with _EXIT_LOCK:
        _BACKENDS.add(backend)
        if _EXIT_HOOKED:
            return
        _EXIT_HOOKED = True
    register = getattr(threading, "_register_atexit", None) or atexit.register
    with contextlib.suppress(RuntimeError):  # the interpreter is already shutting down
        register(_at_exit)


def _at_exit() -> None:
    stuck = [backend for backend in list(_BACKENDS) if backend._stuck]
    if not stuck:
        return  # W&B has nothing of ours in flight: its own exit, unchanged
    for backend in stuck:
        backend._exiting = True  # no new wandb.init (a new service) from a retry, mid-shutdown
    _stop_service(EXIT_GRACE)


def _stop_service(grace: float) -> None:
    """``wandb.teardown()``, waiting at most ``grace`` seconds for W&B's service process to
    end, then stopping it. Needs this SDK's internals (the process started by
    ``wandb.sdk.lib.service``); where they differ, W&B's own exit is left as it is."""
    wandb = sys.modules.get("wandb")
    setup = getattr(sys.modules.get("wandb.sdk.wandb_setup"), "_singleton", None)
    if wandb is None or setup is None or getattr(setup, "_pid", os.getpid()) != os.getpid():
        return
    connection = getattr(setup, "_connection", None)
    core = getattr(getattr(connection, "_proc", None), "_process", None)  # None: a service not ours to stop
    if connection is None or getattr(connection, "_torn_down", False) or not isinstance(core, subprocess.Popen):
        return
    exit_code = _exit_code()
    done = threading.Event()

    def teardown() -> None:
        try:
            wandb.teardown(exit_code)  # also removes W&B's exit hook, so it does not wait afterwards
        except BaseException:  # SystemExit (the service's exit code) included: nothing to do about it here
            pass
        finally:
            done.set()

    threading.Thread(target=teardown, name="bon_tracker-wandb-teardown", daemon=True).start()
    if done.wait(grace):
        return
    logger.warning(
        "bon_tracker: W&B's service (wandb-core, pid %d) had not shut down %.0f s into the process's exit "
        "(W&B unreachable); stopped it. What it had not uploaded stays in the run's local folder (wandb sync)",
        core.pid,
        grace,
    )
    for stop in (core.terminate, core.kill):
        with contextlib.suppress(OSError):
            stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            core.wait(1.0)
            break
    done.wait(1.0)


def _exit_code() -> int:
    """The exit code W&B's own hook would report: its ``ExitHooks`` records ``sys.exit`` and
    uncaught exceptions (``sys.excepthook`` is its bound method)."""
    hooks = getattr(sys.excepthook, "__self__", None)
    code = getattr(hooks, "exit_code", 0) if type(hooks).__name__ == "ExitHooks" else 0
    return code if isinstance(code, int) else 0


def _read_online(run_path: str, key_prefix: str) -> tuple[str, list[EvalRecord]]:
    wandb = require("wandb", "wandb")
    if run_path.count("/") != 2:
        raise RunNotFoundError(f"wandb:{run_path}: expected a run folder or ENTITY/PROJECT/RUN_ID")
    try:
        run = wandb.Api().run(run_path)
    except Exception as err:  # wandb raises CommError, ValueError... for a missing run or no login
        raise RunNotFoundError(f"wandb:{run_path}: cannot open the run through the W&B API ({err})") from None
    key = f"{key_prefix}/{RECORD_KEY}"
    records, seen = [], set()
    for row in run.scan_history(keys=[key]):
        value = row.get(key)
        if isinstance(value, str):
            record = EvalRecord.from_json(json.loads(value))
            if record.step not in seen:
                seen.add(record.step)
                records.append(record)
    return run.name or run.id, records


def _has_credentials(settings: Any, base_url: str) -> bool:
    """Whether W&B will find credentials for ``base_url`` the way ``wandb.init`` looks for
    them (environment, ``.netrc``, settings); True when that cannot be told (other SDKs)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE") or settings.api_key:
        return True
    try:
        from wandb.sdk.lib.wbauth import wbnetrc
        from wandb.sdk.lib.wbauth.authenticate import session_credentials
    except ImportError:
        return True
    try:
        return bool(wbnetrc.read_netrc_auth(host=base_url) or session_credentials(host=base_url))
    except Exception:  # an unreadable .netrc: wandb.init reports it itself
        return True
