"""BonTracker: scores in, best-of-n curves out to a tracking backend; training never waits.

``log_scores`` validates, computes the curve (on the calling thread: it is cheap), appends
the curve's record to the run's write-ahead log on local disk and returns. Two background
threads do the rest, in step order: the statistics worker
(:mod:`bon_tracker.tracking.statistics`) adds the Goodhart fit, its interval, predictions,
agreement and the alert rules to the record (the completed record supersedes the curve's in
the log), and the delivery worker (:mod:`bon_tracker.tracking.delivery`) delivers it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.backends import BACKENDS, Backend, make_backend
from bon_tracker.core import Alert, AlertRules, BonCurve, bon_curve_parts
from bon_tracker.core.curve import SortedScores, finite_curve_parts
from bon_tracker.core.uncertainty import BootstrapDraws
from bon_tracker.core.validation import NanPolicy, check_nan_policy, check_ns, paired_scores, plain_float64_matrices
from bon_tracker.files import atomic_write_text
from bon_tracker.record import EvalRecord
from bon_tracker.texts import HackStatistics, Texts, check_texts, hack_statistics
from bon_tracker.tracking.alerting import (
    MAX_AGREEMENT_PROMPTS,
    AlertCallback,
    AlertReporter,
    agreement_rows,
    alert_rules,
    eval_statistics,
)
from bon_tracker.tracking.delivery import DEFAULT_MAX_MEMORY_RECORDS, Delivery, DeliveryStats
from bon_tracker.tracking.distributed import all_gather, rank_and_world_size
from bon_tracker.tracking.statistics import StatisticsWorker
from bon_tracker.tracking.wal import Entry, WriteAheadLog

logger = logging.getLogger("bon_tracker")

STATE_FILE = "bon_tracker_state.json"
MAX_STEP = 2**63  # steps are int64 in every tracking service
MAX_GRID = 4096  # points of the n grid: more says a mistake, and each costs a metric per service
DEFAULT_FINISH_TIMEOUT = 30.0
STATISTICS_WAIT = 60.0  # the longest a new eval waits for the statistics of the previous ones
# Each kind of bootstrap draw (the interval's indices, the predictions' counts) is kept between
# evals up to this size: counts of up to 10,000 prompts (200 resamples, 16 MB), indices of up to
# about 40,000; larger eval sets draw again at each eval (32 MiB at most kept per tracker).
KEPT_DRAW_BYTES = 16 << 20


def _rows(values: Any) -> list[np.ndarray] | np.ndarray:
    """Tensors (CPU or CUDA), arrays and lists -> a 2-D array or a list of 1-D rows."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        return _tensor_array(values)
    if isinstance(values, (list, tuple)):
        return [_tensor_array(v) if hasattr(v, "detach") else v for v in values]
    return values


def _tensor_array(tensor: Any) -> np.ndarray:
    if getattr(tensor, "is_complex", lambda: False)():
        raise TypeError(f"scores must be real numbers, got a complex tensor ({tensor.dtype})")
    return tensor.detach().cpu().double().numpy()  # also bfloat16, which numpy lacks


def check_step(step: Any) -> int:
    """A step is an integer in [0, 2**63)."""
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an integer, got {type(step).__name__}")
    step = int(step)
    if not 0 <= step < MAX_STEP:
        raise ValueError(f"step must be an integer from 0 to 2**63 - 1, got {step}")
    return step


def _check_policy_kl(policy_kl: Any) -> float | None:
    if policy_kl is None:
        return None
    if isinstance(policy_kl, (bool, complex)):
        raise TypeError(f"policy_kl must be a real number, got {type(policy_kl).__name__}")
    if hasattr(policy_kl, "item"):
        policy_kl = policy_kl.item()
    if isinstance(policy_kl, complex):
        raise TypeError("policy_kl must be a real number, got a complex value")
    try:
        value = float(policy_kl)
    except OverflowError:
        raise ValueError(f"policy_kl is too large for a float: {_short(policy_kl)}") from None
    except (TypeError, ValueError):
        raise TypeError(f"policy_kl must be a real number, got {type(policy_kl).__name__}") from None
    if not math.isfinite(value):
        raise ValueError(f"policy_kl must be finite, got {value!r}")
    return value


MAX_NAME = 200  # characters of a run, reward or prefix name: each ends up in keys, labels, paths
MAX_CONTEXT_TEXT = 1000  # characters of a string context value
MAX_CONTEXT_KEYS = 100


