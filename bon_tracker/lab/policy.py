"""The lab's policy: a tiny GPT-2 over a word-level tokenizer built in code (no download).

Completions are exactly ``COMPLETION_LENGTH`` words of :data:`~bon_tracker.lab.gold.WORDS`;
the special tokens are masked out of every next-word distribution (policy and reference
alike), so log-probabilities and KL are over the same support.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bon_tracker.lab.gold import (
    BAD_WORDS,
    COMPLETION_LENGTH,
    GOOD_WORDS,
    NEUTRAL_WORDS,
    PROMPT_LENGTH,
    SPECIAL_TOKENS,
    WORDS,
    gold_from_counts,
)
from bon_tracker.optional import require

torch = require("torch", "lab")
transformers = require("transformers", "lab")

VOCAB = SPECIAL_TOKENS + WORDS  # token id = position here
WORD_OFFSET = len(SPECIAL_TOKENS)  # token id of WORDS[0]
PROMPT_IDS = np.arange(WORD_OFFSET + len(GOOD_WORDS) + len(BAD_WORDS), len(VOCAB))  # prompts use neutral words
assert len(PROMPT_IDS) == len(NEUTRAL_WORDS)


def build_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is exactly :data:`VOCAB` (whitespace words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]"
    )


def build_policy(seed: int, *, n_embd: int = 32, n_layer: int = 2) -> Any:
    """A randomly initialised GPT-2 (its next-word distributions start close to uniform)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(VOCAB),
        n_positions=PROMPT_LENGTH + COMPLETION_LENGTH + 1,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def random_prompts(count: int, rng: np.random.Generator) -> Any:
    """``count`` prompts of ``PROMPT_LENGTH`` neutral words, as a (count, PROMPT_LENGTH) id tensor."""
    return torch.as_tensor(rng.choice(PROMPT_IDS, size=(count, PROMPT_LENGTH)), dtype=torch.long)


def _word_log_probs(logits: Any) -> Any:
    """Log-probabilities over :data:`WORDS` only (the special tokens masked out)."""
    return torch.log_softmax(logits[..., WORD_OFFSET:], dim=-1)


@torch.no_grad()
def sample(model: Any, prompts: Any, generator: Any) -> Any:
    """Completions (word indices into :data:`WORDS`, shape (M, COMPLETION_LENGTH)) sampled from ``model``."""
    cache = None
    step_input = prompts
    words = []
    for _ in range(COMPLETION_LENGTH):
        out = model(input_ids=step_input, cache=cache, use_cache=True)
        cache = out.cache
        probs = torch.softmax(out.logits[:, -1, WORD_OFFSET:], dim=-1)
        word = torch.multinomial(probs, 1, generator=generator)
        words.append(word)
        step_input = word + WORD_OFFSET
    return torch.cat(words, dim=1)


def completion_log_probs(model: Any, prompts: Any, words: Any) -> Any:
    """Per-position log-distributions over WORDS for each completion word: (M, COMPLETION_LENGTH, len(WORDS))."""
    ids = torch.cat([prompts, words + WORD_OFFSET], dim=1)
    logits = model(input_ids=ids).logits[:, PROMPT_LENGTH - 1 : -1]
    return _word_log_probs(logits)


def sequence_kl(log_p: Any, log_ref: Any) -> Any:
    """KL(policy || reference) of each completion's next-word distributions, summed over positions.

    Averaged over completions sampled from the policy this is an unbiased estimate of the
    KL of the whole completion distribution (the chain rule of KL), with less variance than
    the sampled log-ratio.
    """
    return (log_p.exp() * (log_p - log_ref)).sum(dim=(-1, -2))


def word_counts(words: np.ndarray) -> np.ndarray:
    """Counts of each of :data:`WORDS` in each completion: (M, len(WORDS)) floats."""
    words = np.asarray(words)
    counts = np.zeros((words.shape[0], len(WORDS)))
    np.add.at(counts, (np.repeat(np.arange(words.shape[0]), words.shape[1]), words.ravel()), 1.0)
    return counts


def gold_of_words(words: np.ndarray) -> np.ndarray:
    """Gold reward of completions given as word indices (the same rubric as ``gold_reward``)."""
    counts = word_counts(words)
    good = counts[:, : len(GOOD_WORDS)]
    bad = counts[:, len(GOOD_WORDS) : len(GOOD_WORDS) + len(BAD_WORDS)].sum(axis=1)
    return gold_from_counts(good, bad)


def words_to_text(words: np.ndarray) -> list[str]:
    """Completions as space-separated strings."""
    return [" ".join(WORDS[i] for i in row) for row in np.asarray(words)]
