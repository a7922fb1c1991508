"""Lightning: best-of-n curves from the scores your ``validation_step`` returns.

The hand-off: ``validation_step`` returns a dict with ``"bon_proxy"`` and ``"bon_true"``,
each ``(prompts in the batch, N)`` (tensors on any device, arrays or lists; rows may be
ragged). The callback collects them over the validation epoch and logs the curves at
``trainer.global_step`` when the epoch ends, skipping the sanity check.

>>> def validation_step(self, batch, batch_idx):
...     completions = sample(self.policy, batch["prompts"], n=16)  # doctest: +SKIP
...     return {"bon_proxy": reward_model(completions), "bon_true": gold(completions)}  # doctest: +SKIP
>>> trainer = Trainer(logger=MLFlowLogger(...), callbacks=[BonTrackerCallback(backend="mlflow")])  # doctest: +SKIP

With ``backend="mlflow"`` next to an ``MLFlowLogger`` (or ``"wandb"`` next to a
``WandbLogger``) the curves go into the logger's run. The tracking run and its last
logged step are saved in Lightning checkpoints, so ``fit(ckpt_path=...)`` continues it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bon_tracker.optional import require
from bon_tracker.tracking.alerting import alerts_that_stop, check_stop_on_alert
from bon_tracker.tracking.config import resolve_config
from bon_tracker.tracking.tracker import BonTracker

pl = require("lightning.pytorch", "lightning")

logger = logging.getLogger("bon_tracker")


def _rows(values: Any) -> list[Any]:
    """A ``(prompts, N)`` block (tensor, array or nested list) as a list of per-prompt rows."""
    if hasattr(values, "detach"):
        values = values.detach()
    return [values] if getattr(values, "ndim", 2) == 1 else list(values)  # 1-D: one prompt


class BonTrackerCallback(pl.Callback):
    """Logs best-of-n curves of the scores returned by ``validation_step``, once per validation epoch.

    Args:
        tracker: a :class:`BonTracker`; by default one is built from ``tracker_kwargs``
            when first needed, attached to the trainer's MLflow or W&B logger run.
        proxy_key: key of the proxy scores in ``validation_step``'s output.
        true_key: key of the true scores.
        kl_metric: name of a logged metric (``self.log(name, ...)``) holding the policy's
            KL to its reference; recorded with each eval as the RL point.
        stop_on_alert: stop training (``trainer.should_stop``) when an alert starts: True for
            any rule, or a list of rule names (e.g. ``["goodhart_kl"]``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset.
        **tracker_kwargs: options of :class:`BonTracker` (``backend="mlflow"``, ``root=...``).
    """

    def __init__(
        self,
        tracker: BonTracker | None = None,
        *,
        proxy_key: str = "bon_proxy",
        true_key: str = "bon_true",
        kl_metric: str | None = None,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Callable[[Any], Any] | None = None,
        **tracker_kwargs: Any,
    ):
        if tracker is not None and (tracker_kwargs or on_alert is not None):
            given = sorted([*tracker_kwargs, *(["on_alert"] if on_alert is not None else [])])
            raise TypeError(f"pass either tracker= or tracker options, not both (got {given})")
        self.stop_on_alert = check_stop_on_alert(stop_on_alert)
        self._on_alert = on_alert
        self.tracker = tracker
        self._owns_tracker = tracker is None
        self._tracker_kwargs = dict(tracker_kwargs)
        # bon_tracker.yaml and BON_TRACKER_* apply here too; explicit options win.
        self._config = resolve_config(**tracker_kwargs)
        self.proxy_key, self.true_key, self.kl_metric = proxy_key, true_key, kl_metric
        self._proxy: list[Any] = []
        self._true: list[Any] = []
        self._saved_state: dict[str, Any] | None = None  # from a checkpoint, or of a finished tracker

    # ---- collecting -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module):
        self._proxy, self._true = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if isinstance(outputs, Mapping) and self.proxy_key in outputs and self.true_key in outputs:
            self._proxy.extend(_rows(outputs[self.proxy_key]))
            self._true.extend(_rows(outputs[self.true_key]))

    def on_validation_epoch_end(self, trainer, pl_module):
        proxy, true, self._proxy, self._true = self._proxy, self._true, [], []
        if trainer.sanity_checking or trainer.global_step % self._config.eval_every:
            return
        if not proxy and trainer.world_size == 1:  # (with several processes the tracker says which rank)
            logger.warning(
                "bon_tracker: no scores this validation epoch: return {%r: ..., %r: ...} from validation_step",
                self.proxy_key,
                self.true_key,
            )
            return
        kl = trainer.callback_metrics.get(self.kl_metric) if self.kl_metric else None
        kl = float(kl) if kl is not None and math.isfinite(float(kl)) else None
        tracker = self._tracker(trainer)
        seen = len(tracker.alerts)
        tracker.log_scores(trainer.global_step, proxy, true, policy_kl=kl)
        stopping = alerts_that_stop(tracker.alerts[seen:], self.stop_on_alert)
        if stopping and not trainer.sanity_checking and trainer.state.fn == "fit":
            logger.warning(
                "bon_tracker: stopping training at step %d on the %s alert (stop_on_alert)",
                trainer.global_step,
                ", ".join(a.rule for a in stopping),
            )
            trainer.should_stop = True

    # ---- the tracking run -----------------------------------------------------------------------
    def _tracker(self, trainer: Any) -> BonTracker:
        if self.tracker is None:
            options = self._config.tracker_kwargs()
            # the logger's run beats the config file, not an explicit option
            options.update({k: v for k, v in self._logger_run(trainer).items() if k not in self._tracker_kwargs})
            state = self._saved_state if trainer.is_global_zero else None  # other ranks never write
            if self._on_alert is not None:
                options["on_alert"] = self._on_alert
            self.tracker = BonTracker(**options, resume=state)
        return self.tracker

    def _logger_run(self, trainer: Any) -> dict[str, Any]:
        """Backend options pointing at the run of the trainer's logger of the same service."""
        backend = self._config.backend
        if not trainer.is_global_zero:  # a logger's run exists on rank 0 only
            return {}
        for run_logger in trainer.loggers:
            if backend == "mlflow" and isinstance(run_logger, pl.loggers.MLFlowLogger):
                return {"run_id": run_logger.run_id, "tracking_uri": run_logger.experiment.tracking_uri}
            if backend == "wandb" and isinstance(run_logger, pl.loggers.WandbLogger):
                return {"run": run_logger.experiment}
        return {}

    def teardown(self, trainer, pl_module, stage):
        if self._owns_tracker and self.tracker is not None:  # a later fit/validate continues the run
            self.tracker.finish()  # first: the run id is known once delivery has opened the run
            self._saved_state = self.tracker.state() if trainer.is_global_zero else None
            self.tracker = None

    def state_dict(self) -> dict[str, Any]:
        state = self.tracker.state() if self.tracker is not None else self._saved_state
        return {"tracker": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("tracker") is None:
            return
        if self._owns_tracker:
            self._saved_state = state_dict["tracker"]
            self.tracker = None
        else:
            logger.warning(
                "bon_tracker: this checkpoint holds a tracking run; to continue it, let the callback "
                "build its tracker (pass tracker options, not tracker=)"
            )
