"""TensorBoard backend: event files in a log dir, written with TensorBoard's own protos.

No TensorFlow and no torch: events are ``tensorboard.compat.proto`` messages framed by
``tensorboard.summary.writer.record_writer.RecordWriter``, the same bytes
``SummaryWriter`` writes. What one eval step writes (``pre`` is the record's key prefix):

* every scalar of :meth:`EvalRecord.scalars` at the training step (Scalars and Time
  Series tabs), as float32 tensors like TensorBoard's own writers (its data server drops
  float64 scalars); the exact values are in the record below;
* ``{pre}_se_bands/{mean}/mean_minus_se`` and ``/mean_plus_se`` for each true and proxy mean
  (:func:`se_tag`): a tag group of their own, after ``{pre}``'s (Time Series groups cards by
  the tag up to its first ``/``), read by the custom-scalars layout: in the Custom Scalars tab,
  one category for the true reward and one for the proxy reward (their scales differ), each
  with one margin chart per n, n ascending, and one for the Goodhart point, n* between the
  bounds of its interval;
* ``{pre}/0_curve`` (:func:`~bon_tracker.record.curve_image_key`): the compact chart of
  :func:`bon_tracker.reports.charts.compact_chart` (true reward against n, legible in the
  ~400-px card) as an image at the step (with a step slider, the latest step first), and
  ``{pre}/0_curve_full``: the full two-panel :func:`~bon_tracker.reports.charts.curve_chart`;
* ``{pre}/goodhart_point``: a text summary of the fitted Goodhart point (Text tab);
* ``{pre}/alerts``: at a step with alert onsets or clears, one line each (Text tab); the
  0/1 state of every rule is the scalar ``{pre}/7_alert/<rule>``;
* ``{pre}/bon_hacks`` and ``{pre}/bon_selection``: the hack table, and the selection rules' optima
  and frontier, as markdown tables (Text tab; every cell escaped), ``{pre}/0_frontier`` the frontier
  chart, and the text features as scalars ``{pre}/9_text/<feature>/pick`` ... (docs/texts.md,
  docs/selection.md);
* ``{pre}/eval_record``: the record as JSON under a plugin name no dashboard shows,
  which :meth:`TensorBoardBackend.read_records` reads back exactly.

Event files are append-only, so each eval step gets its own event file, named from the
record (``events.out.tfevents.<record time>.bon_tracker.<prefix>.step<step>``) and written
atomically (temporary file, then rename). A step whose file is in the log dir is
skipped, so a replayed record (``bon-tracker sync``, a retry) duplicates nothing, and a
crash never leaves half a step.

One process writes a log dir: it holds ``<log dir>/.bon_tracker.lock`` (``flock``, with its
pid inside) from its first record until it finishes. A second writer of the same log dir
gets a :class:`ConfigurationError` naming the holder (its records stay in its write-ahead
log for ``bon-tracker sync``); the lock of a process that died is simply taken over. A new
run named ``run_name`` whose folder ``runs/<run_name>`` is taken (by a live process or an
earlier run) gets a folder of its own, ``runs/<run_name>-<suffix>``, as the local backend does.

To write beside a transformers ``Trainer`` that reports to TensorBoard, pass its log dir:
``log_dir=trainer.args.logging_dir``; TensorBoard then shows the curves in the Trainer's
own run. View with ``tensorboard --logdir <log_dir or its parent>``, then open
:func:`tensorboard_url` (``http://localhost:6006/?smoothing=0#timeseries``, and
``#custom_scalars&_smoothingWeight=0`` for the Custom Scalars tab): TensorBoard's default
smoothing (0.6) understates a fall of the true reward over a few eval steps.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import struct
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bon_tracker.backends.base import Backend, ConfigurationError, RunNotFoundError, classify_common
from bon_tracker.files import atomic_write_bytes
from bon_tracker.optional import MissingDependencyError, require
from bon_tracker.record import EvalRecord, curve_image_key, metric_key
from bon_tracker.reports import selection_tables, texts_tables

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tensorboard.compat.proto.summary_pb2 import Summary

logger = logging.getLogger("bon_tracker")

FILE_MARK = "bon_tracker"  # in the name of every event file this backend writes
RECORD_PLUGIN = "bon_tracker"  # plugin name of the eval-record tensor: no dashboard shows it
RECORD_KEY = "eval_record"
GOODHART_TEXT_KEY = "goodhart_point"
ALERTS_TEXT_KEY = "alerts"
LOWER_SUFFIX = "mean_minus_se"
UPPER_SUFFIX = "mean_plus_se"
SE_GROUP_SUFFIX = "_se_bands"  # {prefix}_se_bands/...: the SE bounds, a Time Series group of their own
FULL_CHART_SUFFIX = "_full"  # {curve image key}_full: the full two-panel chart
LOCAL_UI = "http://localhost:6006"  # where `tensorboard --logdir` serves by default


def tensorboard_url(base_url: str = LOCAL_UI, page: str = "timeseries") -> str:
    """A TensorBoard page with smoothing off, so that no falling curve is smoothed away: the
    Time Series tab (``?smoothing=0``) or the Custom Scalars tab (``_smoothingWeight=0``,
    the legacy dashboards' own setting, read from the URL's fragment).

    >>> tensorboard_url()
    'http://localhost:6006/?smoothing=0#timeseries'
    >>> tensorboard_url(page="custom_scalars")
    'http://localhost:6006/?smoothing=0#custom_scalars&_smoothingWeight=0'
    """
    if page not in ("timeseries", "custom_scalars"):
        raise ValueError(f"page must be 'timeseries' or 'custom_scalars', got {page!r}")
    fragment = "timeseries" if page == "timeseries" else "custom_scalars&_smoothingWeight=0"
    return f"{base_url.rstrip('/')}/?smoothing=0#{fragment}"


def se_tag(prefix: str, tag: str, suffix: str) -> str:
    """The tag of one SE bound of the scalar ``tag`` (``suffix``: :data:`LOWER_SUFFIX` or
    :data:`UPPER_SUFFIX`), in the group ``{prefix}_se_bands``.

    >>> se_tag("bon", "bon/1_true/n0004", LOWER_SUFFIX)
    'bon_se_bands/1_true/n0004/mean_minus_se'
    """
    rest = tag[len(prefix) + 1 :] if tag.startswith(prefix + "/") else tag
    return f"{prefix}{SE_GROUP_SUFFIX}/{rest}/{suffix}"


CUSTOM_SCALARS_TAG = "custom_scalars__config__"  # tensorboard.plugins.custom_scalar.metadata.CONFIG_SUMMARY_TAG
_STEP_FILE = re.compile(rf"^events\.out\.tfevents\.\d+\.{FILE_MARK}\.(?P<slug>[A-Za-z0-9_-]+)\.step(?P<step>-?\d+)$")
_CONFIG_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG}
LOCK_FILE = ".bon_tracker.lock"  # no "tfevents" in the name: TensorBoard never reads it
DEFAULT_ROOT = "runs"  # the default log dir is <DEFAULT_ROOT>/<run_name>, as torch's SummaryWriter names it
MAX_RUN_NAME = 200  # characters: the folder name stays within every file system's limit (255 bytes)
_TEMP_FILE = re.compile(r"^\.bon_tracker-[0-9a-f]{12}\.tmp$")  # bon_tracker.files.atomic_write_bytes


def check_run_name(run_name: Any) -> str | None:
    """``run_name`` if it names one folder under ``runs/``; else a ValueError saying why.

    >>> check_run_name("ppo lr=1e-5")
    'ppo lr=1e-5'
    >>> check_run_name("../elsewhere")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: run_name '../elsewhere' contains a path separator ('/'): a run name is one folder name ...
    """
    if run_name is None:
        return None
    if not isinstance(run_name, str):
        raise TypeError(f"run_name must be a string, got {type(run_name).__name__}")
    shown = repr(run_name if len(run_name) <= 60 else run_name[:57] + "...")
    if not run_name.strip():
        raise ValueError(f"run_name must not be empty, got {shown}")
    if len(run_name) > MAX_RUN_NAME:
        raise ValueError(f"run_name is {len(run_name)} characters long; at most {MAX_RUN_NAME} are allowed ({shown})")
    bad = next((c for c in run_name if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"run_name must not contain a control character (found {bad!r} in {shown})")
    separator = next((c for c in ("/", "\\") if c in run_name), None)
    if separator is not None:
        raise ValueError(
            f"run_name {shown} contains a path separator ({separator!r}): a run name is one folder name "
            f"under {DEFAULT_ROOT}/; pass log_dir= to write elsewhere"
        )
    if run_name in (".", ".."):
        raise ValueError(
            f"run_name {shown} must not be '.' or '..': the log dir would be {DEFAULT_ROOT}/ itself or the "
            "folder above it, outside the run's own folder"
        )
    return run_name


def _slug(prefix: str) -> str:
    """A file-name-safe, collision-free form of a key prefix.

    >>> _slug("bon"), _slug("eval/bon")
    ('bon', 'eval_bon-8aa22840')
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)
    return safe if safe == prefix else f"{safe}-{hashlib.sha1(prefix.encode()).hexdigest()[:8]}"


