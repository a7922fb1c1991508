"""TRL GRPOTrainer: best-of-n curves from the groups the trainer already samples at eval.

Builds a tiny GPT-2 and tokenizer on the spot (no download) and trains it with GRPO on
two reward functions (the proxy the trainer optimizes: a "good"-word counter and a length
bonus, weighted 1.0 and 0.5). At each evaluation GRPO samples ``num_generations_eval``
completions per eval prompt and scores them; the adapter reuses exactly those groups and
scores them once more with a true reward the trainer never sees. About a minute on a CPU:

    python examples/trl_example.py [--steps 12] [--root examples/output]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from bon_tracker.integrations.trl import BonTrackerCallback
from bon_tracker.reports.text import curve_table, where_to_look

WORDS = "a good answer is short the cat sat on mat tell me story about weather today say something nice long road"
PROMPTS = ["tell me", "the cat", "a good", "the weather", "say", "a long"]


def save_tiny_model(folder: Path) -> None:
    """A 2-layer GPT-2 with a word-level tokenizer, saved where GRPO can load it (and its reference copy)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, **ids)).save_pretrained(folder)
    tok.save_pretrained(folder)


def good_words(prompts, completions, **kwargs):
    """Proxy part 1: counts "good"."""
    return [float(c.split().count("good")) for c in completions]


def length_bonus(prompts, completions, **kwargs):
    """Proxy part 2: pays for length (the exploitable part)."""
    return [0.2 * len(c.split()) for c in completions]


def gold(prompts, completions, **kwargs):
    """The true reward: "good" counts, rambling past three words costs. Never optimized."""
    return [c.split().count("good") - 0.3 * max(0, len(c.split()) - 3) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--root", default=str(Path(__file__).parent / "output"), help="folder for local runs")
    args = parser.parse_args()
    root = Path(args.root).resolve()
    save_tiny_model(root / "trl-tiny-model")

    bon = BonTrackerCallback(reward_funcs=[good_words, length_bonus], true_fn=gold, root=root, run_name="trl")
    config = GRPOConfig(
        output_dir=str(root / "trl-trainer"),
        max_steps=args.steps,
        learning_rate=1e-2,
        per_device_train_batch_size=8,
        num_generations=8,
        num_generations_eval=8,  # N of best-of-n
        per_device_eval_batch_size=16,  # a multiple of num_generations_eval: whole groups per process
        max_completion_length=8,
        reward_weights=[1.0, 0.5],  # the proxy is 1.0 * good_words + 0.5 * length_bonus
        beta=0.05,  # > 0: TRL logs the KL to the reference policy (the RL point of the charts)
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 4),
        eval_on_start=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=str(root / "trl-tiny-model"),
        reward_funcs=bon.reward_funcs,  # the same functions, seen by the adapter at eval
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        callbacks=[bon],
    )
    trainer.train()

    for record in bon.tracker.history:
        c = record.curve
        print(f"step {record.step:3d}  true@1 {c.true_mean[0]:+.2f} true@{c.N} {c.true_mean[-1]:+.2f}  "
              f"proxy@1 {c.proxy_mean[0]:+.2f} proxy@{c.N} {c.proxy_mean[-1]:+.2f}")  # fmt: skip
    print("\n" + curve_table(bon.tracker.history[-1]))
    print()
    print("\n".join(where_to_look(bon.tracker.backend)))


if __name__ == "__main__":
    main()
