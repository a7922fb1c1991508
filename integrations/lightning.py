"""Lightning: best-of-n curves from the scores your ``validation_step`` returns.

The hand-off: ``validation_step`` returns a dict with ``"bon_proxy"`` and ``"bon_true"``,
each ``(prompts in the batch, N)`` (tensors on any device, arrays or lists; rows may be
ragged). The callback collects them over the validation epoch and logs the curves at
``trainer.global_step`` when the epoch ends, skipping the sanity check. Several reward models
(an ensemble, docs/selection.md) or true rewards: a mapping under the key,
``{"bon_proxy": {"rm_a": scores_a, "rm_b": scores_b}, "bon_true": {"gold": ..., "verifier": ...}}``,
the same names in every batch; the tracker's ``selection_rule`` picks the deployed curve.

>>> def validation_step(self, batch, batch_idx):
...     completions = sample(self.policy, batch["prompts"], n=16)  # doctest: +SKIP
...     return {"bon_proxy": reward_model(completions), "bon_true": gold(completions)}  # doctest: +SKIP
>>> trainer = Trainer(logger=MLFlowLogger(...), callbacks=[BonTrackerCallback(backend="mlflow")])  # doctest: +SKIP

The texts behind the scores, for the hack table (docs/texts.md), come the same way: add
``"bon_prompts"`` (the batch's prompts) and ``"bon_completions"`` (a row of completions per
prompt, as long as its row of scores) to that dict; ``log_texts=False`` keeps them in the process.

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


def _extend(collected: Any, values: Any, key: str) -> Any:
    """``collected`` (a list of rows, or ``{name: rows}``) with one batch's block (or mapping of blocks) added."""
    if isinstance(values, Mapping):
        if collected is None or (not collected and not isinstance(collected, dict)):
            collected = {name: [] for name in values}
        if not isinstance(collected, dict) or set(collected) != set(values):
            raise ValueError(
                f"validation_step returned {key!r} with names {sorted(values)}, but earlier batches of this epoch "
                f"with {sorted(collected) if isinstance(collected, dict) else 'one block of scores'}: return the "
                "same names every batch"
            )
        for name, block in values.items():
            collected[name].extend(_rows(block))
        return collected
    if isinstance(collected, dict):
        raise ValueError(
            f"validation_step returned one block of scores under {key!r}, but a mapping {sorted(collected)} in "
            "earlier batches of this epoch: return the same form every batch"
        )
    collected = [] if collected is None else collected
    collected.extend(_rows(values))
    return collected


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
        proxy_key: key of the proxy scores in ``validation_step``'s output (a block, or a
            mapping ``{member: block}`` of several reward models).
        true_key: key of the true scores (a block, or a mapping ``{name: block}``).
        kl_metric: name of a logged metric (``self.log(name, ...)``) holding the policy's
            KL to its reference; recorded with each eval as the RL point.
        stop_on_alert: stop training (``trainer.should_stop``) when an alert starts: True for
            any rule, or a list of rule names (e.g. ``["goodhart_kl"]``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset.
        prompts_key: key of the batch's prompt strings in ``validation_step``'s output (optional).
        completions_key: key of the completions, one row per prompt (optional, with ``prompts_key``).
        log_texts: pass those texts to the tracker (they go to the tracking service, as TRL's
            ``log_completions`` does); False: only scores leave the process.
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
        prompts_key: str = "bon_prompts",
        completions_key: str = "bon_completions",
        log_texts: bool = True,
        **tracker_kwargs: Any,
    ):
        if not isinstance(log_texts, bool):
            raise TypeError(f"log_texts must be True or False, got {log_texts!r:.60}")
        self._life = TrackerLifecycle(tracker, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert)
        self.proxy_key, self.true_key, self.kl_metric = proxy_key, true_key, kl_metric
        self.prompts_key, self.completions_key, self.log_texts = prompts_key, completions_key, log_texts
        self._proxy: Any = []  # rows, or {member: rows}
        self._true: Any = []
        self._prompts: list[str] = []
        self._completions: list[list[str]] = []
        self._without_texts = 0  # scored batches that returned no texts

    # ---- collecting -------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer, pl_module):
        self._proxy, self._true = [], []
        self._prompts, self._completions, self._without_texts = [], [], 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if isinstance(outputs, Mapping) and self.proxy_key in outputs and self.true_key in outputs:
            self._proxy = _extend(self._proxy, outputs[self.proxy_key], self.proxy_key)
            self._true = _extend(self._true, outputs[self.true_key], self.true_key)
            if self.log_texts and self.prompts_key in outputs and self.completions_key in outputs:
                self._prompts.extend(outputs[self.prompts_key])
                self._completions.extend(list(row) for row in outputs[self.completions_key])
            else:
                self._without_texts += 1

    def _texts(self) -> tuple[list[str], list[list[str]]] | None:
        """The epoch's texts, when every scored batch returned them."""
        texts, self._prompts, self._completions = (self._prompts, self._completions), [], []
        if not self.log_texts or (not texts[0] and not texts[1]):  # none returned: scores only
            return None
        if self._without_texts:
            logger.warning(
                "bon_tracker: %d validation batch(es) returned scores without %r and %r: no texts this epoch",
                self._without_texts,
                self.prompts_key,
                self.completions_key,
            )
            return None
        return texts

    def on_validation_epoch_end(self, trainer, pl_module):
        proxy, true, self._proxy, self._true = self._proxy, self._true, [], []
        texts = self._texts()
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
        stopping = self._life.log(
            trainer.global_step, proxy, true, policy_kl=kl, texts=texts, **self._logger_run(trainer)
        )
        if stopping and trainer.state.fn == "fit":
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module):
        # The alert rules of an eval run off the training thread; their onsets stop training at
        # the end of the epoch, where Lightning's own EarlyStopping acts (after the validation).
        if self._life.poll(trainer.global_step):
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
