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

from bon_tracker.integrations._lifecycle import TrackerLifecycle
from bon_tracker.optional import require
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
        self._life = TrackerLifecycle(tracker, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert)
        self.proxy_key, self.true_key, self.kl_metric = proxy_key, true_key, kl_metric
        self._proxy: list[Any] = []
        self._true: list[Any] = []

    # ---- collecting -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module):
        self._proxy, self._true = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if isinstance(outputs, Mapping) and self.proxy_key in outputs and self.true_key in outputs:
            self._proxy.extend(_rows(outputs[self.proxy_key]))
            self._true.extend(_rows(outputs[self.true_key]))

    def on_validation_epoch_end(self, trainer, pl_module):
        proxy, true, self._proxy, self._true = self._proxy, self._true, [], []
        if trainer.sanity_checking or trainer.global_step % self._life.config.eval_every:
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
        stopping = self._life.log(trainer.global_step, proxy, true, policy_kl=kl, **self._logger_run(trainer))
        if stopping and trainer.state.fn == "fit":
            trainer.should_stop = True

    # ---- the tracking run -----------------------------------------------------------------------
    @property
    def tracker(self) -> BonTracker | None:
        """The tracker (None until the first validation; after one, the last one used)."""
        return self._life.tracker

    def _logger_run(self, trainer: Any) -> dict[str, Any]:
        """Backend options pointing at the run of the trainer's logger of the same service."""
        backend = self._life.config.backend
        if not trainer.is_global_zero:  # a logger's run exists on rank 0 only
            return {}
        for run_logger in trainer.loggers:
            if backend == "mlflow" and isinstance(run_logger, pl.loggers.MLFlowLogger):
                return {"run_id": run_logger.run_id, "tracking_uri": run_logger.experiment.tracking_uri}
            if backend == "wandb" and isinstance(run_logger, pl.loggers.WandbLogger):
                return {"run": run_logger.experiment}
        return {}

    def teardown(self, trainer, pl_module, stage):
        self._life.close()  # a later fit/validate continues the same tracking run

    def state_dict(self) -> dict[str, Any]:
        state = self._life.state()
        return {"tracker": state} if state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._life.resume(state_dict.get("tracker"), "this checkpoint")
