"""BonTracker: scores in, best-of-n curves out to a tracking backend, nothing lost."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from bon_tracker.backends import BACKENDS, Backend, make_backend
from bon_tracker.core import BonCurve, bon_curve
from bon_tracker.core.validation import NanPolicy, check_nan_policy, check_ns, paired_scores
from bon_tracker.optional import MissingDependencyError
from bon_tracker.record import EvalRecord
from bon_tracker.tracking.distributed import all_gather, rank_and_world_size
from bon_tracker.tracking.wal import Spool, atomic_write_text

logger = logging.getLogger("bon_tracker")

STATE_FILE = "bon_tracker_state.json"


def _rows(values: Any) -> list[np.ndarray] | np.ndarray:
    """Tensors (CPU or CUDA), arrays and lists -> a 2-D array or a list of 1-D rows."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        return values.detach().cpu().double().numpy()  # also bfloat16, which numpy lacks
    if isinstance(values, (list, tuple)):
        return [v.detach().cpu().double().numpy() if hasattr(v, "detach") else v for v in values]
    return values


class BonTracker:
    """Computes best-of-n curves at each eval step and logs them to one backend.

    Args:
        backend: ``"local"`` (default: a run folder), ``"mlflow"``, ``"wandb"``, or a
            :class:`~bon_tracker.backends.base.Backend` instance.
        ns: the best-of-n grid; default powers of two up to N, plus N.
        run_name: a name for the run the backend opens.
        key_prefix: prefix of every metric key (default ``bon``).
        nan_policy: ``"raise"`` (default) or ``"omit"`` non-finite samples.
        proxy_name, true_name: names of the two rewards, for chart labels.
        spool_dir: where records are kept while a service is down (default
            ``$BON_TRACKER_SPOOL_DIR`` or ``~/.cache/bon_tracker/spool``).
        resume: a saved tracker state (:meth:`state`), or a folder or file holding one
            (:meth:`save_state`): continue that tracking run and skip steps it already logged.
        **backend_options: passed to the backend (``root`` for local;
            ``tracking_uri``, ``experiment``, ``run_id`` for MLflow; ``project``,
            ``entity``, ``run`` for W&B).

    Example:
        >>> import tempfile
        >>> with BonTracker("local", root=tempfile.mkdtemp(), run_name="demo") as tracker:
        ...     curve = tracker.log_scores(0, [[0.1, 0.5, 0.9, 0.3]], [[1.0, 0.0, 2.0, 0.5]])
        >>> curve.true_mean.round(3).tolist()
        [0.875, 1.083, 2.0]
    """

    def __init__(
        self,
        backend: str | Backend = "local",
        *,
        ns: Any = None,
        run_name: str | None = None,
        key_prefix: str = "bon",
        nan_policy: NanPolicy = "raise",
        proxy_name: str = "proxy",
        true_name: str = "true",
        spool_dir: str | Path | None = None,
        resume: str | Path | Mapping[str, Any] | None = None,
        **backend_options: Any,
    ):
        check_nan_policy(nan_policy)
        if not isinstance(key_prefix, str) or not key_prefix.strip("/"):
            raise ValueError(f"key_prefix must be a non-empty string, got {key_prefix!r}")
        self.ns = None if ns is None else check_ns(ns, max_n=np.iinfo(np.int64).max)[0].tolist()
        self.key_prefix = key_prefix.strip("/")
        self.nan_policy = nan_policy
        self.proxy_name, self.true_name = str(proxy_name), str(true_name)
        self.last_step: int | None = None
        self.history: list[EvalRecord] = []
        self._closed = False
        self._failing = False
        self._unspooled: list[EvalRecord] = []  # records the spool itself could not take (disk full)
        resumed_spool = None

        if resume is not None:
            state = dict(resume) if isinstance(resume, Mapping) else self.load_state(resume)
            if state is not None:
                if isinstance(backend, str) and backend != state["backend"]["backend"]:
                    raise ValueError(
                        f"resume state at {resume} is for backend {state['backend']['backend']!r}, not {backend!r}"
                    )
                backend_options = {**{k: v for k, v in state["backend"].items() if k != "backend"}, **backend_options}
                self.last_step = state.get("last_step")
                resumed_spool = state.get("spool")

        if isinstance(backend, Backend):
            self._backend_name = backend.name
            self._backend: Backend | None = backend
            self._backend_options: dict[str, Any] = {}
        elif isinstance(backend, str):
            if backend not in BACKENDS:
                raise ValueError(f"unknown backend {backend!r}: choose one of {sorted(BACKENDS)}")
            self._backend_name = backend
            self._backend = None  # built on first use, on rank 0 only
            self._backend_options = dict(backend_options)
            if run_name is not None:
                self._backend_options["run_name"] = run_name
        else:
            raise TypeError(f"backend must be a name or a Backend instance, got {type(backend).__name__}")
        adopted = Spool(Path(resumed_spool)) if resumed_spool and Path(resumed_spool).exists() else None
        if adopted is not None and adopted.claim():
            self.spool = adopted  # what the process this one continues could not deliver
        else:
            self.spool = Spool.new(self._backend_name, Path(spool_dir) if spool_dir is not None else None)

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
        """Only rank 0 of a multi-process run touches the backend."""
        return self.rank == 0

    @property
    def backend(self) -> Backend:
        if not self.is_writer:
            raise RuntimeError(f"rank {self.rank} never opens a backend: only rank 0 writes")
        if self._backend is None:
            self._backend = make_backend(self._backend_name, **self._backend_options)
        return self._backend

    def log_scores(
        self,
        step: int,
        proxy: Any,
        true: Any,
        *,
        policy_kl: float | None = None,
        **context: Any,
    ) -> BonCurve | None:
        """Compute best-of-n curves from this eval step's samples and log them at ``step``.

        Args:
            step: the training step (an int; steps must increase).
            proxy: proxy scores, ``(P, N)`` or a ragged list of per-prompt rows
                (arrays, lists or tensors on any device).
            true: true scores, same shape.
            policy_kl: the trained policy's KL to its reference policy at this step,
                if known; recorded with the policy's own mean scores (n = 1).
            **context: extra scalars logged beside the curves.

        Returns:
            The :class:`BonCurve` on rank 0 (None on other ranks, and when ``step`` was
            already logged by the run this tracker resumed).

        In a multi-process run every rank calls this with its own prompts; rank 0
        gathers all of them. A tracking-service failure never raises here: the
        record is spooled to disk and replayed on the next call or at :meth:`finish`.
        """
        if self._closed:
            raise RuntimeError("this tracker is finished; create a new BonTracker to log more")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an integer, got {type(step).__name__}")
        if policy_kl is not None and not math.isfinite(float(policy_kl)):
            raise ValueError(f"policy_kl must be finite, got {policy_kl!r}")
        step = int(step)

        local = self._validated_local(proxy, true)
        gathered = all_gather(local)
        errors = [(rank, item[1]) for rank, item in enumerate(gathered) if item[0] == "error"]
        if errors:
            rank, message = errors[0]
            where = f" (on rank {rank})" if self.world_size > 1 else ""
            raise ValueError(f"log_scores at step {step}{where}: {message}")
        if not self.is_writer:
            return None
        if self.last_step is not None and step <= self.last_step:
            logger.warning(
                "bon_tracker: step %d was already logged (last logged step %d); skipped", step, self.last_step
            )
            return None  # checked before computing, so a replayed step costs nothing

        rows_p = [row for item in gathered for row in item[1]]
        rows_t = [row for item in gathered for row in item[2]]
        if not rows_p:
            raise ValueError(f"log_scores at step {step}: no rank passed any scores")
        lengths = {len(r) for r in rows_p}
        if len(lengths) == 1:
            rows_p, rows_t = np.stack(rows_p), np.stack(rows_t)
        curve = bon_curve(rows_p, rows_t, ns=self._grid(lengths), nan_policy=self.nan_policy)
        record = EvalRecord.build(
            step,
            curve,
            policy_kl=policy_kl,
            context=context,
            key_prefix=self.key_prefix,
            proxy_name=self.proxy_name,
            true_name=self.true_name,
        )
        self.log_record(record)
        return curve

    def log_record(self, record: EvalRecord) -> bool:
        """Log an already computed :class:`EvalRecord` (e.g. built from a score file).

        Same guarantees as :meth:`log_scores`: a step already logged is skipped (returns
        False), and a service failure spools the record instead of raising.
        """
        if self._closed:
            raise RuntimeError("this tracker is finished; create a new BonTracker to log more")
        if not self.is_writer:
            return False
        if self.last_step is not None and record.step <= self.last_step:
            logger.warning(
                "bon_tracker: step %d was already logged (last logged step %d); skipped", record.step, self.last_step
            )
            return False
        self._deliver(record)  # raises only for a configuration error: then the step is not marked
        self.history.append(record)
        self.last_step = record.step
        return True

    def finish(self) -> None:
        """Replay anything spooled, then close the backend. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if not self.is_writer:
            return
        try:
            self._replay_spool()
            self._spool_unspooled()
        except Exception as err:  # e.g. the backend cannot be built: still close what is open
            logger.warning("bon_tracker: replaying spooled records at finish failed: %s", err)
        if self._unspooled:
            logger.error(
                "bon_tracker: %d eval record(s) (steps %s) could neither reach %s nor be written to the spool %s",
                len(self._unspooled),
                [r.step for r in self._unspooled],
                self._backend_name,
                self.spool.path,
            )
        if len(self.spool):
            logger.warning(
                "bon_tracker: %d eval record(s) could not reach %s and are kept in %s; "
                "replay them later with: bon-tracker sync %s",
                len(self.spool),
                self._backend_name,
                self.spool.path,
                self.spool.path,
            )
        self.spool.release()
        if self._backend is not None:
            try:
                self._backend.finish()
            except Exception as err:  # never crash the user's program on the way out
                logger.warning("bon_tracker: closing the %s backend failed: %s", self._backend_name, err)

    def __enter__(self) -> BonTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    # ---- resuming ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a resumed process needs to continue this tracking run (and its spool)."""
        spec = self.backend.spec() if self.is_writer else {"backend": self._backend_name}
        return {"backend": spec, "last_step": self.last_step, "spool": str(self.spool.path)}

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
    def _grid(self, lengths: set[int]) -> list[int] | None:
        if self.ns is None:
            return None
        largest = max(lengths)
        too_big = [n for n in self.ns if n > largest]
        if too_big:
            raise ValueError(
                f"ns {too_big} exceed the number of samples per prompt ({largest}); lower them "
                "or sample more completions"
            )
        return self.ns

    def _validated_local(self, proxy: Any, true: Any) -> tuple:
        """This rank's scores as lists of 1-D float rows, or the reason they are bad."""
        proxy, true = _rows(proxy), _rows(true)
        if self.world_size > 1 and len(proxy) == 0 and len(true) == 0:
            return ("ok", [], [])  # a rank may get no eval prompts; the gathered whole is checked
        try:
            p, t, _ = paired_scores(proxy, true, nan_policy=self.nan_policy, names=("proxy", "true"))
        except (TypeError, ValueError) as err:
            return ("error", str(err))
        rows_p = list(p) if isinstance(p, np.ndarray) else p
        rows_t = list(t) if isinstance(t, np.ndarray) else t
        return ("ok", rows_p, rows_t)

    def _deliver(self, record: EvalRecord) -> None:
        """Replay what is pending first (order matters), then write this record; spool it on
        failure. Raises only for a configuration error (bad option, missing extra)."""
        backend = self.backend  # a configuration error raises here
        if self._replay_spool():
            try:
                backend.log_eval(record)
                self._recovered()
                return
            except MissingDependencyError:
                raise  # a configuration error, not an outage: retrying later cannot help
            except Exception as err:
                self._report_failure(err)
        self._spool(record)

    def _spool(self, record: EvalRecord) -> None:
        """Keep a record for later; if even the spool fails (disk full, read-only), keep it in
        memory and try the spool again at the next step: never raise into training."""
        self._spool_unspooled()
        if self._unspooled:
            self._unspooled.append(record)
            return
        try:
            self.spool.claim()  # held while this tracker lives: `bon-tracker sync` leaves it alone
            self.spool.append(self._spec(), record)
        except Exception as err:
            logger.error(
                "bon_tracker: cannot write the spool %s (%s); keeping step %d in memory",
                self.spool.path,
                err,
                record.step,
            )
            self._unspooled.append(record)

    def _spool_unspooled(self) -> None:
        while self._unspooled:
            try:
                self.spool.append(self._spec(), self._unspooled[0])
            except Exception:
                return
            self._unspooled.pop(0)

    def _replay_spool(self) -> bool:
        """Write pending records in order, each removed from the spool once written;
        True when nothing is pending afterwards."""
        self._spool_unspooled()
        pending = self.spool.entries()
        for i, (_, record) in enumerate(pending):
            try:
                self.backend.log_eval(record)
            except MissingDependencyError:
                raise
            except Exception as err:
                self._report_failure(err)
                self.spool.keep_only(pending[i:])
                return False
        if pending:
            self.spool.keep_only([])
        # records held in memory are newer than the spool's: once one is held, all later ones are
        while self._unspooled:
            try:
                self.backend.log_eval(self._unspooled[0])
            except MissingDependencyError:
                raise
            except Exception as err:
                self._report_failure(err)
                return False
            self._unspooled.pop(0)
        if pending:
            self._recovered()
        return True

    def _spec(self) -> dict[str, Any]:
        try:
            return self.backend.spec()
        except Exception:  # the backend could not even be built: keep what we know
            return {"backend": self._backend_name, **self._backend_options}

    def _report_failure(self, err: Exception) -> None:
        if not self._failing:  # once per outage, not once per step
            logger.warning(
                "bon_tracker: the %s backend failed (%s: %s); eval records are spooled to %s and "
                "will be replayed on the next eval step, at finish(), or by: bon-tracker sync %s",
                self._backend_name,
                type(err).__name__,
                err,
                self.spool.path,
                self.spool.path,
            )
        self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            logger.warning(
                "bon_tracker: the %s backend is reachable again; spooled records replayed", self._backend_name
            )
        self._failing = False
