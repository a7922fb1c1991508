"""Sampling N completions per prompt from a Hugging Face model, for an eval step."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bon_tracker.optional import require

torch = require("torch", "transformers")


def _left_padded(tokenizer: Any, prompts: Sequence[str], device: Any) -> tuple[Any, Any]:
    """Token ids and attention mask, padded on the left so every prompt ends where generation starts.

    Padded by hand (pad token, else eos) so that a tokenizer without a pad token works
    and the user's tokenizer is never modified.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    rows = tokenizer(list(prompts))["input_ids"]
    width = max(len(row) for row in rows)
    ids = [[pad_id] * (width - len(row)) + list(row) for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def sample_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    *,
    generation_kwargs: dict[str, Any] | None = None,
    batch_size: int = 8,
) -> list[str]:
    """``num_samples`` sampled completions for each prompt, grouped by prompt (prompt-major).

    The model is put in eval mode (no dropout: we measure the policy itself) and sampled
    under ``torch.no_grad``; its previous mode is restored afterwards, even on error.
    ``batch_size`` prompts are sampled per ``generate`` call.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = {"do_sample": True, "max_new_tokens": 32, "pad_token_id": pad_id, **(generation_kwargs or {})}
    options["num_return_sequences"] = num_samples
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    was_training = model.training
    model.eval()
    completions: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(prompts), batch_size):
                input_ids, attention_mask = _left_padded(tokenizer, prompts[start : start + batch_size], model.device)
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **options)
                new_tokens = output if encoder_decoder else output[:, input_ids.shape[1] :]
                completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return completions
