"""The reward-KL frontier over selection rules: the best rule at each KL budget.

Every rule (an ensemble aggregate, under best-of-n, Best-of-Poisson or soft best-of-n) traces
points ``(KL from the base, expected true reward)`` over its parameter. At a KL budget, the
best choice is the point with the highest true reward among those whose KL is within the
budget. Points of a family share one KL definition (core/kl.py for best-of-n, core/poisson.py
for Best-of-Poisson, the sample KL of core/soft_bon.py for soft best-of-n; docs/selection.md
says how they compare), and ``families`` restricts the frontier to chosen families.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class FrontierPoint:
    """One point of one rule's curve: ``rule`` (aggregate), ``family``, ``parameter`` value, KL, true."""

    rule: str
    family: str
    value: float
    kl: float
    true_mean: float
    true_se: float

    def to_dict(self) -> dict:
        return asdict(self)


def kl_budgets(points: Sequence[FrontierPoint], count: int = 16) -> np.ndarray:
    """0 and ``count - 1`` geometric budgets up to the largest finite KL of the points.

    >>> kl_budgets([FrontierPoint("a", "bon", 1, 0.0, 0, 0), FrontierPoint("a", "bon", 2, 1.0, 1, 0)], 3).tolist()
    [0.0, 0.1, 1.0]
    """
    kls = np.array([p.kl for p in points if math.isfinite(p.kl)])
    top = float(kls.max()) if kls.size else 0.0
    if top <= 0 or count < 2:
        return np.array([0.0])
    return np.concatenate([[0.0], np.geomspace(top / 10.0, top, count - 1)])


def best_at_budgets(
    points: Sequence[FrontierPoint], budgets: object, families: Sequence[str] | None = None
) -> list[FrontierPoint | None]:
    """The highest-true point with ``kl <= budget`` for each budget (None where no point fits).

    Example:
        >>> pts = [FrontierPoint("a", "bon", 1, 0.0, 0.0, 0.1), FrontierPoint("a", "bon", 4, 0.6, 0.5, 0.1),
        ...        FrontierPoint("b", "bon", 4, 0.6, 0.7, 0.1)]
        >>> [p.rule for p in best_at_budgets(pts, [0.0, 1.0])]
        ['a', 'b']
    """
    chosen = [p for p in points if (families is None or p.family in families) and math.isfinite(p.true_mean)]
    out: list[FrontierPoint | None] = []
    for budget in np.atleast_1d(np.asarray(budgets, dtype=np.float64)):
        fits = [p for p in chosen if p.kl <= budget + 1e-12]
        out.append(max(fits, key=lambda p: p.true_mean) if fits else None)
    return out
