"""The lab's proxy reward model: a bag-of-words MLP trained on K noisy gold labels.

The labels are gold rewards of completions sampled from the *initial* policy, plus Gaussian
noise (``label_noise``, in gold units): what a reward model trained on human comparisons of
the base model's outputs sees. Ensembles train each member on a bootstrap resample of the
same labels from its own initialisation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bon_tracker.lab.gold import WORDS
from bon_tracker.lab.policy import word_counts
from bon_tracker.optional import require

torch = require("torch", "lab")


class BagOfWordsReward(torch.nn.Module):
    """score(c) = MLP(counts of each word in c): one hidden ReLU layer of ``hidden`` units."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(len(WORDS), hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, counts: Any) -> Any:
        return self.net(counts).squeeze(-1)


def train_proxy(
    words: np.ndarray,
    labels: np.ndarray,
    *,
    hidden: int,
    seed: int,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
) -> BagOfWordsReward:
    """Fit one proxy by full-batch Adam on the squared error to ``labels``."""
    torch.manual_seed(seed)
    model = BagOfWordsReward(hidden)
    x = torch.as_tensor(word_counts(words), dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        optimizer.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def train_ensemble(
    words: np.ndarray, labels: np.ndarray, *, members: int, hidden: int, seed: int
) -> dict[str, BagOfWordsReward]:
    """``members`` proxies by name: one on all labels, or each on a bootstrap resample of them."""
    if members == 1:
        return {"proxy": train_proxy(words, labels, hidden=hidden, seed=seed)}
    rng = np.random.default_rng(seed)
    out = {}
    for m in range(members):
        pick = rng.integers(0, len(labels), len(labels))
        out[f"member_{m}"] = train_proxy(words[pick], labels[pick], hidden=hidden, seed=seed * 1000 + m)
    return out


@torch.no_grad()
def member_scores(proxies: dict[str, BagOfWordsReward], words: np.ndarray) -> dict[str, np.ndarray]:
    """Each member's score of each completion (word indices), as float64 arrays."""
    x = torch.as_tensor(word_counts(words), dtype=torch.float32)
    return {name: model(x).double().numpy() for name, model in proxies.items()}
