"""verl: best-of-n curves of every validation, in the metrics verl's own loggers show.

verl's trainers end each validation in ``_val_metrics_update(data_sources, sample_uids,
reward_extra_infos_dict, ...)`` with every sample's scores at hand: ``reward`` (the proxy)
and the extra keys the reward function returns (e.g. ``gold``, the true reward). The
:class:`BonValidation` mixin groups the samples by ``uid`` (one prompt), logs the curves
with a :class:`BonTracker` and adds the ``bon/*`` scalars to the returned dict, so verl logs
them at its step to every logger it has (wandb, mlflow, tensorboard, swanlab, console, file).

``register()`` adds ``bon_<mode>`` next to each of verl's v1 trainer modes (``bon_sync``...):
select one with ``trainer.v1.trainer_mode=bon_sync``. It must run in verl's TaskRunner
actor; Ray's ``worker_process_setup_hook`` does that (the recipe is docs/verl.md)::

    python -m verl.trainer.main_ppo ... trainer.v1.trainer_mode=bon_sync +bon_tracker.true_key=gold \\
        +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=bon_tracker.integrations.verl.register

Options live in the ``bon_tracker`` section of verl's config: ``true_key`` (required),
``proxy_key`` (default ``reward``; a list of reward extra keys, ``[rm_a, rm_b]``, is an ensemble of
reward models selected by the tracker's ``selection_rule``, docs/selection.md; ``true_key`` may be a
list too: several true rewards; ``selection_rule``, ``selection``: as :class:`BonTracker`'s),
``log_texts`` (default true: each sample's ``input`` and
``output`` text, as verl hands them to its generations logger, go to the tracker for the hack
table, docs/texts.md; false: scores only), and any :func:`~bon_tracker.tracking.config.resolve_config`
key (``backend``, ``ns``, ``key_prefix``, ``mlflow: {...}``...). Without a ``backend``, the
curves' charts and tables go to the run of verl's own ``wandb`` or ``mlflow`` logger when it
has one, else to a local run folder. The legacy ``RayPPOTrainer`` takes the mixin directly:
``class MyTrainer(BonValidation, RayPPOTrainer)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bon_tracker.backends import BACKENDS
from bon_tracker.integrations._lifecycle import TRACKER_ONLY_OPTIONS
from bon_tracker.optional import require
from bon_tracker.tracking.config import resolve_config
from bon_tracker.tracking.tracker import BonTracker

verl_v1 = require("verl.trainer.ppo.v1", "verl")
omegaconf = require("omegaconf", "verl")

logger = logging.getLogger("bon_tracker")

MODE_PREFIX = "bon_"
_ADAPTER_KEYS = ("proxy_key", "true_key", "log_texts")


Keys = str | Sequence[str]


def score_keys(proxy_key: Keys, true_key: Keys) -> list[str]:
    """Every reward extra key read: the proxy's (one, or an ensemble's members), then the true rewards'."""
    keys = [proxy_key] if isinstance(proxy_key, str) else list(proxy_key)
    keys += [true_key] if isinstance(true_key, str) else list(true_key)
    if not keys or not all(isinstance(k, str) for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"bon_tracker.proxy_key and true_key must name distinct reward extra keys, got {keys}")
    return keys


def _kept(reward_extra_infos_dict: Mapping[str, Sequence[Any]], keys: list[str], i: int) -> list[Any] | None:
    """Sample ``i``'s values under ``keys``, or None when any is None (verl's padding for a key the
    reward function did not return for it)."""
    values = [reward_extra_infos_dict[k][i] for k in keys]
    return None if any(v is None for v in values) else values


