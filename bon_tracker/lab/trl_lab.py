"""The lab through TRL: GRPOTrainer against the proxy, tracked by ``bon_tracker.integrations.trl``.

Exactly what a user does: the proxy is a TRL reward function, the gold rubric is the
callback's ``true_fn``, and the callback logs the curves of the groups GRPO samples at each
evaluation. Slower than :mod:`bon_tracker.lab.loop` (TRL's generation and bookkeeping) and
not the benchmark's path; its ``beta`` is TRL's per-token KL coefficient on group-normalised
advantages, so ``kl_coef`` does not mean the same penalty as in the plain loop.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bon_tracker.lab.gold import COMPLETION_LENGTH, WORDS, gold_reward
from bon_tracker.lab.loop import LabConfig, LabEval, LabResult, ProxyScorer, initial_labels, local_run_dir
from bon_tracker.lab.policy import VOCAB, build_policy, build_tokenizer, gold_of_words, random_prompts, sample
from bon_tracker.lab.proxy import train_ensemble
from bon_tracker.optional import require

torch = require("torch", "lab")
require("trl", "lab")

_WORD_INDEX = {w: i for i, w in enumerate(WORDS)}


def _text(completion: Any) -> str:
    return completion if isinstance(completion, str) else completion[-1]["content"]


@torch.no_grad()
def _proxy_of_texts(proxy: ProxyScorer, completions: list[Any]) -> np.ndarray:
    """The members' mean score of completion texts (words outside WORDS count as nothing:
    TRL's completions may end early or hold a special token)."""
    counts = np.zeros((len(completions), len(WORDS)))
    for i, completion in enumerate(completions):
        for word in _text(completion).split():
            if word in _WORD_INDEX:
                counts[i, _WORD_INDEX[word]] += 1
    x = torch.as_tensor(counts, dtype=torch.float32)
    return np.mean([model(x).double().numpy() for model in proxy.members.values()], axis=0)


def run_trl_lab(
    config: LabConfig,
    *,
    progress: Callable[[str], None] | None = None,
    prompts: int = 8,
    **tracker_kwargs: Any,
) -> LabResult:
    """Train the lab's policy with TRL's GRPOTrainer; the callback logs each evaluation's curves.

    Args:
        config: the lab's settings (``steps_per_eval`` is GRPO's ``eval_steps``).
        progress: called with one line per eval.
        prompts: eval prompts (each sampled ``config.samples`` times by GRPO at eval).
        **tracker_kwargs: options of :class:`~bon_tracker.BonTracker` for the callback.
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bon_tracker.integrations.trl import BonTrackerCallback

    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    tokenizer = build_tokenizer()
    policy = build_policy(config.seed)
    policy.eval()
    label_words, labels = initial_labels(policy, config, rng, generator)
    proxy = ProxyScorer(
        train_ensemble(label_words, labels, members=config.ensemble, hidden=config.proxy_size, seed=config.seed)
    )
    check_words = sample(policy, random_prompts(2048, rng), generator).numpy()
    check = gold_of_words(check_words)
    r2 = float(1 - np.sum((proxy(check_words) - check) ** 2) / np.sum((check - check.mean()) ** 2))

    def proxy_reward(prompts, completions, **kwargs):
        return _proxy_of_texts(proxy, completions).tolist()

    def gold(prompts, completions, **kwargs):
        return gold_reward([_text(c) for c in completions]).tolist()

    def text_prompts(count: int) -> list[str]:
        return [" ".join(VOCAB[i] for i in row) for row in random_prompts(count, rng).tolist()]

    bon = BonTrackerCallback(reward_funcs=[proxy_reward], true_fn=gold, **tracker_kwargs)
    with tempfile.TemporaryDirectory(prefix="bon-lab-trl-") as tmp:
        policy.save_pretrained(f"{tmp}/model")  # GRPO with beta > 0 loads its reference from a path
        tokenizer.save_pretrained(f"{tmp}/model")
        args = GRPOConfig(
            output_dir=f"{tmp}/out",
            max_steps=(config.evals - 1) * config.steps_per_eval,
            learning_rate=config.lr,
            per_device_train_batch_size=config.group * 2,
            num_generations=config.group,
            num_generations_eval=config.samples,
            per_device_eval_batch_size=config.samples * 2,
            max_completion_length=COMPLETION_LENGTH,
            beta=config.kl_coef,
            eval_strategy="steps",
            eval_steps=config.steps_per_eval,
            eval_on_start=True,
            logging_steps=config.steps_per_eval,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            seed=config.seed,
        )
        trainer = GRPOTrainer(
            model=f"{tmp}/model",
            reward_funcs=bon.reward_funcs,
            args=args,
            train_dataset=Dataset.from_dict({"prompt": text_prompts(64)}),
            eval_dataset=Dataset.from_dict({"prompt": text_prompts(prompts)}),
            processing_class=tokenizer,
            callbacks=[bon],
        )
        trainer.train()
    tracker = bon.tracker
    records = list(tracker.history)
    alerts = [a.to_dict() for a in tracker.alerts]
    tracker.finish()
    evals = []
    for record in records:
        curve = record.curve
        kl = record.policy.kl if record.policy is not None else math.nan
        evals.append(LabEval(
            step=record.step, policy_kl=float(kl),
            gold_mean=float(curve.true_mean[0]), gold_se=float(curve.true_se[0]),
            proxy_mean=float(curve.proxy_mean[0]), proxy_se=float(curve.proxy_se[0]),
            eval_gold_mean=float(curve.true_mean[0]), eval_proxy_mean=float(curve.proxy_mean[0]), example="",
        ))  # fmt: skip
        if progress is not None:
            progress(
                f"step {record.step:4d}  KL {kl:6.2f}  gold {curve.true_mean[0]:6.3f}  proxy {curve.proxy_mean[0]:6.3f}"
            )
    return LabResult(
        config, evals, alerts, tracker.backend.location, time.perf_counter() - started, r2, records,
        run_dir=local_run_dir(tracker),
    )  # fmt: skip
