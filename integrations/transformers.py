"""Hugging Face ``Trainer``: best-of-n curves at every evaluation, in the run the Trainer reports to.

>>> callback = BonTrackerCallback(prompts=["Tell me a joke"], proxy_fn=len_score, true_fn=gold_score,
...                               num_samples=16, backend="mlflow")  # doctest: +SKIP
>>> Trainer(model, args, ..., callbacks=[callback]).train()  # doctest: +SKIP

The Trainer adds its reporting callbacks (``report_to``) before the user's, and
bon_tracker's backends open their run lazily at the first eval, attaching to the active
MLflow run or ``wandb.run``: so with ``backend="mlflow"`` next to ``report_to="mlflow"``
the curves go into the Trainer's own run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from bon_tracker.optional import require
from bon_tracker.tracking.tracker import BonTracker

from ._sampling import sample_completions
from ._trainer import KL_KEYS, TrainerTracking

transformers = require("transformers", "transformers")

ScoreFn = Callable[[list[str], list[str]], Sequence[float] | Mapping[str, Sequence[float]]]


def _per_prompt(values: Any, shape: tuple[int, int], name: str) -> Any:
    """One score per completion, prompt-major -> a ``(prompts, samples)`` block (tensors stay tensors)."""
    if len(values) != shape[0] * shape[1]:
        raise ValueError(
            f"{name} returned {len(values)} scores for {shape[0] * shape[1]} completions: "
            "return one float per completion"
        )
    if hasattr(values, "reshape"):  # torch tensors (any device) and numpy arrays
        return values.reshape(shape)
    return np.asarray(values, dtype=float).reshape(shape)


def _scores(values: Any, shape: tuple[int, int], name: str) -> Any:
    """A score function's result as ``(prompts, samples)`` blocks: one, or ``{name: block}`` for a
    mapping (several reward models: an ensemble; several true rewards)."""
    if isinstance(values, Mapping):
        return {key: _per_prompt(v, shape, f"{name}[{key!r}]") for key, v in values.items()}
    return _per_prompt(values, shape, name)


class BonTrackerCallback(TrainerTracking):
    """Samples completions at each evaluation and logs their best-of-n curves.

    Args:
        tracker: a :class:`BonTracker`; by default one is built from ``tracker_kwargs``.
        prompts: the eval prompts (the same list on every process; each samples its share).
        proxy_fn: ``(prompts, completions) -> one float per completion``, the reward
            being optimized; called once per eval with every sample (batched). Or a mapping
            ``{member: one float per completion}``: several reward models, an ensemble selected
            by the tracker's ``selection_rule`` (docs/selection.md).
        true_fn: same signature, the reward you actually care about (a mapping: several true
            rewards, every selection statistic per true reward).
        num_samples: completions sampled per prompt (N of best-of-n).
        generation_kwargs: passed to ``model.generate`` (default: sampling, 32 new tokens).
        tokenizer: default: the Trainer's ``processing_class``.
        batch_size: prompts per ``generate`` call.
        kl_keys: log keys holding the policy's KL to its reference; the latest value is
            recorded with the next eval as the RL point.
        stop_on_alert: stop training (``control.should_training_stop``) when an alert starts:
            True for any rule, or a list of rule names (e.g. ``["goodhart_kl"]``).
        on_alert: called with each :class:`~bon_tracker.core.Alert` at its onset.
        eval_every: compute curves only at evaluations whose global step is a multiple of
            this (default: ``eval_every`` of the config, ``BON_TRACKER_EVAL_EVERY``, else 1:
            every evaluation the Trainer runs).
        log_texts: pass the prompts and the sampled completions to the tracker, for the hack
            table (docs/texts.md: they go to the tracking service, as TRL's ``log_completions``
            does); False: only scores leave the process.
        **tracker_kwargs: options of :class:`BonTracker` (``backend="mlflow"``, ``root=...``,
            ``alerts={"fall_z": 2.5}`` or ``alerts=False``).
    """

    def __init__(
        self,
        tracker: BonTracker | None = None,
        *,
        prompts: Sequence[str],
        proxy_fn: ScoreFn,
        true_fn: ScoreFn,
        num_samples: int,
        generation_kwargs: dict[str, Any] | None = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        kl_keys: Sequence[str] = KL_KEYS,
        stop_on_alert: bool | Sequence[str] = False,
        on_alert: Callable[[Any], Any] | None = None,
        eval_every: int | None = None,
        log_texts: bool = True,
        **tracker_kwargs: Any,
    ):
        if eval_every is not None:
            tracker_kwargs["eval_every"] = eval_every
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a non-empty list of strings")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if not (callable(proxy_fn) and callable(true_fn)):
            raise TypeError("proxy_fn and true_fn must be callables (prompts, completions) -> list of floats")
        super().__init__(
            tracker, kl_keys, tracker_kwargs, stop_on_alert=stop_on_alert, on_alert=on_alert, log_texts=log_texts
        )
        self.prompts = list(prompts)
        self.proxy_fn, self.true_fn = proxy_fn, true_fn
        self.num_samples = num_samples
        self.generation_kwargs = dict(generation_kwargs or {})
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def eval_scores(self, args, state, model=None, processing_class=None, **kwargs):
        tokenizer = self.tokenizer if self.tokenizer is not None else processing_class
        if isinstance(tokenizer, transformers.ProcessorMixin):
            tokenizer = tokenizer.tokenizer
        if tokenizer is None:
            raise ValueError("no tokenizer: pass tokenizer= to BonTrackerCallback or processing_class= to the Trainer")
        prompts = self.prompts[args.process_index :: args.world_size]  # this process's share
        if not prompts:
            raise ValueError(
                f"{len(self.prompts)} prompts cannot be shared by {args.world_size} processes: "
                "pass at least one prompt per process"
            )
        completions = sample_completions(
            model,
            tokenizer,
            prompts,
            self.num_samples,
            generation_kwargs=self.generation_kwargs,
            batch_size=self.batch_size,
        )
        repeated = [p for p in prompts for _ in range(self.num_samples)]
        shape = (len(prompts), self.num_samples)
        texts = (prompts, [completions[i * self.num_samples : (i + 1) * self.num_samples] for i in range(len(prompts))])
        return (
            _scores(self.proxy_fn(repeated, completions), shape, "proxy_fn"),
            _scores(self.true_fn(repeated, completions), shape, "true_fn"),
            texts,
        )