def validation_scores(
    sample_uids: Sequence[Any], reward_extra_infos_dict: Mapping[str, Sequence[Any]], proxy_key: Keys, true_key: Keys
) -> tuple[Any, Any, int]:
    """Per-prompt ``(proxy rows, true rows, samples dropped)``: samples grouped by ``uid`` in order of
    first appearance; a sample whose proxy or true value is None (verl's padding for a key the reward
    function did not return for it) is dropped. A list of keys (an ensemble's members, several true
    rewards) gives ``{key: rows}``, and a sample is dropped where any of its keys is None."""
    keys = score_keys(proxy_key, true_key)
    lengths = {k: len(reward_extra_infos_dict[k]) for k in keys}
    if any(n != len(sample_uids) for n in lengths.values()):
        shown = " and ".join(f"{n} {k!r}" for k, n in lengths.items())
        raise ValueError(f"{len(sample_uids)} uids, {shown} values")
    groups: dict[Any, list[list[float]]] = {}
    dropped = 0
    for i, uid in enumerate(sample_uids):
        values = _kept(reward_extra_infos_dict, keys, i)
        if values is None:
            dropped += 1
            continue
        for row, value in zip(groups.setdefault(uid, [[] for _ in keys]), values):
            row.append(float(value))
    per_key = {k: [np.asarray(rows[j]) for rows in groups.values()] for j, k in enumerate(keys)}

    def rows_of(key: Keys) -> Any:
        return per_key[key] if isinstance(key, str) else {k: per_key[k] for k in key}

    return rows_of(proxy_key), rows_of(true_key), dropped


def validation_texts(
    sample_uids: Sequence[Any],
    inputs: Sequence[str],
    outputs: Sequence[str],
    reward_extra_infos_dict: Mapping[str, Sequence[Any]],
    proxy_key: Keys,
    true_key: Keys,
) -> tuple[list[str], list[list[str]]]:
    """``(prompts, completions)`` grouped as :func:`validation_scores` groups the scores: by ``uid`` in
    order of first appearance, a prompt's ``input`` text once, the ``output`` of each sample kept."""
    keys = score_keys(proxy_key, true_key)
    groups: dict[Any, tuple[str, list[str]]] = {}
    for i, (uid, text_in, text_out) in enumerate(zip(sample_uids, inputs, outputs)):
        if _kept(reward_extra_infos_dict, keys, i) is None:
            continue
        groups.setdefault(uid, (text_in, []))[1].append(text_out)
    return [prompt for prompt, _ in groups.values()], [rows for _, rows in groups.values()]