def check_name(value: Any, what: str, *, allow_slash: bool = True) -> str:
    """A name that ends up in metric keys, chart labels and folder names: a string of 1 to
    ``MAX_NAME`` characters, one line, no control characters."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} must not be empty")
    if len(value) > MAX_NAME:
        raise ValueError(f"{what} is {len(value)} characters long; at most {MAX_NAME} are allowed ({_short(value)})")
    bad = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        raise ValueError(f"{what} must not contain control characters (found {bad!r} in {_short(value)})")
    if not allow_slash and ("/" in value or "\\" in value or value in (".", "..")):
        raise ValueError(f"{what} must not contain '/' or '\\' or be '.' or '..', got {_short(value)}")
    return value


def check_context(context: Mapping[str, Any], step: int) -> dict[str, Any]:
    """The extras of one ``log_scores`` call as plain JSON values: finite real numbers
    (numpy scalars and one-element tensors included), bools, None and bounded strings."""
    if len(context) > MAX_CONTEXT_KEYS:
        raise ValueError(f"log_scores at step {step}: {len(context)} context values; at most {MAX_CONTEXT_KEYS}")
    out: dict[str, Any] = {}
    for key, value in context.items():
        check_name(key, f"log_scores at step {step}: the context key {_short(key)}")
        where = f"log_scores at step {step}: context value {key}"
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            try:
                value = value.item()
            except (ValueError, RuntimeError):
                raise ValueError(
                    f"{where} must be a single number, got an array of shape {tuple(getattr(value, 'shape', ()))}"
                ) from None
        if value is None or isinstance(value, bool):
            out[key] = value
        elif isinstance(value, str):
            if len(value) > MAX_CONTEXT_TEXT:
                raise ValueError(f"{where} is a string of {len(value)} characters; at most {MAX_CONTEXT_TEXT}")
            out[key] = value
        elif isinstance(value, (int, float)):
            try:
                as_float = float(value)
            except OverflowError:
                raise ValueError(f"{where} is too large for a float: {_short(value)}") from None
            if not math.isfinite(as_float):
                raise ValueError(f"{where} must be finite, got {as_float!r}")
            out[key] = value if isinstance(value, int) else as_float
        else:
            raise TypeError(f"{where} must be a number, a bool, None or a string, got {type(value).__name__}")
    return out


class BonTracker:
    """Computes best-of-n curves at each eval step and logs them to one backend.

    Every setting that is not given comes from the environment (``BON_TRACKER_*``), then
    ``bon_tracker.yaml`` (or ``$BON_TRACKER_CONFIG``), then the default below: the same
    precedence as :func:`~bon_tracker.tracking.config.tracker_from_config` and the CLI.

    Args:
        backend: a registered backend name (``"local"``, the default: a run folder;
            ``"mlflow"``, ``"wandb"``, ...) or a :class:`~bon_tracker.backends.Backend`.
        ns: the best-of-n grid; default powers of two up to N, plus N.
        run_name: a name for the run the backend opens.
        key_prefix: prefix of every metric key (default ``bon``).
        nan_policy: ``"raise"`` (default) or ``"omit"`` non-finite samples.
        proxy_name, true_name: names of the two rewards, for chart labels.
        spool_dir: the folder of the write-ahead log (default ``$BON_TRACKER_SPOOL_DIR``
            or ``~/.cache/bon_tracker/spool``).
        resume: a saved tracker state (:meth:`state`), or a folder or file holding one
            (:meth:`save_state`): continue that tracking run and skip steps it already logged.
        finish_timeout: seconds :meth:`finish` waits for delivery by default.
        backoff_max: longest wait, in seconds, between retries during an outage.
        max_memory_records: records held in memory when the disk refuses the log.
        alerts: the alert rules (:class:`~bon_tracker.core.AlertRules`, or a mapping of its
            settings); default: every rule on; ``False``: no alerts (docs/alerts.md).
        selection: the selection statistics of every eval (docs/selection.md): every rule's
            best-of-n, soft best-of-n and Best-of-Poisson curves, their hedged optima and the
            reward-KL frontier, computed off the training thread (about 0.5 s per rule and true
            reward at 1,000 x 64); a mapping of settings (``rules``, ``lambdas``, ``mus``,
            ``uwo_lambda``, ``soft_n``, ``n_resamples``, ...) or True: on; ``False``: off.
            Default: on when the proxy has several members or ``true`` several rewards.
        selection_rule: with several proxy members, the rule whose pick is deployed: its curve is
            the one :meth:`log_scores` returns and logs as the plain curve (``mean``, ``worst``,
            ``uwo`` or a member's name).
        log_texts: keep the prompts and completions given to :meth:`log_scores` for the hack
            table (docs/texts.md); ``False``: no text leaves the process.
        redact: ``str -> str`` applied to every text before it is kept or leaves the process.
        hack_table: settings of the hack table (``k``, ``max_chars``, ``max_table_bytes``,
            ``features``, ``tokenizer``, ``regex``, ``max_feature_samples``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset, on the
            thread that logs: the alert rules run off the training thread, and their onsets
            are reported at the next call of :meth:`log_scores` (which first waits for the
            previous eval's statistics), :meth:`poll_alerts` (the trainer callbacks call it
            every training step), :meth:`wait`, :meth:`flush` or :meth:`finish`; exceptions
            in it are logged, not raised.
        **backend_options: passed to the backend (``root`` for local;
            ``tracking_uri``, ``experiment``, ``run_id`` for MLflow; ``project``,
            ``entity``, ``run`` for W&B).

    Delivery: a record is durable once :meth:`log_scores` returns (appended to the log
    with fsync); background threads complete it with its statistics and deliver it. A
    service that is down, frozen or slow costs training nothing; :meth:`finish` waits at
    most ``finish_timeout`` seconds and leaves the rest for ``bon-tracker sync``.

    Example:
        >>> import tempfile
        >>> with BonTracker("local", root=tempfile.mkdtemp(), run_name="demo") as tracker:
        ...     curve = tracker.log_scores(0, [[0.1, 0.5, 0.9, 0.3]], [[1.0, 0.0, 2.0, 0.5]])
        >>> curve.true_mean.round(3).tolist()
        [0.875, 1.083, 2.0]
    """

    def __init__(
        self,
        backend: str | Backend | None = None,
        *,
        ns: Any = None,
        run_name: str | None = None,
        key_prefix: str | None = None,
        nan_policy: NanPolicy | None = None,
        proxy_name: str | None = None,
        true_name: str | None = None,
        spool_dir: str | Path | None = None,
        resume: str | Path | Mapping[str, Any] | None = None,
        finish_timeout: float | None = None,
        backoff_max: float = 60.0,
        max_memory_records: int = DEFAULT_MAX_MEMORY_RECORDS,
        alerts: AlertRules | Mapping[str, Any] | bool | None = None,
        on_alert: AlertCallback | None = None,
        selection: Mapping[str, Any] | bool | None = None,
        selection_rule: str = "mean",
        log_texts: bool = True,
        redact: Callable[[str], str] | None = None,
        hack_table: Mapping[str, Any] | None = None,
        **backend_options: Any,
    ):
        # What is not given comes from the environment, then bon_tracker.yaml, then the
        # defaults: one precedence rule for every entry point (docs: Configuration).
        from bon_tracker.tracking.config import resolve_config, unknown_backend_options

        config = resolve_config(backend=backend if isinstance(backend, str) and backend in BACKENDS else None)
        if backend is None:
            backend = config.backend
        if isinstance(backend, str) and backend in BACKENDS:
            unknown_backend_options(backend, backend_options)  # `run_nme=`: did you mean 'run_name'?
            configured = config.backend_options(backend)
            run_name = run_name if run_name is not None else configured.pop("run_name", None)
            configured.pop("run_name", None)
            backend_options = {**configured, **backend_options}
        elif run_name is None:
            run_name = config.run_name
        ns = ns if ns is not None else (None if config.ns is None else list(config.ns))
        key_prefix = key_prefix if key_prefix is not None else config.key_prefix
        nan_policy = nan_policy if nan_policy is not None else config.nan_policy  # type: ignore[assignment]
        proxy_name = proxy_name if proxy_name is not None else config.proxy_name
        true_name = true_name if true_name is not None else config.true_name
        spool_dir = spool_dir if spool_dir is not None else config.spool_dir
        finish_timeout = finish_timeout if finish_timeout is not None else config.finish_timeout
        if alerts is None:
            alerts = config.alerts
        check_nan_policy(nan_policy)
        if not isinstance(key_prefix, str) or not key_prefix.strip("/"):
            raise ValueError(f"key_prefix must be a non-empty string, got {key_prefix!r:.60}")
        check_name(key_prefix, "key_prefix")
        check_name(proxy_name, "proxy_name")
        check_name(true_name, "true_name")
        if run_name is not None:
            check_name(run_name, "run_name")
        if not (isinstance(finish_timeout, (int, float)) and finish_timeout >= 0):
            raise ValueError(f"finish_timeout must be a number of seconds >= 0, got {finish_timeout!r:.60}")
        if isinstance(max_memory_records, bool) or not isinstance(max_memory_records, int) or max_memory_records < 0:
            raise ValueError(f"max_memory_records must be an integer >= 0, got {max_memory_records!r:.60}")
        self.ns = None if ns is None else _checked_grid(ns)
        self.key_prefix = key_prefix.strip("/")
        self.nan_policy = nan_policy
        self.proxy_name, self.true_name = str(proxy_name), str(true_name)
        self.finish_timeout = float(finish_timeout)
        self.last_step: int | None = None
        self._history: list[EvalRecord] = []
        self._statistics_worker = StatisticsWorker()
        self._copies = ScoreCopies()  # buffers of the scores the worker reads, reused eval to eval
        # The interval's and predictions' bootstrap draws (seed 0), the same for every eval of one
        # size: drawn once (at 1,000 x 64 they were 7.8 of the worker's 10.6 ms per eval).
        self._draws = BootstrapDraws(max_bytes=KEPT_DRAW_BYTES)
        self._state_lock = threading.Lock()  # history, alert monitor and unreported events, shared with the worker
        self._report_lock = threading.RLock()  # alert onsets are reported once, in order (on_alert may log)
        self._unreported: list = []  # alert events the worker found, not yet reported
        self._waiting: dict[int, _StatisticsJob] = {}  # seq -> job not finished yet
        self._closed = False
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self._backoff_max = float(backoff_max)
        self._max_memory_records = max_memory_records
        self._resumed_wal: str | None = None
        self._wal: WriteAheadLog | None = None
        self._delivery: Delivery | None = None
        self._next_seq = 0
        self._warned_disk = False
        self._log_lock = threading.RLock()  # log_scores from any thread: one record at a time, in order
        self._release_lock = threading.Lock()
        self._released = False
        rules = alert_rules(alerts)
        self._alerts = AlertReporter(rules, on_alert) if rules is not None else None
        self._true_alerts: dict[str, AlertReporter] = {}  # the deployed rule under each further true reward
        self._selection = _selection_settings(selection)
        self._selection_auto = selection is None
        self.selection_rule = _check_rule_name(selection_rule)
        if not isinstance(log_texts, bool):
            raise TypeError(f"log_texts must be True or False, got {log_texts!r:.60}")
        if redact is not None and not callable(redact):
            raise TypeError(f"redact must be a callable str -> str, got {type(redact).__name__}")
        self.log_texts = log_texts
        self._hack_options = _hack_settings(hack_table, redact)

        if resume is not None:
            state = dict(resume) if isinstance(resume, Mapping) else self.load_state(resume)
            if state is not None:
                if isinstance(backend, str) and backend != state["backend"]["backend"]:
                    raise ValueError(
                        f"resume state at {resume} is for backend {state['backend']['backend']!r}, not {backend!r}"
                    )
                backend_options = {**{k: v for k, v in state["backend"].items() if k != "backend"}, **backend_options}
                self.last_step = state.get("last_step")
                self._resumed_wal = state.get("wal") or state.get("spool")
                if self._alerts is not None and state.get("alerts") is not None:
                    self._alerts.load_state_dict(state["alerts"])
                for name, saved in (state.get("alerts_by_true") or {}).items() if self._alerts else ():
                    self._true_alerts[name] = AlertReporter(self._alerts.rules)
                    self._true_alerts[name].load_state_dict(saved)

        if isinstance(backend, Backend):
            self._backend: Backend = backend
        elif isinstance(backend, str):
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r:.60}: choose one of {', '.join(sorted(BACKENDS))}")
            if run_name is not None:
                backend_options["run_name"] = run_name
            self._backend = make_backend(backend, **backend_options)  # touches nothing: no file, no network
        else:
            raise TypeError(f"backend must be a name or a Backend instance, got {type(backend).__name__}")
        self._backend_name = self._backend.name
        self._checked = False
        if self.is_writer:
            self._check_backend()

    # ---- public API -------------------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's rank (read when used: distributed may start after the tracker)."""
        return rank_and_world_size()[0]

    @property
    def world_size(self) -> int:
        return rank_and_world_size()[1]

    @property
    def is_writer(self) -> bool:
        """Only rank 0 of a multi-process run logs anything."""
        return self.rank == 0

    @property
    def backend(self) -> Backend:
        """The backend records are delivered to (written by the delivery thread only)."""
        return self._backend

    @property
    def wal_path(self) -> Path | None:
        """The write-ahead log of this tracker (None before the first record)."""
        return None if self._wal is None else self._wal.path

    @property
    def pending(self) -> int:
        """Records logged but not yet delivered (also those whose statistics are being computed)."""
        with self._state_lock:
            waiting = len(self._waiting)
        return waiting + (0 if self._delivery is None else self._delivery.pending)

    @property
    def history(self) -> list[EvalRecord]:
        """Every record logged by this tracker, in order, with its statistics (waits for
        those still being computed, at most ``finish_timeout`` seconds)."""
        self.wait()
        return self._history

    def wait(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds, default ``finish_timeout``) until the statistics
        and alert rules of every eval logged so far are computed, and report their alerts
        (warnings, :attr:`alerts`, ``on_alert``). True when none is left; never waits for the
        tracking service (:meth:`flush` does)."""
        done = self._statistics_worker.wait(self.finish_timeout if timeout is None else timeout)
        self._report_alerts()
        return done

    def poll_alerts(self) -> list[Alert]:
        """Report the alerts found since the last call (never waits) and return every onset so far."""
        self._report_alerts()
        return [] if self._alerts is None else list(self._alerts.alerts)

    @property
    def alerts(self) -> list[Alert]:
        """Every alert onset so far (this run, including before a resume), oldest first."""
        self.wait()
        return [] if self._alerts is None else list(self._alerts.alerts)

    @property
    def delivery_stats(self) -> DeliveryStats:
        """Delivered, dead-lettered and dropped counts, and the last delivery error."""
        return DeliveryStats() if self._delivery is None else self._delivery.stats

    def log_scores(
        self,
        step: int,
        proxy: Any,
        true: Any,
        *,
        policy_kl: float | None = None,
        prompts: Any = None,
        completions: Any = None,
        **context: Any,
    ) -> BonCurve | None:
        """Compute best-of-n curves from this eval step's samples and log them at ``step``.

        Args:
            step: the training step, an integer in [0, 2**63); steps must increase.
            proxy: proxy scores, ``(P, N)`` or a ragged list of per-prompt rows
                (arrays, lists or tensors on any device); or several reward models' scores
                per sample (an ensemble): ``{member_name: (P, N)}`` or a ``(K, P, N)`` array,
                selected by ``selection_rule`` (docs/selection.md).
            true: true scores, same shape; or several true rewards ``{name: (P, N)}`` (the
                first is the one the returned curve and the alerts use; every one is in
                the selection statistics).
            policy_kl: the trained policy's KL to its reference policy at this step,
                if known; recorded with the policy's own mean scores (n = 1).
            prompts, completions: the texts behind the scores (``P`` prompts, and a row of
                completions per prompt as long as its row of scores), for the hack table
                (docs/texts.md); kept only with ``log_texts=True``, after ``redact``.
            **context: extras of this eval: numbers are logged as scalars
                (``{prefix}/context/<key>``); strings (at most 1,000 characters), bools and
                None are kept in the eval record (its JSON in every backend), not charted.

        Returns:
            The :class:`BonCurve` on rank 0 (None on other ranks, and when ``step`` is
            not after the last logged step).

        Raises only for bad input (``TypeError``/``ValueError`` naming what is wrong). In
        a multi-process run every rank calls this with its own prompts; rank 0 gathers
        all of them. A tracking service that fails, hangs or is slow is never waited for.
        """
        with self._log_lock:
            return self._log_scores(step, proxy, true, policy_kl, context, (prompts, completions))

    def _log_scores(
        self, step: Any, proxy: Any, true: Any, policy_kl: Any, context: dict[str, Any], texts: tuple
    ) -> BonCurve | None:
        if self._closed:
            raise RuntimeError("this tracker is finished; create a new BonTracker to log more")
        step = check_step(step)
        policy_kl = _check_policy_kl(policy_kl)
        context = check_context(context, step)

        # One process with two float64 matrices: their finiteness is checked by the curve's own
        # pass (finite_curve_parts), not by a pass of its own first; all else is validated here.
        world_size = self.world_size
        unchecked = world_size == 1 and plain_float64_matrices(proxy, true)
        gathered = None  # one process, two float64 matrices, no texts: nothing more to check here
        if not (unchecked and texts[0] is None and texts[1] is None):
            local = self._validated_local(proxy, true, texts, finite_checked=not unchecked)
            gathered = all_gather(local)
            _raise_invalid(gathered, step, world_size)
        if not self.is_writer:
            return None
        if not self._is_new_step(step):
            return None  # checked before computing, so a replayed step costs nothing

        parts = None
        if unchecked:
            # The worker reads these scores for the agreement only: the curve's ranker lends it its
            # sorted copy where it made one (one block, no tie in the proxy) instead of a new copy.
            lend = not self._selection_reads_scores(_NO_EXTRAS) and proxy.shape[0] <= MAX_AGREEMENT_PROMPTS
            parts = finite_curve_parts(proxy, true, ns=self._grid({proxy.shape[1]}), lend_sorted=lend)
            if parts is None:  # a NaN or inf: validated in full, for its error or nan_policy="omit"
                gathered = [self._validated_local(proxy, true, texts)]
                _raise_invalid(gathered, step, world_size)
        if gathered is None:
            rows_p, rows_t, lengths, extras = proxy, true, {proxy.shape[1]}, _NO_EXTRAS
        else:
            rows_p, lengths = _joined([item[1] for item in gathered])
            rows_t, _ = _joined([item[2] for item in gathered])
            if not lengths:
                raise ValueError(f"log_scores at step {step}: no rank passed any scores")
            extras = _EvalExtras.joined([item[3] for item in gathered])
        if parts is None:
            # The curve and its per-prompt estimates from one sort: the interval and predictions
            # (statistics worker) use the estimates, so no second sort is ever needed.
            parts = bon_curve_parts(rows_p, rows_t, ns=self._grid(lengths), nan_policy=self.nan_policy)
        curve = parts.curve
        _check_finite_curve(curve, step)
        record = EvalRecord.build(
            step,
            curve,
            policy_kl=policy_kl,
            context=context,
            key_prefix=self.key_prefix,
            proxy_name=self.proxy_name,
            true_name=self.true_name,
            fit=False,  # the fit and every other statistic: off this thread (_complete_eval)
        )

        worker_p, worker_t, release = self._worker_scores(rows_p, rows_t, proxy, true, extras, parts.sorted)

        def complete(curve_only: EvalRecord) -> tuple[EvalRecord, list]:
            per_prompt = (parts.true, parts.proxy)
            try:
                return self._complete_eval(curve_only, worker_p, worker_t, policy_kl, extras, per_prompt)
            finally:
                release()  # nothing of the statistics keeps a view of the scores

        self._log(record, complete)
        return curve

    def _worker_scores(
        self, p: Any, t: Any, given_p: Any, given_t: Any, extras: _EvalExtras, lent: SortedScores | None = None
    ) -> tuple[Any, Any, Callable[[], None]]:
        """The scores the statistics worker reads after log_scores returned, where the caller
        cannot change them: all of them when the selection statistics need them, else (dense
        input past ``MAX_AGREEMENT_PROMPTS`` prompts) only the agreement's prompts; the interval
        and predictions use the per-prompt estimates of the curve's own sort. ``lent``: the
        curve's own sorted copy (lent only when the worker reads the scores for the agreement
        alone), read instead of a copy. Third: what gives back the buffers once the worker is done."""
        if lent is not None:
            # Best first, as topq_agreement orders them: the very arrays it sorts the input into
            # (no prompt has a tie in the proxy), so the agreement is the same, bit for bit.
            return lent.proxy[:, ::-1], lent.true[:, ::-1], lent.give_back
        selection = self._selection_reads_scores(extras)
        if not selection and isinstance(p, np.ndarray) and p.shape[0] > MAX_AGREEMENT_PROMPTS:
            rows = agreement_rows(p.shape[0])
            return p[rows], t[rows], _nothing  # fancy indexing copies
        if selection or not isinstance(p, np.ndarray):
            return _private(p, given_p), _private(t, given_t), _nothing
        pooled: list[np.ndarray] = []
        worker = []
        for scores, given in ((p, given_p), (t, given_t)):
            if scores.flags.owndata and scores is not given:
                worker.append(scores)  # validation made it: nobody else holds it
            else:
                worker.append(self._copies.copy(scores))
                pooled.append(worker[-1])
        return worker[0], worker[1], lambda: self._copies.give_back(pooled)

    def _selection_reads_scores(self, extras: _EvalExtras) -> bool:
        """The selection statistics run on this eval (so the worker reads all of its scores)."""
        return self._selection is not None and not (self._selection_auto and extras.selection is None)

    def log_record(self, record: EvalRecord) -> bool:
        """Log an already computed :class:`EvalRecord` (e.g. built from a score file).

        Same guarantees as :meth:`log_scores`; returns False when the step is skipped
        (not after the last logged step, or not rank 0).
        """
        with self._log_lock:
            if self._closed:
                raise RuntimeError("this tracker is finished; create a new BonTracker to log more")
            check_step(record.step)
            if not self.is_writer or not self._is_new_step(record.step):
                return False
            # Built elsewhere (a score file): the alert rules still run, off this thread.
            needs_alerts = record.alert_states is None and self._alerts is not None
            self._log(record, self._alerted if needs_alerts else None)
            return True

    def _log(self, record: EvalRecord, complete: Any) -> None:
        """Append ``record`` to the log (this thread), then let the statistics worker complete
        it with ``complete(record) -> (record, alert events)`` and hand it to delivery."""
        entry = self._append(record)
        with self._state_lock:
            job = _StatisticsJob(self, entry, len(self._history), complete)
            self._history.append(record)
            self._waiting[entry.seq] = job
        self.last_step = record.step
        # At most one eval's statistics wait: the previous ones finish first (usually long ago).
        if not self._statistics_worker.wait(STATISTICS_WAIT):
            logger.warning(
                "bon_tracker: the statistics of an earlier eval took more than %.0f s; step %d queued behind them",
                STATISTICS_WAIT,
                record.step,
            )
        self._report_alerts()
        self._statistics_worker.submit(job)

    def _complete_eval(
        self,
        record: EvalRecord,
        proxy: Any,
        true: Any,
        policy_kl: float | None,
        extras: _EvalExtras,
        per_prompt: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[EvalRecord, list]:
        """The curve's record with its Goodhart fit, interval, agreement, predictions, selection
        statistics, hack table and alerts (statistics worker). A failure in them is reported and
        the curve is delivered without them."""
        record = dataclasses.replace(
            record,
            selection=self._selection_of(record.step, proxy, true, extras),
            hacks=self._hacks_of(record.step, extras),
        )
        try:
            stats = eval_statistics(proxy, true, record.curve, per_prompt, draws=self._draws)
            record = dataclasses.replace(
                record,
                goodhart=EvalRecord.fit_goodhart(record.curve),
                interval=stats.interval,
                agreement=stats.agreement,
                predictions=stats.predictions,
            )
        except Exception as err:  # never the reason a training run crashes
            logger.warning(
                "bon_tracker: the Goodhart fit, interval and agreement statistics failed at step %d (%s: %s); "
                "the curve is logged without them",
                record.step,
                type(err).__name__,
                err,
            )
            return record, []
        return self._alerted(record) if self._alerts is not None else (record, [])

    def _selection_of(self, step: int, proxy: Any, true: Any, extras: _EvalExtras) -> Any:
        """Every selection rule's statistics (docs/selection.md), or None (off, or they failed)."""
        if self._selection is None or (self._selection_auto and extras.selection is None):
            return None  # by default only for several members or true rewards (about 0.5-2 s per eval)
        from bon_tracker.core.selection import selection_input
        from bon_tracker.core.selection_stats import compute_selection_statistics

        try:
            inp = (
                extras.selection
                if extras.selection is not None
                else selection_input({self.proxy_name: proxy}, {self.true_name: true})
            )
            return compute_selection_statistics(inp, **self._selection)
        except Exception as err:  # an addition to the curve: never the reason it is not logged
            logger.warning(
                "bon_tracker: the selection statistics failed at step %d (%s: %s)", step, type(err).__name__, err
            )
            return None

    def _hacks_of(self, step: int, extras: _EvalExtras) -> HackStatistics | None:
        """The hack table and text features, or None (no texts, or they failed)."""
        if extras.texts is None:
            return None
        try:
            return hack_statistics(extras.hack_proxy, extras.hack_true, extras.texts, **self._hack_options)
        except Exception as err:
            logger.warning("bon_tracker: the hack table failed at step %d (%s: %s)", step, type(err).__name__, err)
            return None

    def _finish_job(self, job: _StatisticsJob) -> None:
        """Statistics worker: complete the job's record, log it over the curve's, deliver it."""
        entry, events = job.entry, []
        assert self._wal is not None
        if entry.persisted:
            try:
                self._wal.sync()  # the curve's line, written on the training thread
            except OSError as err:
                logger.warning("bon_tracker: cannot fsync the write-ahead log %s: %s", self._wal.path, err)
        if job.complete is not None:
            try:
                record, events = job.complete(entry.record)
            except Exception as err:  # a job never raises
                logger.warning("bon_tracker: completing the record of step %s failed: %s", entry.record.step, err)
                record = entry.record
            if record is not entry.record:
                done = Entry(seq=entry.seq, record=record, persisted=entry.persisted)
                try:
                    self._wal.append(done)  # same seq: supersedes the curve's line when the log is read
                    done.persisted = True
                except OSError:
                    pass  # the curve's line (if the disk took it) is what a crash would replay
                entry = done
        with self._state_lock:
            if self._waiting.pop(entry.seq, None) is None:
                return  # finish() gave up waiting and delivered the curve's record
            self._history[job.index] = entry.record
            self._unreported.extend(events)
        assert self._delivery is not None
        self._delivery.submit(entry)

    def _alerts_by_true(self, record: EvalRecord, kl: float | None) -> tuple[list, dict[str, int]]:
        """The alert rules on the deployed rule under each further true reward (selection statistics)."""
        stats = record.selection
        if stats is None or self._alerts is None:
            return [], {}
        from bon_tracker.tracking.selection import alerts_by_true

        deployed = self.selection_rule if len(stats.member_names) > 1 else stats.member_names[0]
        return alerts_by_true(stats, record.step, deployed, self._alerts.rules, self._true_alerts, policy_kl=kl)

    def _report_alerts(self) -> None:
        """Warnings, :attr:`alerts` and ``on_alert`` for what the worker found, on this thread."""
        if self._alerts is None:
            return
        with self._report_lock:
            with self._state_lock:
                events, self._unreported = self._unreported, []
            if events:
                self._alerts.report(events)

    def _alerted(self, record: EvalRecord) -> tuple[EvalRecord, list]:
        """The record with this tracker's alert events and states at its step (the rules that
        need the interval only fire when the record carries one)."""
        assert self._alerts is not None
        try:
            kl = None if record.policy is None else record.policy.kl
            with self._state_lock:
                events, states = self._alerts.update(record.step, record.curve, kl, record.interval)
                more, more_states = self._alerts_by_true(record, kl)
            events, states = [*events, *more], {**states, **more_states}
        except Exception as err:  # never the reason a training run crashes
            name = type(err).__name__
            logger.warning("bon_tracker: the alert rules failed at step %d (%s: %s)", record.step, name, err)
            return record, []
        return dataclasses.replace(record, alerts=tuple(events), alert_states=states), list(events)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (default ``finish_timeout``) until every record
        logged so far is completed (:meth:`wait`) and delivered; True when nothing is pending."""
        timeout = self.finish_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        self.wait(timeout)
        if self._delivery is None:
            return True
        return self._delivery.drain(max(deadline - time.monotonic(), 0.0)) and not self.pending

    def finish(self, timeout: float | None = None) -> None:
        """Deliver what is pending, waiting at most ``timeout`` seconds (default
        ``finish_timeout``), then close the backend. What is left stays in the write-ahead
        log, and the message says how to replay it (``bon-tracker sync``). Safe to call twice;
        never raises because of the service."""
        if self._closed:
            return
        self._closed = True
        _UNFINISHED.discard(self)
        if self._delivery is None or self._wal is None:
            return
        timeout = self.finish_timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        delivery, wal = self._delivery, self._wal
        self._finish_statistics(timeout)
        timeout = max(deadline - time.monotonic(), 0.0)
        if self._backend.completes_at_finish:
            self._complete_local(delivery, timeout)
        idle = delivery.close(timeout)
        left = [e for e in delivery.leftover() if e.record is not None]
        stats = delivery.stats
        if left or stats.config_error:
            self._append_finish_marker(wal)  # `bon-tracker sync` finishes the run once it delivered them
            self._report_left(left, stats, timeout, in_flight=not idle)
            # Every lock goes now, so the printed sync command works at once (also in this
            # process); a service call still in flight gives them back when it returns.
            delivery.on_exit = self._release_locks
            if idle or not delivery.running:
                self._release_locks()
        elif idle:
            # Closing the backend (W&B's run.finish, MLflow's run status) counts against the same timeout.
            finish_in = max(deadline - time.monotonic(), 0.5)
            if self._backend.completes_at_finish:
                finish_in = max(finish_in, 300.0)  # overview charts and the report: local files, never a network
            if self._finish_backend(finish_in):
                wal.remove()
                self._release_locks()
                self._announce(delivery)
            else:
                self._append_finish_marker(wal)
        if stats.dropped:
            logger.error(
                "bon_tracker: %d eval record(s) were lost (steps %s): the disk refused the write-ahead log %s "
                "while %s was unreachable",
                stats.dropped,
                stats.dropped_steps[:20],
                wal.path,
                self._backend_name,
            )

    def _finish_statistics(self, timeout: float) -> None:
        """Let the statistics worker complete what was logged (at most ``timeout`` seconds);
        records it did not get to are delivered as their curves (what the log holds)."""
        if not self._statistics_worker.wait(timeout):
            self._statistics_worker.take_pending()
            with self._state_lock:
                late, self._waiting = list(self._waiting.values()), {}
            logger.warning(
                "bon_tracker: the statistics of %d eval(s) were not done within %.0f s; their curves are "
                "delivered without them",
                len(late),
                timeout,
            )
            assert self._delivery is not None
            for job in sorted(late, key=lambda j: j.entry.seq):
                self._delivery.submit(job.entry)
        self._statistics_worker.close()
        self._report_alerts()

    def _complete_local(self, delivery: Delivery, timeout: float) -> None:
        """A backend that writes local files only (a run folder) is completed, however long
        its charts take, while each wait of ``timeout`` seconds delivers something."""
        said = False
        while True:
            before = delivery.stats.delivered + delivery.stats.dead_lettered
            if delivery.drain(max(timeout, 1.0)):
                return
            if delivery.stats.delivered + delivery.stats.dead_lettered == before:
                return  # no progress (a full disk): the rest waits in the log
            if not said:
                logger.warning(
                    "bon_tracker: completing the %s run (%d eval record(s) and their charts still to write; "
                    "charts=False skips the charts)",
                    self._backend_name,
                    delivery.pending,
                )
                said = True

    def _announce(self, delivery: Delivery) -> None:
        """One line naming where the run is, once it is complete."""
        try:
            where = self._backend.location
        except Exception:  # a link is a convenience, never an error
            where = None
        if where:
            steps = delivery.stats.delivered
            print(f"bon_tracker: {steps} eval step(s) logged to {where}", file=sys.stderr)

    def _release_locks(self) -> None:
        """Give back the log's lock and the backend's (a run folder's), once."""
        with self._release_lock:
            if self._released or self._wal is None:
                return
            self._released = True
            try:
                self._backend.release()
            except Exception as err:  # never raise on the way out
                logger.debug("bon_tracker: releasing the %s backend failed: %s", self._backend_name, err)
            self._wal.release()

    def __enter__(self) -> BonTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    # ---- resuming ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed process needs to continue this tracking run (and its log).

        Never waits for delivery: the backend's spec names the run (its id, or the
        client-chosen key a run is created with), and ``wal`` the log holding what is
        not delivered yet, which the resumed tracker adopts.
        """
        self.wait()  # the alert rules' state includes the last eval (computing, never delivering)
        with self._state_lock:
            alerts = None if self._alerts is None else self._alerts.state_dict()
            by_true = {name: reporter.state_dict() for name, reporter in self._true_alerts.items()}
        return {
            "backend": self._backend.spec(),
            "last_step": self.last_step,
            "wal": None if self._wal is None else str(self._wal.path),
            "alerts": alerts,
            **({"alerts_by_true": by_true} if by_true else {}),
        }

    def save_state(self, directory: str | Path) -> Path | None:
        """Write :meth:`state` to ``directory/bon_tracker_state.json`` (rank 0 only)."""
        if not self.is_writer:
            return None
        path = Path(directory) / STATE_FILE
        atomic_write_text(path, json.dumps(self.state(), indent=2))
        return path

    @staticmethod
    def load_state(path: str | Path) -> dict[str, Any] | None:
        """Read a saved state from a file or a folder holding ``bon_tracker_state.json``;
        None when there is none."""
        path = Path(path)
        if path.is_dir():
            path = path / STATE_FILE
        if not path.exists():
            return None
        return json.loads(path.read_text(encoding="utf-8"))

    # ---- internals -------------------------------------------------------------------------
    def _is_new_step(self, step: int) -> bool:
        if self.last_step is not None and step <= self.last_step:
            logger.warning("bon_tracker: step %d is not after the last logged step %d; skipped", step, self.last_step)
            return False
        return True

    def _grid(self, lengths: set[int]) -> list[int] | None:
        if self.ns is None:
            return None
        largest = max(lengths)
        too_big = [n for n in self.ns if n > largest]
        if too_big:
            raise ValueError(
                f"ns {_short(too_big)} exceed the number of samples per prompt ({largest}); lower them "
                "or sample more completions"
            )
        return self.ns

    def _validated_local(
        self, proxy: Any, true: Any, texts: tuple = (None, None), *, finite_checked: bool = True
    ) -> tuple:
        """This rank's scores as a 2-D array or a list of 1-D float rows (for an ensemble or
        several true rewards: the deployed rule's and the first true reward's), and the
        :class:`_EvalExtras`; or the reason they are bad. ``finite_checked`` False: two float64
        matrices of one shape (``plain_float64_matrices``) are returned unchecked for NaN/inf."""
        if not finite_checked:
            try:
                return ("ok", proxy, true, self._texts_extras(texts, proxy, true, proxy, true))
            except (TypeError, ValueError) as err:
                return ("error", str(err), "type" if isinstance(err, TypeError) else "value")
        try:
            if _is_selection(proxy) or isinstance(true, Mapping):
                return self._validated_selection(proxy, true, texts)
            proxy, true = _rows(proxy), _rows(true)
        except TypeError as err:
            return ("error", str(err), "type")
        except ValueError as err:
            return ("error", str(err), "value")
        if self.world_size > 1 and len(proxy) == 0 and len(true) == 0:
            return ("ok", [], [], _EvalExtras())  # a rank may get no eval prompts; the gathered whole is checked
        try:
            p, t, _ = paired_scores(proxy, true, nan_policy=self.nan_policy, names=("proxy", "true"))
            extras = self._texts_extras(texts, proxy, true, p, t)
        except (TypeError, ValueError) as err:
            return ("error", str(err), "type" if isinstance(err, TypeError) else "value")
        return ("ok", p, t, extras)  # a (P, N) array stays one (no copy here), ragged input stays rows

    def _validated_selection(self, proxy: Any, true: Any, texts: tuple) -> tuple:
        """Several proxy members or true rewards: checked together (core.selection), the deployed
        rule's scores and the first true reward's for the curve; everything for the worker."""
        from bon_tracker.core.selection import rule_scores, selection_input

        proxy = {k: _rows(v) for k, v in proxy.items()} if isinstance(proxy, Mapping) else _rows(proxy)
        true = {k: _rows(v) for k, v in true.items()} if isinstance(true, Mapping) else _rows(true)
        inp = selection_input(proxy, true, nan_policy=self.nan_policy)  # fresh arrays: nothing to copy
        names = inp.member_names
        rule = self.selection_rule if len(names) > 1 else names[0]
        if rule not in names and rule not in ("mean", "worst", "uwo"):
            raise ValueError(f"selection_rule {rule!r} is neither an ensemble rule nor a member ({', '.join(names)})")
        uwo = float(self._selection.get("uwo_lambda", 0.5)) if self._selection else 0.5
        p = rule_scores(inp, rule, uwo)
        t = inp.trues[0] if inp.dense else [row[0] for row in inp.trues]
        lengths = inp.sample_counts().tolist()
        extras = dataclasses.replace(self._texts_extras(texts, p, t, p, t, lengths), selection=inp)
        return ("ok", p, t, extras)

    def _texts_extras(
        self, texts: tuple, given_p: Any, given_t: Any, p: Any, t: Any, lengths: Any = None
    ) -> _EvalExtras:
        """The texts checked against the rows of scores as given (their copy for the worker)."""
        prompts, completions = texts
        if prompts is None and completions is None:
            return _EvalExtras()
        if prompts is None or completions is None:
            raise ValueError("pass both prompts= and completions= (or neither)")
        if lengths is None:
            lengths = (
                [len(row) for row in given_p]
                if not isinstance(given_p, np.ndarray) or given_p.ndim != 2
                else ([given_p.shape[1]] * given_p.shape[0])
            )
        checked = check_texts(prompts, completions, lengths)
        if not self.log_texts:
            return _EvalExtras()
        same = (
            [int(n) for n in lengths] == [p.shape[1]] * p.shape[0]
            if isinstance(p, np.ndarray)
            else [int(n) for n in lengths] == [len(row) for row in p]
        )
        if same:  # no sample omitted: the validated rows are the given ones
            return _EvalExtras(texts=checked, hack_proxy=_private(p, given_p), hack_true=_private(t, given_t))
        rows = (
            [np.array(row, dtype=np.float64) for row in given_p],
            [np.array(row, dtype=np.float64) for row in given_t],
        )
        return _EvalExtras(texts=checked, hack_proxy=rows[0], hack_true=rows[1])

    def _check_backend(self) -> None:
        """Configuration errors surface here (rank 0, at construction), not as a silent outage later."""
        self._backend.check()
        self._checked = True

    def _open_delivery(self) -> Delivery:
        """The log and its worker, made on the first record (rank 0 only)."""
        if self._delivery is not None:
            return self._delivery
        if not self._checked:
            self._check_backend()
        adopted: list[Entry] = []
        wal = None
        if self._resumed_wal and Path(self._resumed_wal).exists():
            candidate = WriteAheadLog(self._resumed_wal)
            if candidate.claim():  # what the process this one continues could not deliver
                wal, adopted = candidate, _adoptable(candidate)
        if wal is None:
            wal = WriteAheadLog.new(self._backend_name, self._spool_dir)
        self._wal = wal
        self._next_seq = wal.next_seq()
        self._delivery = Delivery(
            self._backend, wal, backoff_max=self._backoff_max, max_memory_records=self._max_memory_records
        )
        for entry in adopted:
            self._delivery.submit(entry)
        _finish_at_exit(self)
        return self._delivery

    def _append(self, record: EvalRecord) -> Entry:
        """Append the record to the log (fsync) and return its entry. A disk that refuses the
        log never raises here: the record is then held in memory (bounded) until delivered."""
        self._open_delivery()
        assert self._wal is not None
        try:
            self._backend.bind()  # thread-local context (an active run) is read on the caller's thread
            spec = self._backend.spec()
        except Exception as err:  # a backend's own bug must not reach training: the worker reports it
            logger.debug("bon_tracker: %s bind/spec failed: %s", self._backend_name, err)
            spec = None
        entry = Entry(seq=self._next_seq, record=record)
        self._next_seq += 1
        try:
            self._wal.claim()
            if spec is not None:
                self._wal.write_spec(spec)
            # Written on this thread (safe once log_scores returns, however the process dies);
            # the fsync (safe from a power loss too) follows on the statistics worker.
            self._wal.append(entry, sync=False)
            if self._warned_disk:
                logger.warning("bon_tracker: the write-ahead log %s is writable again", self._wal.path)
                self._warned_disk = False
        except OSError as err:
            entry.persisted = False
            if not self._warned_disk:
                logger.error(
                    "bon_tracker: cannot write the write-ahead log %s (%s); records are held in memory "
                    "(at most %d) until the disk takes them or they are delivered",
                    self._wal.path,
                    err,
                    self._max_memory_records,
                )
                self._warned_disk = True
        return entry

    def _finish_backend(self, timeout: float) -> bool:
        """Close the backend on the delivery side, bounded by ``timeout``; True if it returned."""
        done = threading.Event()

        def close() -> None:
            try:
                self._backend.finish()
            except Exception as err:  # never crash the user's program on the way out
                logger.warning("bon_tracker: closing the %s backend failed: %s", self._backend_name, err)
            finally:
                done.set()

        threading.Thread(target=close, name="bon_tracker-finish", daemon=True).start()
        if not done.wait(max(timeout, 1.0)):
            logger.warning(
                "bon_tracker: the %s backend did not close within %.0f s; left closing in the background",
                self._backend_name,
                timeout,
            )
            return False
        return True

    def _append_finish_marker(self, wal: WriteAheadLog) -> None:
        try:
            wal.append(Entry(seq=self._next_seq, finish=True))
            self._next_seq += 1
        except OSError:
            pass  # sync then delivers the records without ending the run

    def _report_left(self, left: list[Entry], stats: DeliveryStats, timeout: float, *, in_flight: bool) -> None:
        on_disk = [e for e in left if e.persisted]
        in_memory = len(left) - len(on_disk)
        assert self._wal is not None
        why = stats.config_error or stats.last_error or f"not delivered within {timeout:.0f} s"
        if in_flight and left and left[0].record is not None:
            # Counted here, it may still arrive; sync then skips it (its ack is in the log).
            why += f"; step {left[0].record.step} was being delivered and may still arrive"
        if on_disk or not left:
            logger.warning(
                "bon_tracker: %d eval record(s) did not reach %s (%s) and are kept in %s; "
                "replay them later with: bon-tracker sync %s",
                len(on_disk),
                self._backend_name,
                why,
                self._wal.path,
                self._wal.path,
            )
        if in_memory:
            logger.error(
                "bon_tracker: %d eval record(s) (steps %s) could neither reach %s nor be written to %s: lost",
                in_memory,
                [e.record.step for e in left if not e.persisted and e.record is not None][:20],
                self._backend_name,
                self._wal.path,
            )


@dataclasses.dataclass(frozen=True)
class _EvalExtras:
    """What an eval adds beside its curve's scores, for the statistics worker: the checked
    members and true rewards (several of either), the texts and the scores aligned with them."""

    selection: Any = None  # core.selection.SelectionInput
    texts: Texts | None = None
    hack_proxy: Any = None
    hack_true: Any = None

    @staticmethod
    def joined(parts: list[_EvalExtras]) -> _EvalExtras:
        """The ranks' extras as one (prompts in rank order)."""
        parts = [part for part in parts if part is not None]
        if len(parts) <= 1:
            return parts[0] if parts else _EvalExtras()
        from bon_tracker.core.selection import SelectionInput

        selection = None
        inputs = [part.selection for part in parts if part.selection is not None]
        if inputs:
            first = inputs[0]
            if all(i.dense for i in inputs) and len({i.members.shape[2] for i in inputs}) == 1:
                members = np.concatenate([i.members for i in inputs], axis=1)
                trues = np.concatenate([i.trues for i in inputs], axis=1)
            else:
                members = [row for i in inputs for row in (i.members if not i.dense else np.moveaxis(i.members, 1, 0))]
                trues = [row for i in inputs for row in (i.trues if not i.dense else np.moveaxis(i.trues, 1, 0))]
            selection = SelectionInput(first.member_names, first.true_names, members, trues)
        texts = hack_proxy = hack_true = None
        if all(part.texts is not None for part in parts):
            texts = Texts(
                tuple(p for part in parts for p in part.texts.prompts),  # type: ignore[union-attr]
                tuple(c for part in parts for c in part.texts.completions),  # type: ignore[union-attr]
            )
            hack_proxy = [row for part in parts for row in part.hack_proxy]
            hack_true = [row for part in parts for row in part.hack_true]
        return _EvalExtras(selection, texts, hack_proxy, hack_true)


