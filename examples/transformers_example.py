"""Hugging Face Trainer: ``BonTrackerCallback`` samples, scores and logs at every evaluation.

Builds a tiny GPT-2 and a word-level tokenizer on the spot (no download), trains it on a
few sentences, and at each evaluation samples N completions per eval prompt from the
model being trained, scores them with a proxy reward (likes "good" and long answers) and
a true reward (likes "good", dislikes rambling), and logs the best-of-n curves at the
Trainer's global step. About a minute on a CPU:

    python examples/transformers_example.py [--steps 40] [--root examples/output]

``--mlflow`` reports the Trainer to MLflow (``report_to="mlflow"``) and puts the curves
into that same run (``sqlite:///examples/output/mlflow.db``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)

from bon_tracker.integrations.transformers import BonTrackerCallback
from bon_tracker.reports.text import curve_table, where_to_look

SENTENCES = [
    "a good answer is short",
    "a good dog is a good friend",
    "the weather is good today",
    "tell me a good story about a cat",
    "the cat sat on the mat and looked at the long long road",
    "say something nice and good",
]
EVAL_PROMPTS = ["tell me", "the cat", "a good", "the weather", "say"]


def tiny_model() -> tuple[GPT2LMHeadModel, PreTrainedTokenizerFast]:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")
    torch.manual_seed(0)
    ids = {"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, **ids)
    return GPT2LMHeadModel(config), tok


def proxy_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A naive reward model: counts "good" and pays for length."""
    return [c.split().count("good") + 0.1 * len(c.split()) for c in completions]


def true_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """What we want: "good", without rambling past four words."""
    return [c.split().count("good") - 0.3 * max(0, len(c.split()) - 4) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--root", default=str(Path(__file__).parent / "output"), help="folder for local runs")
    parser.add_argument("--mlflow", action="store_true", help="report to MLflow; curves go into the Trainer's run")
    args = parser.parse_args()
    root = Path(args.root).resolve()

    model, tokenizer = tiny_model()
    data = Dataset.from_dict({"text": SENTENCES * 8})
    data = data.map(lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"])
    if args.mlflow:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        tracking = {"backend": "mlflow"}  # attaches to the run the Trainer's MLflowCallback starts
    else:
        tracking = {"root": root, "run_name": "transformers"}
    callback = BonTrackerCallback(
        prompts=EVAL_PROMPTS,
        proxy_fn=proxy_reward,
        true_fn=true_reward,
        num_samples=16,
        generation_kwargs={"max_new_tokens": 10},
        **tracking,
    )
    training = TrainingArguments(
        output_dir=str(root / "transformers-trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        eval_strategy="steps",
        eval_steps=max(1, args.steps // 8),
        logging_steps=max(1, args.steps // 8),
        save_strategy="no",
        report_to=["mlflow"] if args.mlflow else "none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=data,
        eval_dataset=data.select(range(8)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,  # the callback samples with the Trainer's tokenizer
        callbacks=[callback],
    )
    trainer.train()

    print("\n" + curve_table(callback.tracker.history[-1]))
    print()
    print("\n".join(where_to_look(callback.tracker.backend)))
    if args.mlflow:
        print("  (one run: the Trainer's metrics and the curves together)")


if __name__ == "__main__":
    main()