def step_file_name(record: EvalRecord) -> str:
    """The event file that holds this record's step: fixed by the record, so a replay
    writes the same file."""
    stamp, slug = int(record.timestamp), _slug(record.key_prefix)
    return f"events.out.tfevents.{stamp:010d}.{FILE_MARK}.{slug}.step{record.step:012d}"


def curve_tags(record: EvalRecord) -> dict[str, list[str | None]]:
    """The :meth:`EvalRecord.scalars` key of the true and proxy mean at each n of the grid.

    Found by asking ``scalars()`` itself on a copy of the record whose means are marker
    values, so the custom-scalars layout follows the record's metric names, whatever they
    are. A mean that ``scalars()`` does not export maps to None.

    >>> from bon_tracker.core import bon_curve
    >>> record = EvalRecord.build(10, bon_curve(np.eye(4), np.eye(4), ns=[1, 4]))
    >>> keys = curve_tags(record)["true"]
    >>> len(keys), [record.scalars()[key] for key in keys] == record.curve.true_mean.tolist()
    (2, True)
    """
    c = record.curve
    index = np.arange(len(c.n), dtype=float)
    markers = {"true": 1e15 + 8 * index + 0.5, "proxy": 3e15 + 8 * index + 0.5}  # no reward is this large
    probe = replace(
        record,
        curve=replace(c, true_mean=markers["true"], proxy_mean=markers["proxy"]),
        goodhart=None,
        policy=None,
        context={},
    )
    by_value = {value: key for key, value in probe.scalars().items()}
    return {series: [by_value.get(float(v)) for v in values] for series, values in markers.items()}