_NO_EXTRAS = _EvalExtras()


def _nothing() -> None:
    """Nothing to give back (the worker's scores are its own)."""


def _is_selection(proxy: Any) -> bool:
    """Several proxy scores per sample: a mapping of members, or a (K, P, N) array or tensor."""
    return isinstance(proxy, Mapping) or getattr(proxy, "ndim", 0) == 3


def _check_rule_name(rule: Any) -> str:
    if not isinstance(rule, str) or not rule:
        raise TypeError(f"selection_rule must be a rule name (mean, worst, uwo or a member's name), got {rule!r:.60}")
    return rule


def _selection_settings(selection: Mapping[str, Any] | bool | None) -> dict[str, Any] | None:
    """``BonTracker(selection=...)``: None/True: defaults; False: off; a mapping: the settings of
    :func:`~bon_tracker.core.selection_stats.compute_selection_statistics` (checked by name)."""
    if selection is None or selection is True:
        return {}
    if selection is False:
        return None
    if not isinstance(selection, Mapping):
        raise TypeError(f"selection must be None, True, False or a mapping of settings, got {type(selection).__name__}")
    import inspect

    from bon_tracker.core.selection_stats import compute_selection_statistics

    known = set(inspect.signature(compute_selection_statistics).parameters) - {"inp"}
    unknown = sorted(set(selection) - known)
    if unknown:
        raise ValueError(f"selection: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    return dict(selection)


def _hack_settings(hack_table: Mapping[str, Any] | None, redact: Any) -> dict[str, Any]:
    """``BonTracker(hack_table=..., redact=...)`` as keyword arguments of ``hack_statistics`` (checked by name)."""
    import inspect

    options = dict(hack_table or {})
    if not isinstance(hack_table, (Mapping, type(None))):
        raise TypeError(f"hack_table must be a mapping of settings, got {type(hack_table).__name__}")
    known = set(inspect.signature(hack_statistics).parameters) - {"proxy_rows", "true_rows", "texts", "redact"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"hack_table: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
    if redact is not None:
        options["redact"] = redact
    return options


@dataclasses.dataclass
class _StatisticsJob:
    """One logged record for the statistics worker to complete (see :meth:`BonTracker._finish_job`)."""

    tracker: BonTracker
    entry: Entry  # the curve's record, as appended to the log
    index: int  # its place in the tracker's history
    complete: Any  # record -> (completed record, alert events); None: deliver as it is

    def __call__(self) -> None:
        self.tracker._finish_job(self)


def _adoptable(wal: WriteAheadLog) -> list[Entry]:
    """The records a resumed tracker takes over from its predecessor's log; damaged lines
    are set aside and reported, and nothing read from the log ever raises into training."""
    try:
        pending, bad = wal.pending_and_bad()
    except Exception as err:
        logger.error(
            "bon_tracker: cannot read the write-ahead log %s (%s); run: bon-tracker sync %s", wal.path, err, wal.path
        )
        return []
    for line in bad:
        logger.error(
            "bon_tracker: line %d of the write-ahead log %s is damaged (%s); set aside in %s, the rest is delivered",
            line.number,
            wal.path,
            line.reason,
            wal.bad_path,
        )
    with contextlib.suppress(OSError):
        wal.set_aside_bad_lines(bad)
    return [e for e in pending if e.record is not None]


# Trackers that a script may leave without finish(): delivered at interpreter exit. Held
# strongly (a tracker that went out of scope unfinished still has records to deliver).
_UNFINISHED: set[BonTracker] = set()
_AT_EXIT_REGISTERED = False
_AT_EXIT_LOCK = threading.Lock()


def _finish_at_exit(tracker: BonTracker) -> None:
    """Make sure ``tracker`` is finished at interpreter exit (bounded by its finish timeout).

    The hook runs before the interpreter joins its threads (``threading``'s exit hooks run
    before ``atexit``'s), while the daemon delivery thread is still alive, and before
    MLflow's or W&B's own exit hooks close their runs."""
    global _AT_EXIT_REGISTERED
    _UNFINISHED.add(tracker)
    with _AT_EXIT_LOCK:
        if _AT_EXIT_REGISTERED:
            return
        register = getattr(threading, "_register_atexit", None) or atexit.register
        try:
            register(_finish_unfinished)
        except RuntimeError:  # threading's exit already runs (the main thread ended first): after the joins
            atexit.register(_finish_trackers)
        _AT_EXIT_REGISTERED = True


def _finish_unfinished() -> None:
    busy = [t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread() and t.is_alive()]
    if busy:  # training may go on in a thread the interpreter still joins: finish after it ended
        atexit.register(_finish_trackers)
        return
    _finish_trackers()


def _finish_trackers() -> None:
    for tracker in list(_UNFINISHED):  # finish() removes it from the set
        if tracker._closed:
            continue
        logger.info("bon_tracker: finishing a tracker that was not finished (at interpreter exit)")
        try:
            tracker.finish()
        except Exception as err:  # never an exception at exit
            logger.warning("bon_tracker: finishing at exit failed: %s", err)


def _raise_invalid(gathered: list[tuple], step: int, world_size: int) -> None:
    """The first rank's validation error, as log_scores raises it."""
    errors = [(rank, item) for rank, item in enumerate(gathered) if item[0] == "error"]
    if errors:
        rank, (_, message, *kind) = errors[0]
        where = f" (on rank {rank})" if world_size > 1 else ""
        error = TypeError if kind == ["type"] else ValueError
        raise error(f"log_scores at step {step}{where}: {message}")


class ScoreCopies:
    """Copies of the scores the statistics worker reads, in buffers reused from one eval to the
    next. Fresh memory costs a page fault per 4 KiB page: at 1,000 x 64 the two fresh copies took
    0.14-0.15 ms of the training thread, into kept buffers 0.10-0.11 ms. Only buffers given back (the
    worker is done with them) are reused; at most ``KEEP`` of ``MIN_BYTES`` to ``KEEP_BYTES`` each
    are kept (two evals' pairs: the one the worker reads, the next eval's). Smaller arrays come from
    the allocator's heap without page faults: copied plainly (a kept one cost more than that)."""

    KEEP = 4
    MIN_BYTES = 128 << 10  # glibc's default threshold for memory of its own mapping (mmap)
    KEEP_BYTES = 8 << 20

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()  # given back on the worker, taken on the training thread

    def copy(self, scores: np.ndarray) -> np.ndarray:
        """A copy of ``scores`` (in a kept buffer of its shape and dtype when there is one)."""
        if scores.nbytes < self.MIN_BYTES:
            return scores.copy()
        with self._lock:
            found = next(
                (i for i, b in enumerate(self._free) if b.shape == scores.shape and b.dtype == scores.dtype), None
            )
            buffer = None if found is None else self._free.pop(found)
        if buffer is None:
            return scores.copy()
        np.copyto(buffer, scores)
        return buffer

    def give_back(self, buffers: list[np.ndarray]) -> None:
        """Keep ``buffers`` (copies this object made, no longer read) for later copies."""
        with self._lock:
            for buffer in buffers:
                if self.MIN_BYTES <= buffer.nbytes <= self.KEEP_BYTES:
                    self._free.append(buffer)
            del self._free[: max(0, len(self._free) - self.KEEP)]  # the oldest go first


def _private(scores: np.ndarray | list[np.ndarray], given: Any) -> np.ndarray | list[np.ndarray]:
    """``scores`` (validated from ``given``) where nobody else holds them: arrays that share
    memory with the caller's (the same array, a view, a tensor's buffer) are copied."""

    if isinstance(scores, np.ndarray):
        return scores if scores.flags.owndata and scores is not given else scores.copy()
    return [np.array(row) for row in scores]  # ragged rows may be the caller's own arrays


def _joined(parts: list[Any]) -> tuple[np.ndarray | list[np.ndarray], set[int]]:
    """The ranks' scores as one ``(P, N)`` array when every part is one with the same N (no
    copy for a single rank), else as a list of rows; and the row lengths."""
    parts = [part for part in parts if len(part)]
    if parts and all(isinstance(part, np.ndarray) and part.ndim == 2 for part in parts):
        widths = {part.shape[1] for part in parts}
        if len(widths) == 1:
            return (parts[0] if len(parts) == 1 else np.concatenate(parts)), widths
    rows = [row for part in parts for row in part]
    lengths = {len(row) for row in rows}
    if len(lengths) == 1:
        return np.stack(rows), lengths
    return rows, lengths


def _short(values: Any, limit: int = 60) -> str:
    """A value for an error message, cut to a short prefix."""
    text = repr(values)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _checked_grid(ns: Any) -> list[int]:
    """The n grid: sorted, de-duplicated integers >= 1, at most ``MAX_GRID`` of them."""
    if isinstance(ns, (str, bytes)):
        raise TypeError(f"ns must be integers, got {_short(ns)}")
    if np.ndim(ns) == 0:
        ns = [ns]
    if not hasattr(ns, "__len__"):
        raise TypeError(f"ns must be a sequence of integers, got {type(ns).__name__}")
    if len(ns) > MAX_GRID:
        raise ValueError(f"ns has {len(ns)} entries; at most {MAX_GRID} points of n are supported")
    return sorted(set(check_ns(ns, max_n=np.iinfo(np.int64).max)[0].tolist()))


def _check_finite_curve(curve: BonCurve, step: int) -> None:
    """Scores near the float limit make means or SEs overflow to inf: an error, not a curve."""
    names = ("true_mean", "proxy_mean", "true_se", "proxy_se")
    if not np.isinf(np.concatenate([getattr(curve, name) for name in names])).any():
        return  # one check of all four (on the training thread)
    for name in names:
        values = getattr(curve, name)
        if np.isinf(values).any():
            raise ValueError(
                f"log_scores at step {step}: the curve's {name} overflows (inf); the scores are too large "
                "in magnitude (rescale them)"
            )
