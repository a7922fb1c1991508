"""TRL's online trainers (GRPOTrainer, RLOOTrainer): best-of-n curves from the groups they already sample.

At each evaluation these trainers sample ``num_generations_eval`` completions per eval
prompt and score them with their reward functions: exactly the N samples per prompt a
best-of-n curve needs, scored by the proxy. This adapter reuses them instead of sampling
again. It wraps the reward functions (TRL's public reward-function contract, no private
method patched) to see each eval batch's prompts, completions and per-function rewards;
the proxy is what the trainer optimizes, ``sum_i reward_weights[i] * reward_i`` as TRL
computes it; the true reward is scored by ``true_fn`` on those same completions at the end
of the evaluation and never enters the trainer (it is not optimized, and costs nothing
during training steps).

>>> bon = BonTrackerCallback(reward_funcs=[accuracy, format_reward], true_fn=gold_reward,
...                          backend="mlflow")  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=model, reward_funcs=bon.reward_funcs, args=GRPOConfig(..., eval_strategy="steps"),
...                       train_dataset=train, eval_dataset=evalset, callbacks=[bon])  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from bon_tracker.optional import require
from bon_tracker.tracking.tracker import BonTracker

from ._trainer import KL_KEYS, TrainerTracking, finite_number

torch = require("torch", "trl")
trl_utils = require("trl.trainer.utils", "trl")

logger = logging.getLogger("bon_tracker")

# What TRL hands a reward function besides the dataset columns: not scores, not per sample.
_NOT_COLUMNS = {"trainer_state", "log_extra", "log_metric", "environments", "completion_ids"}


class BonTrackerCallback(TrainerTracking):
    """Logs best-of-n curves of the eval groups a GRPO/RLOO trainer samples.

    Args:
        tracker: a :class:`BonTracker`; by default one is built from ``tracker_kwargs``.
        reward_funcs: the trainer's reward functions (callables; wrap a reward model in a
            function). Pass :attr:`reward_funcs` to the trainer, and their weights as usual
            in the config's ``reward_weights``.
        true_fn: the true reward, a TRL-style reward function: called as
            ``true_fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``
            with every eval sample of this process at once; returns one float per completion.
        kl_keys: log keys holding the policy's per-token KL to its reference (TRL's ``kl``).
        stop_on_alert: stop training (``control.should_training_stop``) when an alert starts:
            True for any rule, or a list of rule names (e.g. ``["goodhart_kl"]``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset.
        **tracker_kwargs: options of :class:`BonTracker` (``backend="mlflow"``, ``root=...``,
            ``alerts={"fall_z": 2.5}`` or ``alerts=False``).

    Each process must hold whole groups: keep ``per_device_eval_batch_size`` a multiple
    of ``num_generations_eval`` (TRL only asks that of the global batch).
    """

    def __init__(
        self,
        tracker: BonTracker | None = None,
        *,
        reward_funcs: Callable | Sequence[Callable],
        true_fn: Callable[..., Sequence[float]],
        kl_keys: Sequence[str] = KL_KEYS,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Callable[[Any], Any] | None = None,
        **tracker_kwargs: Any,
    ):
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs or any(isinstance(f, torch.nn.Module) or not callable(f) for f in funcs):
            raise TypeError("reward_funcs must be callables; wrap a reward model in a function that scores texts")
        if not callable(true_fn):
            raise TypeError("true_fn must be a callable with TRL's reward-function signature")
        super().__init__(tracker, kl_keys, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert)
        self.true_fn = true_fn
        self.reward_funcs = [self._recording(i, f) for i, f in enumerate(funcs)]
        self._pending: dict[int, dict[str, Any]] = {}  # batches scored since the last prediction step
        self._eval_batches: list[dict[str, Any]] = []

    # ---- capturing what the trainer scores --------------------------------------------------
    def _recording(self, index: int, func: Callable) -> Callable:
        """``func`` unchanged for the trainer (same name, sync or async), its rewards noted."""
        if trl_utils.is_async_callable(func):

            async def reward(prompts, completions, **kwargs):
                rewards = await func(prompts=prompts, completions=completions, **kwargs)
                self._note(index, prompts, completions, kwargs, rewards)
                return rewards
        else:

            def reward(prompts, completions, **kwargs):
                rewards = func(prompts=prompts, completions=completions, **kwargs)
                self._note(index, prompts, completions, kwargs, rewards)
                return rewards

        functools.update_wrapper(reward, func, updated=())
        reward.__name__ = trl_utils.get_callable_name(func)  # TRL logs rewards/<name>/mean
        return reward

    def _note(self, index: int, prompts: list, completions: list, kwargs: dict, rewards: Sequence) -> None:
        # Every reward function of one batch gets the same `completions` list object.
        batch = self._pending.setdefault(id(completions), {
            "prompts": prompts, "completions": completions, "completion_ids": kwargs.get("completion_ids"),
            "columns": {k: v for k, v in kwargs.items() if k not in _NOT_COLUMNS and isinstance(v, list)},
            "rewards": {},
        })  # fmt: skip
        batch["rewards"][index] = [np.nan if r is None else float(r) for r in rewards]

    def on_prediction_step(self, args, state, control, **kwargs):
        # Reward calls since the last event were an eval batch (a training step ends with on_step_end).
        self._eval_batches.extend(b for b in self._pending.values() if len(b["rewards"]) == len(self.reward_funcs))
        self._pending.clear()

    def on_step_begin(self, args, state, control, **kwargs):
        self._pending.clear()

    on_substep_end = on_step_end = on_step_begin

    def on_predict(self, args, state, control, **kwargs):
        self.discard_scores()  # trainer.predict() scores batches too, but logs no curve

    def discard_scores(self) -> None:
        self._eval_batches, self._pending = [], {}

    # ---- an evaluation ends -------------------------------------------------------------------
    def eval_scores(self, args, state, **kwargs):
        batches, self._eval_batches = self._eval_batches, []
        if not batches:
            logger.warning(
                "bon_tracker: evaluation at step %d scored no groups: pass bon.reward_funcs as the "
                "trainer's reward_funcs and give it an eval_dataset",
                state.global_step,
            )
            return None
        weights = np.asarray(args.reward_weights or [1.0] * len(self.reward_funcs), dtype=float)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward "
                "functions: pass exactly bon.reward_funcs as the trainer's reward_funcs"
            )
        if len(self.reward_funcs) > 1 and getattr(args, "multi_objective_aggregation", None) == "normalize_then_sum":
            logger.warning(
                "bon_tracker: the proxy is the weighted sum of raw rewards; with "
                "multi_objective_aggregation='normalize_then_sum' the trainer ranks samples differently"
            )
        # (samples, functions), TRL's rewards_per_func; the proxy is its weighted nansum, as TRL's
        rewards = np.column_stack([np.concatenate([b["rewards"][i] for b in batches]) for i in range(len(weights))])
        proxy = np.where(np.isnan(rewards).all(axis=1), np.nan, np.nansum(rewards * weights, axis=1))
        prompts = [p for b in batches for p in b["prompts"]]
        completions = [c for b in batches for c in b["completions"]]
        columns = {
            k: [v for b in batches for v in b["columns"].get(k, [None] * len(b["prompts"]))]
            for k in batches[0]["columns"]
        }
        ids = [c for b in batches for c in (b["completion_ids"] or [None] * len(b["prompts"]))]
        true = self.true_fn(
            prompts=prompts, completions=completions, completion_ids=ids, trainer_state=state, **columns
        )
        true = np.array([np.nan if t is None else float(t) for t in true])
        if len(true) != len(prompts):
            raise ValueError(f"true_fn returned {len(true)} scores for {len(prompts)} completions")
        group = args.num_generations_eval or args.num_generations
        if len(prompts) % group or any(
            prompts[i] != prompts[i + j] for i in range(0, len(prompts), group) for j in range(group)
        ):
            raise ValueError(
                f"this process did not get whole groups of {group} completions per prompt: set "
                "per_device_eval_batch_size to a multiple of num_generations_eval"
            )
        return proxy.reshape(-1, group), true.reshape(-1, group)

    def policy_kl_from(self, logs: dict[str, Any]) -> float | None:
        """GRPO and RLOO log ``kl``, the mean KL per completion *token*; best-of-n KL is per
        completion, so the RL point's KL is ``kl`` times the mean completion length logged
        beside it (``completions/mean_length``): the total KL of the completions over their number."""
        for key in self.kl_keys:
            kl = finite_number(logs.get(key))
            if kl is None:
                continue
            per_token = key in ("kl", "eval_kl")
            length = finite_number(logs.get(key.removesuffix("kl") + "completions/mean_length")) if per_token else None
            return kl if length is None else kl * length
        return None
