"""Tiny real models for the integration tests, built on the spot (no downloads).

A word-level tokenizer trained on a few sentences, a 1-layer GPT-2 with 32-dim
embeddings, a causal-LM dataset, and two deterministic reward functions: a proxy that
likes the word "good" and long answers, and a true reward that likes "good" but
dislikes length (so optimizing the proxy overshoots, as in Goodhart's law).
"""

from __future__ import annotations

SENTENCES = [
    "the cat sat on the mat",
    "a good dog is a happy dog",
    "the weather is good today",
    "bad news travels fast",
    "tell me a good story about a cat",
    "the model writes a short answer",
    "a long answer is not always a good answer",
    "say something nice",
]
PROMPTS = ["tell me", "the cat", "a good", "the weather"]


def tiny_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the words of ``SENTENCES`` with pad/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[EOS]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def tiny_gpt2(tokenizer, seed: int = 0, n_layer: int = 1):
    """A randomly initialised GPT-2 with 32-dim embeddings (about 10k parameters)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def lm_dataset(tokenizer, repeat: int = 4):
    """``SENTENCES`` tokenized for causal-LM training (a ``datasets.Dataset``)."""
    from datasets import Dataset

    return Dataset.from_dict({"text": SENTENCES * repeat}).map(
        lambda batch: tokenizer(batch["text"]), batched=True, remove_columns=["text"]
    )


def proxy_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Counts "good" and rewards length: what a naive reward model might do."""
    return [c.split().count("good") + 0.1 * len(c.split()) for c in completions]


def true_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Counts "good" but penalises rambling past three words."""
    return [c.split().count("good") - 0.2 * max(0, len(c.split()) - 3) for c in completions]


class RecordingScorer:
    """Wraps a score function and keeps every batch it returned, to recompute curves."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[tuple[list, list, list[float]]] = []

    def __call__(self, prompts, completions, **kwargs):
        scores = self.fn(prompts, completions)
        self.calls.append((list(prompts), list(completions), list(scores)))
        return scores
