"""The lab's words and its gold reward: the fixed rubric that plays the human.

A completion is ``COMPLETION_LENGTH`` words from a small vocabulary of good, bad and
neutral words. The gold reward is a programmatic rubric with diminishing returns::

    gold(c) = sum over good words w of h(count_w(c)) - BAD_PENALTY * (number of bad words)
    h(k) = k - REPEAT_COST * k * (k - 1)

so a good word helps (h(1) = 1), a second copy helps less (h(2) = 1.4), a third less again
(h(3) = 1.2) and from the fourth on repeating it hurts (h(4) = 0.4, h(8) = -8.8): "more of a
good thing" eventually hurts. A reward model that learns "good words are good" from samples
of the initial policy (where a word rarely repeats) keeps rewarding the repetition that the
gold rubric punishes: the room Goodhart's law needs. Pure numpy: no torch here.

Example:
    >>> gold_reward([["clear", "kind", "the", "rude"], ["clear", "clear", "clear", "clear"]]).round(2).tolist()
    [1.0, 0.4]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GOOD_WORDS = ("clear", "kind", "useful", "honest", "precise", "warm", "calm", "brief")
BAD_WORDS = ("rude", "wrong", "vague", "boring")
NEUTRAL_WORDS = (
    "the", "a", "and", "it", "is", "this", "that", "we", "you", "they",
    "can", "will", "on", "in", "of", "to", "with", "for", "as", "so",
)  # fmt: skip
SPECIAL_TOKENS = ("[PAD]", "[EOS]", "[UNK]")
WORDS = GOOD_WORDS + BAD_WORDS + NEUTRAL_WORDS  # what a completion may contain
COMPLETION_LENGTH = 8
PROMPT_LENGTH = 3
REPEAT_COST = 0.3
BAD_PENALTY = 1.0

_GOOD_INDEX = {w: i for i, w in enumerate(GOOD_WORDS)}
_BAD = frozenset(BAD_WORDS)


def repeat_value(k: np.ndarray | int) -> np.ndarray | float:
    """h(k): the gold value of k copies of one good word (diminishing, then negative returns).

    >>> [round(float(repeat_value(k)), 2) for k in range(6)]
    [0.0, 1.0, 1.4, 1.2, 0.4, -1.0]
    """
    k = np.asarray(k, dtype=np.float64)
    return k - REPEAT_COST * k * (k - 1)


def gold_from_counts(good_counts: np.ndarray, bad_counts: np.ndarray) -> np.ndarray:
    """Gold rewards from per-completion counts: ``good_counts`` (M, len(GOOD_WORDS)), ``bad_counts`` (M,)."""
    return repeat_value(good_counts).sum(axis=-1) - BAD_PENALTY * np.asarray(bad_counts, dtype=np.float64)


def gold_reward(completions: Sequence[Sequence[str] | str]) -> np.ndarray:
    """The gold reward of each completion (a list of words, or a space-separated string)."""
    good = np.zeros((len(completions), len(GOOD_WORDS)))
    bad = np.zeros(len(completions))
    for row, completion in enumerate(completions):
        words = completion.split() if isinstance(completion, str) else completion
        for word in words:
            if word in _GOOD_INDEX:
                good[row, _GOOD_INDEX[word]] += 1
            elif word in _BAD:
                bad[row] += 1
    return gold_from_counts(good, bad)