class BonValidation:
    """Mixin for a verl PPO trainer (v1 ``PPOTrainer`` subclasses and the legacy ``RayPPOTrainer``)."""

    base_mode: str | None = None  # the verl trainer mode a registered ``bon_<mode>`` class runs as
    _bon_tracker: BonTracker | None = None
    _bon_texts: tuple[list[str], list[str]] = ([], [])  # this validation's inputs and outputs, so far

    def __init__(self, *args: Any, **kwargs: Any):
        config = kwargs.get("config", args[0] if args else None)
        if self.base_mode is not None and config is not None:  # verl branches on the mode's own name
            with omegaconf.read_write(config), omegaconf.open_dict(config):
                config.trainer.v1.trainer_mode = self.base_mode
        super().__init__(*args, **kwargs)

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, *args, **kwargs):
        metrics = super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, *args, **kwargs)
        metrics.update(self.bon_metrics(sample_uids, reward_extra_infos_dict))
        return metrics

    def _maybe_log_val_generations(self, *args: Any, **kwargs: Any) -> Any:
        # verl hands every validation sample's input and output text here, in the order of
        # sample_uids, just before _val_metrics_update (twice when a validation is merged).
        inputs = kwargs["inputs"] if "inputs" in kwargs else (args[0] if args else None)
        outputs = kwargs["outputs"] if "outputs" in kwargs else (args[1] if len(args) > 1 else None)
        if inputs is not None and outputs is not None:
            self._bon_texts = (self._bon_texts[0] + list(inputs), self._bon_texts[1] + list(outputs))
        return super()._maybe_log_val_generations(*args, **kwargs)

    def fit(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().fit(*args, **kwargs)
        finally:
            if self._bon_tracker is not None:
                self._bon_tracker.finish()

    def bon_metrics(self, sample_uids: Sequence[Any], reward_extra_infos_dict: Mapping[str, Any]) -> dict[str, float]:
        """Log this validation's curves at ``self.global_steps``; their scalars for verl's metrics."""
        options = self._bon_options()
        proxy_key, true_key = options.pop("proxy_key", "reward"), options.pop("true_key", None)
        log_texts = options.pop("log_texts", True)
        if not isinstance(log_texts, bool):
            raise ValueError(f"bon_tracker.log_texts must be true or false, got {log_texts!r:.60}")
        (inputs, outputs), self._bon_texts = self._bon_texts, ([], [])
        missing = (
            [] if true_key is None else [k for k in score_keys(proxy_key, true_key) if k not in reward_extra_infos_dict]
        )
        if true_key is None or missing:
            logger.warning(
                "bon_tracker: no best-of-n curves: %s (the reward extra keys are %s); return the true reward "
                "from compute_score, e.g. {'score': proxy, 'gold': true}, and set +bon_tracker.true_key=gold",
                "bon_tracker.true_key is not set" if true_key is None else f"no {missing[0]!r} values",
                sorted(reward_extra_infos_dict),
            )
            return {}
        proxy, true, dropped = validation_scores(sample_uids, reward_extra_infos_dict, proxy_key, true_key)
        if not (proxy if isinstance(proxy, list) else next(iter(proxy.values()))):  # every sample dropped
            logger.warning("bon_tracker: no sample has every %r value at step %d", true_key, self.global_steps)
            return {}
        if self._bon_tracker is None:
            self._bon_tracker = BonTracker(**self._bon_tracker_kwargs(options))
        context: dict[str, Any] = {"samples_without_true": dropped} if dropped else {}
        if log_texts and len(inputs) == len(outputs) == len(sample_uids):
            prompts, completions = validation_texts(
                sample_uids, inputs, outputs, reward_extra_infos_dict, proxy_key, true_key
            )
            context.update(prompts=prompts, completions=completions)
        elif log_texts and inputs:
            logger.warning(
                "bon_tracker: %d input texts for %d validation samples at step %d: no texts this validation",
                len(inputs),
                len(sample_uids),
                self.global_steps,
            )
        if self._bon_tracker.log_scores(int(self.global_steps), proxy, true, **context) is None:
            return {}  # this step was logged already
        return self._bon_tracker.history[-1].scalars()

    def _bon_options(self) -> dict[str, Any]:
        section = self.config.get("bon_tracker", None)
        return {} if section is None else dict(omegaconf.OmegaConf.to_container(section, resolve=True))

    def _bon_tracker_kwargs(self, options: dict[str, Any]) -> dict[str, Any]:
        """Tracker options: the ``bon_tracker`` section; without a backend there (or in the environment or
        config file), the backend of verl's own ``wandb``/``mlflow`` logger, attached to its run."""
        own = {k: options.pop(k) for k in TRACKER_ONLY_OPTIONS if k in options}  # selection_rule, selection
        config = resolve_config(**options)
        if config.sources["backend"] == "default":
            verl_loggers = self.config.trainer.get("logger", None) or []
            verl_loggers = [verl_loggers] if isinstance(verl_loggers, str) else list(verl_loggers)
            ours = next((name for name in verl_loggers if name in BACKENDS and name != "local"), None)
            if ours is not None:
                config = resolve_config(**{**options, "backend": ours})
        kwargs = {**config.tracker_kwargs(), **own}
        if kwargs.get("run_name") is None:
            kwargs["run_name"] = self.config.trainer.get("experiment_name", None)
        return kwargs


def register() -> dict[str, type]:
    """Register ``bon_<mode>`` for each of verl's v1 trainer modes (safe to call again); returns them.

    The target of Ray's ``worker_process_setup_hook``, so it runs in verl's TaskRunner actor.
    """
    registry = verl_v1.trainer_base.TRAINER_REGISTRY
    for name, cls in list(registry.items()):
        if name.startswith(MODE_PREFIX) or issubclass(cls, BonValidation) or MODE_PREFIX + name in registry:
            continue
        doc = f"verl's {name!r} trainer with best-of-n curves at each validation (:class:`BonValidation`)."
        attrs = {"base_mode": name, "__module__": __name__, "__doc__": doc}
        verl_v1.register_trainer(MODE_PREFIX + name)(type(f"Bon{cls.__name__}", (BonValidation, cls), attrs))
    return {name: cls for name, cls in registry.items() if name.startswith(MODE_PREFIX)}
