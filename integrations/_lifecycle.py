"""The tracking run's lifecycle, written once for every trainer callback (transformers, TRL,
Lightning): the tracker built from options or the caller's own, finished at the end of a
train/validate call and continued by the next one, resumed from a checkpoint's state, and the
alerts that stop training. No framework is imported here; each callback only translates its
framework's events into these calls."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from bon_tracker.tracking.alerting import alerts_that_stop, check_stop_on_alert
from bon_tracker.tracking.config import resolve_config
from bon_tracker.tracking.tracker import BonTracker

logger = logging.getLogger("bon_tracker")

# BonTracker options that are not configuration keys (bon_tracker.yaml has none): passed as given.
TRACKER_ONLY_OPTIONS = ("selection", "selection_rule", "redact", "hack_table", "log_texts")


class TrackerLifecycle:
    """One tracking run across a framework's ``fit``/``evaluate`` calls.

    Args:
        tracker: the caller's tracker (never finished or replaced here), or None to build one
            from ``tracker_kwargs`` (and ``bon_tracker.yaml`` / ``BON_TRACKER_*``; explicit wins).
        tracker_kwargs: options of :class:`BonTracker`.
        stop_on_alert: False, True (any rule) or rule names whose onset stops training.
        on_alert: called with each alert at its onset (an owned tracker only).
    """

    def __init__(
        self,
        tracker: BonTracker | None,
        tracker_kwargs: dict[str, Any],
        *,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Callable[[Any], Any] | None = None,
    ):
        given = sorted([*tracker_kwargs, *(["on_alert"] if on_alert is not None else [])])
        if tracker is not None and given:
            raise TypeError(f"pass either tracker= or tracker options, not both (got {given})")
        self.stop_on_alert = check_stop_on_alert(stop_on_alert)
        own = {k: v for k, v in tracker_kwargs.items() if k in TRACKER_ONLY_OPTIONS}
        self.config = resolve_config(**{k: v for k, v in tracker_kwargs.items() if k not in own})
        self.options = {**self.config.tracker_kwargs(), **own}
        if on_alert is not None:
            self.options["on_alert"] = on_alert
        self.explicit = frozenset(tracker_kwargs)
        self.owns = tracker is None
        self.tracker = tracker  # the live tracker, or the last finished one (its history stays readable)
        self._finished = False
        self._resume_state: dict[str, Any] | None = None  # what the next owned tracker continues
        self._seen = 0 if tracker is None else len(tracker.poll_alerts())  # onsets already acted on

    def live(self, **context: Any) -> BonTracker:
        """The tracker to log with; an owned one is built (or rebuilt after :meth:`close`, on
        the finished one's state) with ``context`` options (e.g. the framework logger's run)
        that the caller did not set explicitly."""
        if self.owns and (self.tracker is None or self._finished):
            options = {**self.options, **{k: v for k, v in context.items() if k not in self.explicit}}
            self.tracker = BonTracker(**options, resume=self._resume_state)
            self._resume_state, self._finished = None, False
            self._seen = len(self.tracker.poll_alerts())  # a resumed run's earlier onsets stopped nothing
        assert self.tracker is not None
        return self.tracker

    def log(
        self,
        step: int,
        proxy: Any,
        true: Any,
        *,
        policy_kl: float | None = None,
        texts: tuple[list[str], list[list[str]]] | None = None,
        **context: Any,
    ) -> list[Any]:
        """Log one eval step (``texts``: its ``(prompts, completions)``, when the callback logs
        texts); returns the onsets found since the last call that should stop
        training (this eval's alert rules run off the training thread: :meth:`poll` at the
        next training step returns its onsets)."""
        tracker = self.live(**context)
        if texts is None:
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
        else:
            prompts, completions = texts
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl, prompts=prompts, completions=completions)
        return self._stopping(step, tracker.poll_alerts())

    def poll(self, step: int) -> list[Any]:
        """At a training step (or epoch end): the onsets found since the last call that should
        stop training. With ``stop_on_alert`` the statistics of the last eval are done by now or
        waited for (they ran during this step: only what one step did not cover is waited for);
        without it nothing waits."""
        if self.tracker is None or self._finished:
            return []
        if self.stop_on_alert is not False:
            self.tracker.wait()
        return self._stopping(step, self.tracker.poll_alerts())

    def _stopping(self, step: int, onsets: list[Any]) -> list[Any]:
        new, self._seen = onsets[self._seen :], len(onsets)
        stopping = alerts_that_stop(new, self.stop_on_alert)
        if stopping:
            logger.warning(
                "bon_tracker: stopping training at step %d on the %s alert (stop_on_alert)",
                step,
                ", ".join(a.rule for a in stopping),
            )
        return stopping

    def close(self) -> None:
        """Finish an owned tracker; the next :meth:`live` continues the same tracking run.
        Finished first, then its state taken: the run id is known once delivery opened the run."""
        if self.owns and self.tracker is not None and not self._finished:
            self.tracker.finish()
            self._resume_state = self.tracker.state() if self.tracker.is_writer else None
            self._finished = True

    def state(self) -> dict[str, Any] | None:
        """What a checkpoint keeps to continue this tracking run (None before any tracker)."""
        if self.tracker is not None and not self._finished:
            return self.tracker.state()
        return self._resume_state

    def resume(self, state: dict[str, Any] | None, where: str) -> None:
        """Continue the tracking run saved in a checkpoint (``where``, for messages)."""
        if state is None:
            return
        if not self.owns:
            if self.tracker is not None and self.tracker.is_writer and self.tracker.last_step is None:
                logger.warning(
                    "bon_tracker: %s holds a tracking run; to continue it, let the callback build its "
                    "tracker (pass tracker options, not tracker=), or create yours with "
                    "BonTracker(..., resume=...)",
                    where,
                )
            return
        if self.tracker is not None and not self._finished:
            self.tracker.finish()  # the fresh tracker made before the checkpoint was known
        self._resume_state, self._finished = state, True
