"""What the ``Trainer`` callbacks (transformers, TRL) share: Trainer events translated into the
tracking lifecycle (:mod:`bon_tracker.integrations._lifecycle`), the policy's KL from the
trainer's logs, state in checkpoints. Subclasses only say where an evaluation's scores come from."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from bon_tracker.integrations._lifecycle import TrackerLifecycle
from bon_tracker.optional import require
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
    """Base of the Trainer callbacks: Trainer events -> the tracking lifecycle, the policy KL.

    Subclasses only say where an eval step's scores come from (:meth:`eval_scores`).
    A tracker built from ``tracker_kwargs`` is saved into every checkpoint (``on_save``)
    and continued when training resumes from one, so a resumed run continues the same
    tracking run and never logs a step twice. A tracker passed in is the caller's: it is
    saved too, but not replaced or finished here.

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
        log_texts: bool = True,
    ):
        if not isinstance(log_texts, bool):
            raise TypeError(f"log_texts must be True or False, got {log_texts!r:.60}")
        self.log_texts = log_texts  # False: no prompt or completion leaves the process
        self._life = TrackerLifecycle(tracker, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert)
        self._life.live()  # built now: a configuration error surfaces when the callback is made
        self.eval_every = self._life.config.eval_every
        self.stop_on_alert = self._life.stop_on_alert
        self.kl_keys = tuple(kl_keys)
        self._policy_kl: float | None = None
        self._last_eval_step: int | None = None
        self._in_training = False

    @property
    def tracker(self) -> BonTracker:
        """The tracker (after training: the finished one, whose history stays readable)."""
        assert self._life.tracker is not None
        return self._life.tracker

    def eval_scores(self, args: Any, state: Any, **kwargs: Any) -> tuple[Any, ...] | None:
        """``(proxy, true)`` of this process for this evaluation, or ``(proxy, true, (prompts,
        completions))`` with the texts behind them (None: nothing to log)."""
        raise NotImplementedError

    def discard_scores(self) -> None:
        """Drop what was gathered for an evaluation that is not logged."""

    # ---- Trainer events -------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._in_training = True
        if state.global_step > 0:
            self._resume(args, state)

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
        proxy, true, *texts = scores
        texts = texts[0] if texts and self.log_texts else None
        stopping = self._life.log(state.global_step, proxy, true, policy_kl=self._policy_kl, texts=texts)
        self._policy_kl = None
        if stopping and self._in_training:
            control.should_training_stop = True
        if not self._in_training:  # a stand-alone evaluate(): finished now, continued by the next call
            self._life.close()

    def on_step_end(self, args, state, control, **kwargs):
        # The alert rules of an eval run off the training thread: their onsets stop training
        # at the first training step after they are computed.
        if self._in_training and self._life.poll(state.global_step):
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        folder = checkpoint_dir(args, state.global_step)
        if os.path.isdir(folder):
            self._life.live().save_state(folder)  # rank 0 only

    def on_train_end(self, args, state, control, **kwargs):
        self._in_training = False
        self._life.close()
        if self._life.owns:  # kept beside the model, to continue the run from another process
            self.tracker.save_state(args.output_dir)  # rank 0 only

    # ---- internals ------------------------------------------------------------------------
    def policy_kl_from(self, logs: dict[str, Any]) -> float | None:
        """The policy's KL to its reference in one log dict, if there is one."""
        return next((finite_number(logs[k]) for k in self.kl_keys if finite_number(logs.get(k)) is not None), None)

    def _resume(self, args: Any, state: Any) -> None:
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
            return
        self._life.resume(BonTracker.load_state(found), found)
