"""Independent reference implementations by exhaustive enumeration with exact fractions.

Deliberately naive: every n-subset, every tie-break, no shared code with bon_tracker.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction


def bon_expected(proxy, score, n) -> Fraction:
    """E[score of best-of-n] over all n-subsets, ties in proxy broken uniformly at random."""
    total, count = Fraction(0), 0
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(proxy[i] for i in subset)
        winners = [i for i in subset if proxy[i] == best]
        total += Fraction(sum(Fraction(score[i]) for i in winners), len(winners))
        count += 1
    return total / count


def _cmp(a, b) -> Fraction:
    return Fraction(1) if a > b else (Fraction(1, 2) if a == b else Fraction(0))


def win_rate(proxy, score, n) -> Fraction:
    """P(score of best-of-n beats one other sample), over every (n+1)-subset and every
    choice of the base sample inside it; proxy ties broken uniformly at random; a tie
    in score counts one half."""
    total, count = Fraction(0), 0
    for subset in itertools.combinations(range(len(proxy)), n + 1):
        for base in subset:
            rest = [i for i in subset if i != base]
            best = max(proxy[i] for i in rest)
            winners = [i for i in rest if proxy[i] == best]
            total += sum(_cmp(score[i], score[base]) for i in winners) / len(winners)
            count += 1
    return total / count


def discrete_kl(proxy, n) -> float:
    """KL(best-of-n || empirical base) by enumerating all N^n draws with replacement."""
    N = len(proxy)
    levels = sorted(set(proxy))
    base = {y: Fraction(proxy.count(y), N) for y in levels}
    best = dict.fromkeys(levels, Fraction(0))
    for draw in itertools.product(range(N), repeat=n):
        best[max(proxy[i] for i in draw)] += Fraction(1, N**n)
    return sum(float(p) * math.log(float(p / base[y])) for y, p in best.items() if p > 0)


def pass_at_k(N: int, c: int, k: int) -> float:
    """Chen et al. 2021: 1 - C(N-c, k) / C(N, k)."""
    return 1.0 - math.comb(N - c, k) / math.comb(N, k)
