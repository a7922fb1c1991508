"""The lifecycle shared by the ``Trainer`` callbacks (transformers, TRL): one tracking run per
training run, the policy's KL from the trainer's logs, state saved in checkpoints and reopened
on resume. Subclasses only say where an evaluation's scores come from."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from bon_tracker.optional import require
from bon_tracker.tracking.alerting import alerts_that_stop, check_stop_on_alert
from bon_tracker.tracking.config import resolve_config
from bon_tracker.tracking.tracker import BonTracker

transformers = require("transformers", "transformers")

logger = logging.getLogger("bon_tracker")

# Keys under which trainers log the policy's KL to its reference (TRL: ``kl``, ``objective/kl``);
# the first one present in a log wins, eval-time values first.
KL_KEYS = ("eval_objective/kl", "eval_kl", "objective/kl", "kl")


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (logs also hold strings and None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def checkpoint_dir(args: Any, step: int) -> str:
    """Where the Trainer saves the checkpoint of ``step``."""
    return os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{step}")


class TrainerTracking(transformers.TrainerCallback):
    """Base of the Trainer callbacks: the tracker's lifecycle, the policy KL, checkpoints.

    Subclasses only say where an eval step's scores come from (:meth:`eval_scores`).
    A tracker built from ``tracker_kwargs`` is saved into every checkpoint (``on_save``)
    and reopened when training resumes from one, so a resumed run continues the same
    tracking run and never logs a step twice. A tracker passed in is the caller's: it is
    saved too, but not reopened or finished here.

    ``stop_on_alert`` (True: any rule; or rule names) stops training the Trainer's own way,
    ``control.should_training_stop``, at the evaluation where such an alert starts.
    """

    def __init__(
        self,
        tracker: BonTracker | None,
        kl_keys: Sequence[str],
        tracker_kwargs: dict[str, Any],
        *,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Any = None,
    ):
        if tracker is not None and (tracker_kwargs or on_alert is not None):
            given = sorted([*tracker_kwargs, *(["on_alert"] if on_alert is not None else [])])
            raise TypeError(f"pass either tracker= or tracker options, not both (got {given})")
        self.stop_on_alert = check_stop_on_alert(stop_on_alert)
        # bon_tracker.yaml and BON_TRACKER_* apply here too; explicit options win.
        config = resolve_config(**tracker_kwargs)
        self.eval_every = config.eval_every
        self._tracker_kwargs = config.tracker_kwargs()
        if on_alert is not None:
            self._tracker_kwargs["on_alert"] = on_alert
        self._owns_tracker = tracker is None
        self.tracker = tracker if tracker is not None else BonTracker(**self._tracker_kwargs)
        self.kl_keys = tuple(kl_keys)
        self._policy_kl: float | None = None
        self._last_eval_step: int | None = None
        self._in_training = False
        self._closed_in: str | None = None  # the folder holding a finished owned tracker's state

    def eval_scores(self, args: Any, state: Any, **kwargs: Any) -> tuple[Any, Any] | None:
        """``(proxy, true)`` of this process for this evaluation (None: nothing to log)."""
        raise NotImplementedError

    def discard_scores(self) -> None:
        """Drop what was gathered for an evaluation that is not logged."""

    # ---- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._in_training = True
        if state.global_step > 0:
            self._reopen(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        kl = self.policy_kl_from(logs or {})
        if kl is not None:
            self._policy_kl = kl

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step == self._last_eval_step:  # several eval datasets: one curve per step
            self.discard_scores()
            return
        self._last_eval_step = state.global_step
        if state.global_step % self.eval_every:  # curves only every eval_every steps
            self.discard_scores()
            return
        scores = self.eval_scores(args, state, **kwargs)
        if scores is None:
            return
        tracker = self._live()
        seen = len(tracker.alerts)
        tracker.log_scores(state.global_step, *scores, policy_kl=self._policy_kl)
        self._policy_kl = None
        stopping = alerts_that_stop(tracker.alerts[seen:], self.stop_on_alert)
        if stopping and self._in_training:
            logger.warning(
                "bon_tracker: stopping training at step %d on the %s alert (stop_on_alert)",
                state.global_step,
                ", ".join(a.rule for a in stopping),
            )
            control.should_training_stop = True
        if not self._in_training and self._owns_tracker:
            self._close(args)

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_dir(args, state.global_step)
        if os.path.isdir(folder):
            self._live().save_state(folder)  # rank 0 only

    def on_train_end(self, args, state, control, **kwargs):
        self._in_training = False
        if self._owns_tracker and self._closed_in is None:
            self._close(args)

    # ---- internals ------------------------------------------------------------------------
    def policy_kl_from(self, logs: dict[str, Any]) -> float | None:
        """The policy's KL to its reference in one log dict, if there is one."""
        return next((finite_number(logs[k]) for k in self.kl_keys if finite_number(logs.get(k)) is not None), None)

    def _live(self) -> BonTracker:
        """The tracker; an owned one finished by a stand-alone evaluate() or the end of training is
        reopened on its saved state, so evaluate() before or after train() stays in the same run."""
        if self._closed_in is not None and self._owns_tracker:
            self.tracker = BonTracker(**{**self._tracker_kwargs, "resume": self._closed_in})
            self._closed_in = None
        return self.tracker

    def _close(self, args: Any) -> None:
        """Finish an owned tracker, keeping its state in ``output_dir`` for a later evaluate().
        Finished first: the run id is known once delivery has opened the run."""
        self.tracker.finish()
        self.tracker.save_state(args.output_dir)
        self._closed_in = args.output_dir

    def _reopen(self, args: Any, state: Any) -> None:
        """Resuming from a checkpoint: continue the tracking run saved in it."""
        candidates = [args.resume_from_checkpoint] if isinstance(args.resume_from_checkpoint, str) else []
        candidates.append(checkpoint_dir(args, state.global_step))
        found = next((c for c in candidates if BonTracker.load_state(c) is not None), None)
        if found is None:
            if state.is_world_process_zero:
                logger.warning(
                    "bon_tracker: resuming at step %d but no tracker state was found in %s; "
                    "logging to a new tracking run",
                    state.global_step,
                    candidates,
                )
        elif self._owns_tracker:
            self.tracker = BonTracker(**{**self._tracker_kwargs, "resume": found})
            self._closed_in = None
        elif state.is_world_process_zero and self.tracker.last_step is None:
            logger.warning(
                "bon_tracker: resuming from %s with a tracker you created; to continue the saved "
                "tracking run create it with BonTracker(..., resume=%r)",
                found,
                found,
            )
