"""The TRL adapter on a real GRPOTrainer with a tiny GPT-2 built on the spot.

The curves must be those of the groups the trainer itself sampled and scored at eval:
the proxy is the trainer's weighted reward (its own logged ``eval_reward`` is the n = 1
point), the true reward is scored on the same completions and never optimized.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from bon_tracker import bon_curve  # noqa: E402
from bon_tracker.backends.local import read_records  # noqa: E402
from bon_tracker.integrations.trl import BonTrackerCallback  # noqa: E402
from tests.tiny_models import PROMPTS, proxy_reward, tiny_gpt2, tiny_tokenizer, true_reward  # noqa: E402

G = 4
WEIGHTS = [1.0, 0.5]


def likes_good(prompts, completions, **kwargs):
    return proxy_reward(prompts, completions)


async def brevity(prompts, completions, **kwargs):  # async reward functions are wrapped as async
    return [-0.05 * len(c.split()) for c in completions]


class Logs(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_grpo_eval_groups_become_curves(tmp_path):
    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"  # GRPO with beta > 0 loads its reference policy from a path
    tiny_gpt2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    gold_calls = []

    def gold(prompts, completions, **kwargs):
        gold_calls.append((list(prompts), list(completions), kwargs))
        return true_reward(prompts, completions)

    bon = BonTrackerCallback(reward_funcs=[likes_good, brevity], true_fn=gold, root=tmp_path / "runs", run_name="grpo")
    logs = Logs()
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=G,
        num_generations=G,
        num_generations_eval=G,
        per_device_eval_batch_size=2 * G,
        max_completion_length=6,
        beta=0.1,
        reward_weights=WEIGHTS,
        eval_strategy="steps",
        eval_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=bon.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS, "topic": [f"t{i}" for i in range(len(PROMPTS))]}),
        processing_class=tokenizer,
        callbacks=[bon, logs],
    )
    trainer.train()

    records = read_records(tmp_path / "runs" / "grpo")
    assert [r.step for r in records] == [1, 2]  # the trainer's eval steps
    assert len(gold_calls) == 2  # only at evaluations: never during training steps
    eval_logs = [entry for step, entry in logs.logs if "eval_reward" in entry]
    for record, (prompts, completions, kwargs), entry in zip(records, gold_calls, eval_logs, strict=True):
        # whole groups of G completions per eval prompt, with the dataset's columns
        assert sorted(prompts) == sorted(p for p in PROMPTS for _ in range(G))
        assert all(len(set(prompts[i : i + G])) == 1 for i in range(0, len(prompts), G))
        assert kwargs["topic"] == [f"t{PROMPTS.index(p)}" for p in prompts]
        assert len(kwargs["completion_ids"]) == len(completions)
        proxy = WEIGHTS[0] * np.array(likes_good(prompts, completions)) + WEIGHTS[1] * -0.05 * np.array(
            [len(c.split()) for c in completions]
        )
        expected = bon_curve(proxy.reshape(-1, G), np.array(true_reward(prompts, completions)).reshape(-1, G))
        np.testing.assert_allclose(record.curve.true_mean, expected.true_mean)
        np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean)
        np.testing.assert_allclose(record.curve.kl, expected.kl)
        # n = 1 is the policy itself: the trainer's own mean reward; KL per completion
        assert record.policy.proxy_mean == pytest.approx(entry["eval_reward"], rel=1e-5)
        assert record.policy.kl == pytest.approx(entry["eval_kl"] * entry["eval_completions/mean_length"])
    # the trainer still sees its reward functions by name, and no true reward
    assert "rewards/likes_good/mean" in logs.logs[0][1] and "rewards/brevity/mean" in logs.logs[0][1]
    assert not any(key.startswith(("rewards/gold", "eval_rewards/gold")) for _, entry in logs.logs for key in entry)


def test_grpo_reward_functions_as_ensemble_members(tmp_path):
    """proxy_keys names the reward functions that are members (raw rewards, not the weighted sum);
    several true rewards; the record's curve is the deployed rule's (uwo), its selection every member's."""
    from bon_tracker.core.selection import rule_scores, selection_input

    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_gpt2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    scored = []

    def gold(prompts, completions, **kwargs):
        scored.append((list(prompts), list(completions)))
        return true_reward(prompts, completions)

    def verifier(prompts, completions, **kwargs):
        return [float(t > 0) for t in true_reward(prompts, completions)]

    bon = BonTrackerCallback(
        reward_funcs=[likes_good, brevity],
        true_fn={"gold": gold, "verifier": verifier},
        proxy_keys=["likes_good", "brevity"],
        root=tmp_path / "runs",
        run_name="grpo",
        selection_rule="uwo",
        selection={"n_resamples": 50},
        charts=False,
    )
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        per_device_train_batch_size=G,
        num_generations=G,
        num_generations_eval=G,
        per_device_eval_batch_size=2 * G,
        max_completion_length=6,
        reward_weights=WEIGHTS,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=bon.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        callbacks=[bon],
    )
    trainer.train()
    (record,) = read_records(tmp_path / "runs" / "grpo")
    ((prompts, completions),) = scored
    members = {
        "likes_good": np.array(likes_good(prompts, completions)).reshape(-1, G),
        "brevity": np.array([-0.05 * len(c.split()) for c in completions]).reshape(-1, G),
    }
    trues = {
        "gold": np.array(true_reward(prompts, completions)).reshape(-1, G),
        "verifier": np.array(verifier(prompts, completions)).reshape(-1, G),
    }
    expected = bon_curve(rule_scores(selection_input(members, trues), "uwo"), trues["gold"])
    np.testing.assert_allclose(record.curve.true_mean, expected.true_mean)
    np.testing.assert_allclose(record.curve.proxy_mean, expected.proxy_mean)
    assert record.selection.member_names == ("likes_good", "brevity")
    assert record.selection.true_names == ("gold", "verifier")
    assert record.selection.get("likes_good", "verifier").true_name == "verifier"


def test_proxy_keys_must_name_reward_functions():
    with pytest.raises(ValueError, match=r"proxy_keys \['rm'\] are not reward functions.*'likes_good', 'brevity'"):
        BonTrackerCallback(reward_funcs=[likes_good, brevity], true_fn=likes_good, proxy_keys=["rm"], backend="local")
    with pytest.raises(TypeError, match="not both"):
        BonTrackerCallback(reward_funcs=[likes_good], true_fn=likes_good, proxy_keys="a", proxy_key="a")