def goodhart_text(record: EvalRecord) -> str:
    """The Markdown text summary of the step's Goodhart point.

    >>> from bon_tracker.core import bon_curve
    >>> goodhart_text(EvalRecord.build(7, bon_curve(np.eye(4), np.eye(4), ns=[1, 4])))[:44]
    'No Goodhart point at step 7: the fitted true'
    """
    g = record.goodhart
    c = record.curve
    if g is None:
        return (
            f"No Goodhart point at step {record.step}: the fitted {record.true_name} reward does not peak "
            f"over the measured n (up to {int(c.n.max())}), or too few n to fit."
        )
    from bon_tracker.reports.charts import goodhart_text as headline  # the CLI's and reports' wording

    sentence = headline(record).replace("*", "\\*")  # Markdown: n* is no emphasis
    return (
        f"**Step {record.step}**: {sentence}\n\n"
        f"Fitted {record.true_name} reward gain over n = 1 at the peak: {g.peak_gain:+.4g}. "
        f"Fit R(d) = d(α − βd), d = √KL: α = {g.true_alpha:.4g}, β = {g.true_beta:.4g}, R² = {g.true_r2:.3f}. "
        f"Measured KL: 0 to {float(np.nanmax(c.kl)):.4g} nats."
    )


def alerts_text(record: EvalRecord) -> str:
    """The Markdown text of the alert onsets and clears at the record's step (Text tab).

    >>> from bon_tracker.core import Alert, bon_curve
    >>> alert = Alert(7, "goodhart_kl", "At step 7 the policy's KL reached 2 nats.", 2.0, 1.5, 0)
    >>> alerts_text(EvalRecord.build(7, bon_curve(np.eye(4), np.eye(4), ns=[1, 4]), alerts=[alert]))
    "**Alert `goodhart_kl`** at step 7: At step 7 the policy's KL reached 2 nats."
    """
    lines = []
    for event in record.alerts:
        if event.kind == "onset":
            message = event.message.replace("*", "\\*")  # Markdown: n* and KL* are no emphasis
            lines.append(f"**Alert `{event.rule}`** at step {event.step}: {message}")
        else:
            lines.append(f"Alert `{event.rule}` cleared at step {event.step} (onset at step {event.onset_step}).")
    return "\n\n".join(lines)


