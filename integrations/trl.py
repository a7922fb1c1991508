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

Several reward models as an ensemble (docs/selection.md): ``proxy_keys=["rm_a", "rm_b"]`` names
reward functions (by TRL's name for them, as in ``rewards/<name>/mean``) whose rewards are the
members, instead of the weighted sum; the tracker's ``selection_rule`` (default ``mean``) picks the
deployed curve and every rule's selection statistics go in the record. Several true rewards:
``true_fn={"gold": gold_fn, "verifier": verifier_fn}``.

>>> bon = BonTrackerCallback(reward_funcs=[accuracy, format_reward], true_fn=gold_reward,
...                          backend="mlflow")  # doctest: +SKIP
>>> trainer = GRPOTrainer(model=model, reward_funcs=bon.reward_funcs, args=GRPOConfig(..., eval_strategy="steps"),
...                       train_dataset=train, eval_dataset=evalset, callbacks=[bon])  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
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


def as_text(value: Any) -> str:
    """A prompt or completion as TRL hands it to reward functions, as text: a string as it is; a
    conversation (a list of ``{"role", "content"}`` messages, content a string or a list of parts
    with ``"text"``) as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        lines = []
        for message in value:
            content = message.get("content", "")
            if isinstance(content, list):  # multimodal parts: their text
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            lines.append(f"{message.get('role', '')}: {content}")
        return "\n".join(lines)
    return str(value)


def _member_indices(keys: str | Sequence[str] | None, names: Sequence[str]) -> dict[str, int] | None:
    """``proxy_keys`` as ``{reward function name: its index}`` (None: the weighted sum is the proxy)."""
    if keys is None:
        return None
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ValueError("proxy_keys is empty: name at least one reward function, or leave it out")
    if len(set(names)) != len(names):
        raise ValueError(f"reward functions share a name ({names}): give each its own name to use proxy_keys")
    unknown = [k for k in keys if k not in names]
    if unknown:
        raise ValueError(f"proxy_keys {unknown} are not reward functions; the reward functions are {names}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"proxy_keys must be distinct, got {keys}")
    return {k: names.index(k) for k in keys}


class BonTrackerCallback(TrainerTracking):
    """Logs best-of-n curves of the eval groups a GRPO/RLOO trainer samples.

    Args:
        tracker: a :class:`BonTracker`; by default one is built from ``tracker_kwargs``.
        reward_funcs: the trainer's reward functions (callables; wrap a reward model in a
            function). Pass :attr:`reward_funcs` to the trainer, and their weights as usual
            in the config's ``reward_weights``.
        true_fn: the true reward, a TRL-style reward function: called as
            ``true_fn(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)``
            with every eval sample of this process at once; returns one float per completion. Or
            several true rewards, ``{name: function}``: every selection statistic per true reward.
        proxy_keys: names of reward functions (TRL's names, ``rewards/<name>/mean``) that are the
            members of an ensemble proxy, each its raw reward (``proxy_key`` is the same option);
            default: one proxy, the weighted sum the trainer optimizes.
        kl_keys: log keys holding the policy's per-token KL to its reference (TRL's ``kl``).
        stop_on_alert: stop training (``control.should_training_stop``) when an alert starts:
            True for any rule, or a list of rule names (e.g. ``["goodhart_kl"]``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset.
        log_texts: pass each group's prompt and completions to the tracker, for the hack table
            (conversations as ``role: content`` lines; docs/texts.md: they go to the tracking
            service, as TRL's ``log_completions`` does); False: only scores leave the process.
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
        true_fn: Callable[..., Sequence[float]] | Mapping[str, Callable[..., Sequence[float]]],
        proxy_keys: str | Sequence[str] | None = None,
        proxy_key: str | Sequence[str] | None = None,
        kl_keys: Sequence[str] = KL_KEYS,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Callable[[Any], Any] | None = None,
        log_texts: bool = True,
        **tracker_kwargs: Any,
    ):
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs or any(isinstance(f, torch.nn.Module) or not callable(f) for f in funcs):
            raise TypeError("reward_funcs must be callables; wrap a reward model in a function that scores texts")
        true_fns = dict(true_fn) if isinstance(true_fn, Mapping) else None
        if not (callable(true_fn) or (true_fns and all(callable(f) for f in true_fns.values()))):
            raise TypeError(
                "true_fn must be a callable with TRL's reward-function signature, or a mapping {name: such a callable}"
            )
        if proxy_keys is not None and proxy_key is not None:
            raise TypeError("pass proxy_keys= or proxy_key=, not both (they are the same option)")
        names = [trl_utils.get_callable_name(f) for f in funcs]
        self.proxy_keys = _member_indices(proxy_keys if proxy_keys is not None else proxy_key, names)
        super().__init__(
            tracker, kl_keys, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert, log_texts=log_texts
        )
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

    on_substep_end = on_step_begin

    def on_step_end(self, args, state, control, **kwargs):
        self._pending.clear()
        super().on_step_end(args, state, control, **kwargs)  # the alerts found off the training thread

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
        members = {name: rewards[:, i] for name, i in (self.proxy_keys or {}).items()}
        prompts = [p for b in batches for p in b["prompts"]]
        completions = [c for b in batches for c in b["completions"]]
        columns = {
            k: [v for b in batches for v in b["columns"].get(k, [None] * len(b["prompts"]))]
            for k in batches[0]["columns"]
        }
        ids = [c for b in batches for c in (b["completion_ids"] or [None] * len(b["prompts"]))]
        true_fns = self.true_fn if isinstance(self.true_fn, Mapping) else {"true_fn": self.true_fn}
        trues = {}
        for name, true_fn in true_fns.items():
            values = true_fn(
                prompts=prompts, completions=completions, completion_ids=ids, trainer_state=state, **columns
            )
            trues[name] = np.array([np.nan if t is None else float(t) for t in values])
            if len(trues[name]) != len(prompts):
                where = "true_fn" if name == "true_fn" else f"true_fn[{name!r}]"
                raise ValueError(f"{where} returned {len(trues[name])} scores for {len(prompts)} completions")
        group = args.num_generations_eval or args.num_generations
        if len(prompts) % group or any(
            prompts[i] != prompts[i + j] for i in range(0, len(prompts), group) for j in range(group)
        ):
            raise ValueError(
                f"this process did not get whole groups of {group} completions per prompt: set "
                "per_device_eval_batch_size to a multiple of num_generations_eval"
            )
        texts = None
        if self.log_texts:
            texts = (
                [as_text(prompts[i]) for i in range(0, len(prompts), group)],
                [[as_text(c) for c in completions[i : i + group]] for i in range(0, len(completions), group)],
            )
        if members:
            proxy_out: Any = {name: values.reshape(-1, group) for name, values in members.items()}
        else:
            proxy_out = proxy.reshape(-1, group)
        if isinstance(self.true_fn, Mapping):
            true_out: Any = {name: values.reshape(-1, group) for name, values in trues.items()}
        else:
            true_out = trues["true_fn"].reshape(-1, group)
        return proxy_out, true_out, texts

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