def _held_message(log_dir: Path, lock_fd: int) -> str:
    holder = "another process"
    with contextlib.suppress(OSError, ValueError):
        holder = f"process {int(os.pread(lock_fd, 32, 0).decode().strip())}"
    return (
        f"the TensorBoard log dir {log_dir} is being written by {holder}; one writer per log dir: "
        "use another log_dir or run_name, or wait until that process has finished"
    )


def _png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return width, height


class TensorBoardBackend(Backend):
    """Writes eval records as TensorBoard event files into a log dir.

    Args:
        log_dir: the run's log dir. Pass a transformers ``Trainer``'s
            ``args.logging_dir`` (or a Lightning ``TensorBoardLogger.log_dir``) to put the
            curves into the trainer's own TensorBoard run. Default: ``runs/<run_name>``,
            or ``runs/<date-time>-bon`` without a run name.
        run_name: names the default log dir: one folder name (no path separator, not
            ``.`` or ``..``, at most 200 characters); a name whose folder is taken gets a
            folder of its own, ``runs/<run_name>-<suffix>``.
        charts: log the curve chart as an image per step (needs matplotlib).

    One process writes a log dir at a time (see the module docstring).

    Example:
        >>> backend = TensorBoardBackend(log_dir="/tmp/tb/demo")
        >>> backend.run_id is None, backend.spec()["log_dir"]
        (True, '/tmp/tb/demo')
    """

    name = "tensorboard"
    extra = "tensorboard"

    def __init__(
        self, *, log_dir: str | os.PathLike[str] | None = None, run_name: str | None = None, charts: bool = True
    ):
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(f"log_dir must be a path, got {log_dir!r}")
        if not isinstance(charts, bool):
            raise ValueError(f"charts must be true or false, got {charts!r}")
        self.run_name = check_run_name(run_name)
        self._log_dir = None if log_dir is None else Path(log_dir)
        self.charts = charts
        self._opened = False  # the log dir was opened (run_id is known from then on)
        self._held = False  # this backend holds the log dir now: its lock taken, its step files read
        self._lock_fd: int | None = None  # the log dir's lock, held from the first record until finish
        self._claim = threading.Lock()  # the default log dir is claimed once, by whichever thread asks first
        self._written: set[tuple[str, int]] = set()  # (prefix slug, step) of the step files in the log dir
        self._layout: dict[str, Any] = {}  # key prefix -> its custom-scalars category
        self._warned_no_charts = False

    # ---- identity ----------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        """The log dir written to. The default one is claimed on first use (here, or by
        :meth:`spec` when the first record is queued): a new folder ``runs/<run_name>``
        (``runs/<run_name>-<suffix>`` when that is taken), locked by this process, so that
        the spec a replay rebuilds this backend from names this run's folder and no other."""
        with self._claim:
            if self._log_dir is None:
                self._log_dir = self._claim_default_log_dir()
            return self._log_dir

    def _claim_default_log_dir(self) -> Path:
        root = Path(DEFAULT_ROOT).absolute()
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", self.run_name) if self.run_name else time.strftime("%Y%m%d-%H%M%S-bon")
        root.mkdir(parents=True, exist_ok=True)
        name = base
        while True:  # mkdir is atomic: of two processes claiming the same name, one gets a new folder
            try:
                (root / name).mkdir()
                break
            except FileExistsError:
                name = f"{base}-{uuid.uuid4().hex[:6]}"
        try:
            self._lock(root / name)  # a folder just made: nobody else holds it
        except BaseException:  # the disk refused the lock file: the next attempt claims the name again
            with contextlib.suppress(OSError):
                (root / name / LOCK_FILE).unlink(missing_ok=True)
                (root / name).rmdir()
            raise
        return root / name

    @property
    def run_id(self) -> str | None:
        return str(self.log_dir.resolve()) if self._opened else None

    @property
    def location(self) -> str | None:
        if not self._opened:
            return None
        return (
            f"{self.log_dir.resolve()} (view: tensorboard --logdir {self.log_dir.resolve().parent}, "
            f"then {tensorboard_url()} or {tensorboard_url(page='custom_scalars')})"
        )

    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"backend": self.name, "log_dir": str(self.log_dir.resolve())}
        if not self.charts:
            spec["charts"] = False
        return spec

    def check(self) -> None:
        """Raise :class:`ConfigurationError` when tensorboard is missing, the log dir is a
        file, or another live process writes it. Claims nothing."""
        require("tensorboard", "tensorboard")
        log_dir = self._log_dir
        if log_dir is None:  # the default: a folder of its own under runs/, made on first use
            root = Path(DEFAULT_ROOT)
            if root.exists() and not root.is_dir():
                raise ConfigurationError(f"{root.absolute()} is a file: the default log dirs go into a folder there")
            return
        if log_dir.exists() and not log_dir.is_dir():
            raise ConfigurationError(f"log_dir {log_dir} is a file, not a directory")
        lock = log_dir / LOCK_FILE
        if self._lock_fd is not None or fcntl is None or not lock.exists():
            return
        try:
            fd = os.open(lock, os.O_RDONLY)
        except OSError:
            return  # unreadable: writing it will say why
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ConfigurationError(_held_message(log_dir, fd)) from None
        finally:
            os.close(fd)  # closing releases a lock taken just to look

    def classify(self, error: BaseException) -> str:
        """A log dir that cannot be written (permissions, read-only, a file in the way) is a
        configuration error; a full disk or other I/O failure is retried."""
        if isinstance(error, OSError) and error.errno in _CONFIG_ERRNOS:
            return "config"
        return classify_common(error)

    # ---- writing -------------------------------------------------------------------------
    def log_eval(self, record: EvalRecord) -> None:
        """Write the step's event file, unless the log dir already holds this step."""
        require("tensorboard", "tensorboard")
        log_dir = self._open()
        key = (_slug(record.key_prefix), record.step)
        if key in self._written:
            logger.debug("bon_tracker: %s already holds %s step %d; skipped", log_dir, record.key_prefix, record.step)
            return
        atomic_write_bytes(log_dir / step_file_name(record), self._event_bytes(record))
        self._written.add(key)

    def finish(self) -> None:
        """Let go of the log dir (its lock): another process may write it now."""
        self.release()

    def release(self) -> None:
        """Give back the log dir's lock; a later :meth:`log_eval` takes it again."""
        with self._claim:
            self._held = False
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _open(self) -> Path:
        log_dir = self.log_dir
        if not self._held:
            log_dir.mkdir(parents=True, exist_ok=True)
            with self._claim:
                self._lock(log_dir)
                for path in log_dir.iterdir():
                    match = _STEP_FILE.match(path.name)
                    if match:
                        self._written.add((match["slug"], int(match["step"])))
                    elif _TEMP_FILE.match(path.name):  # left by a writer that died mid-write; we hold the lock
                        with contextlib.suppress(OSError):
                            path.unlink()
                self._held = self._opened = True
        return log_dir

    def _lock(self, log_dir: Path) -> None:
        """Hold the log dir's lock while this backend writes it (one writer per log dir).
        The lock of a process that died is free: flock locks go with their process."""
        if self._lock_fd is not None or fcntl is None:
            return
        fd = os.open(log_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            message = _held_message(log_dir, fd)
            os.close(fd)
            raise ConfigurationError(message) from None
        with contextlib.suppress(OSError):  # the pid is for messages only; a full disk may refuse it
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _event_bytes(self, record: EvalRecord) -> bytes:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        buffer = io.BytesIO()
        writer = RecordWriter(buffer)
        header = event_pb2.Event(
            wall_time=record.timestamp,
            file_version="brain.Event:2",
            source_metadata=event_pb2.SourceMetadata(writer=FILE_MARK),
        )
        writer.write(header.SerializeToString())
        event = event_pb2.Event(wall_time=record.timestamp, step=record.step, summary=self._summary(record))
        writer.write(event.SerializeToString())
        return buffer.getvalue()

    def _summary(self, record: EvalRecord) -> Summary:
        from tensorboard.compat.proto.summary_pb2 import DataClass, Summary, SummaryMetadata
        from tensorboard.plugins.text.plugin_data_pb2 import TextPluginData
        from tensorboard.util import tensor_util

        pre = record.key_prefix
        summary = Summary()
        scalar_meta = SummaryMetadata(
            plugin_data=SummaryMetadata.PluginData(plugin_name="scalars"), data_class=DataClass.DATA_CLASS_SCALAR
        )

        def scalar(tag: str, value: float) -> None:
            summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(np.float32(value)), metadata=scalar_meta)

        def text(tag: str, content: str, plugin: str, plugin_content: bytes = b"") -> None:
            meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=plugin, content=plugin_content))
            summary.value.add(tag=tag, tensor=tensor_util.make_tensor_proto(np.array(content.encode())), metadata=meta)

        for tag, value in {**record.scalars(), **texts_tables.text_scalars(record)}.items():
            scalar(tag, value)
        tags = curve_tags(record)
        c = record.curve
        for series, means, ses in (("true", c.true_mean, c.true_se), ("proxy", c.proxy_mean, c.proxy_se)):
            for tag, mean, se in zip(tags[series], means.tolist(), ses.tolist(), strict=True):
                if tag is not None and np.isfinite(se):
                    scalar(se_tag(pre, tag, LOWER_SUFFIX), mean - se)
                    scalar(se_tag(pre, tag, UPPER_SUFFIX), mean + se)

        for chart, tag in (("compact", curve_image_key(pre)), ("curve", curve_image_key(pre) + FULL_CHART_SUFFIX)):
            image = self._curve_png(record, chart)
            if image is not None:
                width, height = _png_size(image)
                summary.value.add(
                    tag=tag, image=Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=image)
                )
        text_plugin = TextPluginData(version=0).SerializeToString()
        text(f"{pre}/{GOODHART_TEXT_KEY}", goodhart_text(record), "text", text_plugin)
        if record.alerts:
            text(f"{pre}/{ALERTS_TEXT_KEY}", alerts_text(record), "text", text_plugin)
        # The hack table and the selection rules' optima as markdown tables (Text tab), every cell
        # escaped; the frontier chart as an image beside the curve's.
        if record.hacks is not None:
            text(f"{pre}/{texts_tables.HACKS_TABLE}", texts_tables.hacks_markdown(record), "text", text_plugin)
        if record.selection is not None:
            markdown = selection_tables.selection_markdown(record)
            text(f"{pre}/{selection_tables.SELECTION_TABLE}", markdown, "text", text_plugin)
            image = self._frontier_png(record)
            if image is not None:
                width, height = _png_size(image)
                summary.value.add(
                    tag=selection_tables.frontier_image_key(pre),
                    image=Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=image),
                )
        record_json = json.dumps(record.to_json(), allow_nan=True, separators=(",", ":"))
        text(f"{pre}/{RECORD_KEY}", record_json, RECORD_PLUGIN)

        self._layout[pre] = self._category(record, tags)
        layout = self._layout_proto()
        layout_meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="custom_scalars"))
        summary.value.add(
            tag=CUSTOM_SCALARS_TAG,
            tensor=tensor_util.make_tensor_proto(np.array(layout.SerializeToString())),
            metadata=layout_meta,
        )
        return summary

    @staticmethod
    def _category(record: EvalRecord, tags: dict[str, list[str | None]]) -> list[Any]:
        """The Custom Scalars categories of one key prefix: the Goodhart point, then the true
        and the proxy reward (one margin chart per n, n ascending), each on its own scale."""
        from tensorboard.plugins.custom_scalar import layout_pb2

        pre = record.key_prefix
        goodhart = [metric_key("goodhart", name, pre) for name in ("n", "n_low", "n_high")]
        categories = [
            layout_pb2.Category(
                title=f"{pre}: Goodhart point n* (95 % interval)",
                chart=[
                    layout_pb2.Chart(
                        title="n* of the fitted true reward, between the bounds of its 95 % interval",
                        margin=layout_pb2.MarginChartContent(
                            series=[
                                layout_pb2.MarginChartContent.Series(
                                    value=goodhart[0], lower=goodhart[1], upper=goodhart[2]
                                )
                            ]
                        ),
                    )
                ],
            )
        ]
        for name, reward in (("true", record.true_name), ("proxy", record.proxy_name)):
            label = name if reward == name else f"{reward} ({name})"  # "true", or "gold (true)"
            charts = []
            ns = record.curve.n.tolist()
            # n descending here: TensorBoard 2.21's Custom Scalars tab shows a category's charts in
            # the reverse of the layout's order, so the reader sees n ascending.
            for i in sorted(range(len(ns)), key=lambda k: ns[k], reverse=True):
                tag = tags[name][i]
                if tag is None:
                    continue
                series = layout_pb2.MarginChartContent.Series(
                    value=tag, lower=se_tag(pre, tag, LOWER_SUFFIX), upper=se_tag(pre, tag, UPPER_SUFFIX)
                )
                charts.append(
                    layout_pb2.Chart(
                        title=f"n = {ns[i]}: {label} reward ± 1 SE",
                        margin=layout_pb2.MarginChartContent(series=[series]),
                    )
                )
            categories.append(layout_pb2.Category(title=f"{pre}: {name} reward of best-of-n ± 1 SE", chart=charts))
        return categories

    def _layout_proto(self) -> Any:
        from tensorboard.plugins.custom_scalar import layout_pb2

        # Every prefix this backend wrote: TensorBoard keeps only a run's latest layout.
        return layout_pb2.Layout(category=[c for pre in sorted(self._layout) for c in self._layout[pre]])

    def _curve_png(self, record: EvalRecord, chart: str = "curve") -> bytes | None:
        if not self.charts:
            return None
        try:
            from bon_tracker.reports.render import render_png

            return render_png(chart, [record])  # drawn in the chart process: no GIL held here
        except MissingDependencyError as err:
            if not self._warned_no_charts:
                logger.warning("bon_tracker: no curve images in TensorBoard: %s", err)
                self._warned_no_charts = True
            return None

    def _frontier_png(self, record: EvalRecord) -> bytes | None:
        if not self.charts:
            return None
        try:
            from bon_tracker.reports.selection_charts import frontier_png

            return frontier_png(record)
        except MissingDependencyError as err:
            if not self._warned_no_charts:
                logger.warning("bon_tracker: no frontier images in TensorBoard: %s", err)
                self._warned_no_charts = True
            return None

    # ---- reading -------------------------------------------------------------------------
    @classmethod
    def read_records(cls, ref: str, **options: Any) -> tuple[str, list[EvalRecord]]:
        """``(label, records)`` of the log dir ``ref``: the label is the folder's name, the
        records are those this backend wrote there, in step order.

        Raises:
            RunNotFoundError: ``ref`` is not a directory.
        """
        require("tensorboard", "tensorboard")
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        log_dir = Path(ref)
        if not log_dir.is_dir():
            raise RunNotFoundError(f"{ref}: no such TensorBoard log dir")
        records: dict[tuple[str, int], EvalRecord] = {}
        for path in sorted(p for p in log_dir.iterdir() if _STEP_FILE.match(p.name)):
            for event in LegacyEventFileLoader(str(path)).Load():
                for value in event.summary.value:
                    if value.metadata.plugin_data.plugin_name == RECORD_PLUGIN and value.tensor.string_val:
                        record = EvalRecord.from_json(json.loads(value.tensor.string_val[0]))
                        records[(record.key_prefix, record.step)] = record
        return log_dir.resolve().name, sorted(records.values(), key=lambda r: (r.step, r.key_prefix))

    @classmethod
    def claims(cls, ref: str) -> bool:
        """A directory holding event files written by this backend."""
        path = Path(ref)
        try:
            return path.is_dir() and any(_STEP_FILE.match(p.name) for p in path.iterdir())
        except OSError:
            return False
