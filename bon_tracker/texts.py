"""The prompts and completions behind a curve: a bounded hack table and text features per eval step.

Texts never reach the core. On the training thread :func:`check_texts` only validates them and
takes a shallow copy (a few milliseconds at 1,000 x 64). On the statistics path
:func:`hack_statistics` turns them into :class:`HackStatistics`: the ``k`` prompts where
best-of-N by the proxy loses most true reward against the best sample by the true reward, with
both picks' texts cut to ``max_chars`` (and passed through the user's ``redact``), and
model-free features of the proxy's picks against all samples (length, repetition, distinct-2,
a user regex, user functions), so that "the proxy learned to reward length" is a line on a chart.

The mathematics matches :func:`~bon_tracker.bon_curve` at n = N: best-of-N picks the sample
with the highest proxy score, ties broken uniformly at random, so its expected true reward is
the mean true reward of the samples tied at the top proxy score, and a feature of the pick is
the mean of that feature over them. A non-finite proxy or true score drops that sample (as
``nan_policy="omit"`` does); ``proxy_rows`` and ``true_rows`` are the rows as given, aligned
with the texts, before any sample was omitted.

Example:
    >>> texts = check_texts(["2+2?"], [["4", "four, or maybe five, who knows"]], [2])
    >>> stats = hack_statistics([[0.1, 0.9]], [[1.0, 0.0]], texts)
    >>> row = stats.rows[0]
    >>> row.proxy_pick.text, row.true_pick.text, row.gap
    ('four, or maybe five, who knows', '4', 1.0)
    >>> HackStatistics.from_json(stats.to_json()) == stats
    True
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFAULT_K = 10
DEFAULT_MAX_CHARS = 2000
DEFAULT_MAX_TABLE_BYTES = 256 * 1024  # the table's JSON, UTF-8: 10 rows x 3 texts x 2,000 characters fit
MIN_TABLE_BYTES = 16 * 1024
FEATURE_CHARS = 20_000  # word features and the tokenizer read at most this many characters of a text
REDACT_MARGIN = 1000  # characters past the cut that ``redact`` also sees (a secret across the cut)
MAX_FEATURES = 32
MAX_FEATURE_SAMPLES = 16_384  # samples whose features are computed per eval step (~0.4 s on one core)
MAX_FEATURE_NAME = 100
MAX_NOTES = 10
MAX_NOTE_CHARS = 300
FORMAT_VERSION = 1
REDACTION_FAILED = "[redaction failed: text withheld]"

TextFeature = Callable[[str], float]


# ---- the training thread: validate and copy ------------------------------------------------------------


@dataclass(frozen=True)
class Texts:
    """The texts of one eval step: ``P`` prompts and a row of completions per prompt (ragged like
    the scores). Tuples: the caller may change its own lists after :func:`check_texts` returned."""

    prompts: tuple[str, ...]
    completions: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.prompts)


def _sequence(value: Any, what: str) -> tuple:
    """``value`` as a tuple if it is a sequence of items (a list, tuple, array), never a string."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__"):
        raise TypeError(f"{what} must be a list of strings, got {type(value).__name__}")
    return tuple(value.tolist() if isinstance(value, np.ndarray) else value)


def _first_non_string(items: tuple, what: str) -> None:
    """Raise naming the first item of ``items`` that is not a string (``what`` says where; str
    subclasses are strings)."""
    for j, item in enumerate(items):
        if not isinstance(item, str):
            raise TypeError(f"{what}[{j}] must be a string, got {type(item).__name__}")


def check_texts(prompts: Any, completions: Any, lengths: Sequence[int]) -> Texts:
    """Validate one eval step's texts against its score rows and copy them (the training thread's part).

    Args:
        prompts: ``P`` prompt strings.
        completions: ``P`` rows of completion strings, row ``i`` as long as score row ``i``.
        lengths: the number of scores in each row, as given (before any non-finite sample is
            omitted), e.g. ``[len(row) for row in proxy]``.

    Returns:
        The texts as tuples (a shallow copy: the strings are shared, never copied).

    Raises:
        TypeError: a prompt or a completion is not a string, or a row is not a list.
        ValueError: the counts do not match the scores; the message names the prompt.

    >>> check_texts(["hi"], [["a", "b"]], [2]).completions
    (('a', 'b'),)
    """
    prompt_items = _sequence(prompts, "prompts")
    if set(map(type, prompt_items)) - {str}:  # a set of types: one C loop, not one isinstance per item
        _first_non_string(prompt_items, "prompts")
    rows = _sequence(completions, "completions")
    counts = [int(n) for n in lengths]
    if not len(prompt_items) == len(rows) == len(counts):
        raise ValueError(
            f"{len(prompt_items)} prompts and {len(rows)} rows of completions for {len(counts)} rows of scores: "
            "pass one prompt and one row of completions per row of scores"
        )
    copied = tuple(
        row if type(row) is tuple else tuple(row) if type(row) is list else _sequence(row, f"completions[{i}]")
        for i, row in enumerate(rows)
    )
    if [len(row) for row in copied] != counts:
        i = next(i for i, row in enumerate(copied) if len(row) != counts[i])
        raise ValueError(
            f"completions[{i}] has {len(copied[i])} completions for {counts[i]} scores: "
            "pass one completion per score, in the same order"
        )
    types: set[type] = set()
    for row in copied:
        types.update(map(type, row))
    if types - {str}:
        for i, row in enumerate(copied):
            _first_non_string(row, f"completions[{i}]")
    return Texts(prompt_items, copied)


# ---- cutting and redacting --------------------------------------------------------------------------------


def _valid_utf8(text: str) -> str:
    """``text`` with lone surrogates replaced, so that it encodes as UTF-8 (JSON, every service)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def cut_mark(total: int) -> str:
    """What ends a cut text: how long the whole text was."""
    return f" …[cut: {total:,} characters in all]"


def kept_text(text: str, max_chars: int, redact: Callable[[str], str] | None = None) -> str:
    """``text`` as the table keeps it: redacted, at most ``max_chars`` characters, the cut marked.

    Memory stays bounded by ``max_chars`` whatever the text's length: ``redact`` sees the first
    ``max_chars + REDACT_MARGIN`` characters, so that a secret across the cut is seen whole.
    When the text goes on past that window, the last ``REDACT_MARGIN`` characters of the redacted
    window are dropped too: a secret cut in two by the window's end is never shown in part.
    A ``redact`` that raises or returns no string withholds the text.

    >>> kept_text("abcdef", 3)
    'abc …[cut: 6 characters in all]'
    """
    total = len(text)
    longer_than_window = total > max_chars + REDACT_MARGIN
    window = text[: max_chars + REDACT_MARGIN] if longer_than_window else text
    if redact is not None:
        try:
            window = redact(window)
        except Exception as err:  # never keep a text whose redaction failed
            return f"{REDACTION_FAILED} ({type(err).__name__})"
        if not isinstance(window, str):
            return f"{REDACTION_FAILED} (redact returned {type(window).__name__}, not a string)"
    keep = min(max_chars, len(window) - REDACT_MARGIN) if longer_than_window and redact is not None else max_chars
    if len(window) > keep or longer_than_window:
        return _valid_utf8(window[: max(keep, 0)]) + cut_mark(total)
    return _valid_utf8(window)


# ---- features -----------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    """Whitespace-separated words of the text's first ``FEATURE_CHARS`` characters (bounded memory)."""
    return (text[:FEATURE_CHARS] if len(text) > FEATURE_CHARS else text).split()


def length_chars(text: str) -> float:
    """Length in characters (the whole text; no copy)."""
    return float(len(text))


def repetition(text: str) -> float:
    """Share of the word 4-grams that repeat an earlier one, ``1 - unique/total`` (seq-rep-4,
    Welleck et al. 2019, arXiv 1908.04319); 0 for fewer than 4 words.

    >>> repetition("a b c d a b c d")  # 5 four-grams, 4 of them unique
    0.2
    """
    words = _words(text)
    total = len(words) - 3
    return (total - len(set(zip(words, words[1:], words[2:], words[3:])))) / total if total > 0 else 0.0


def distinct_2(text: str) -> float:
    """Distinct word bigrams over all bigrams of the text (Li et al. 2016, arXiv 1510.03055);
    1 for fewer than 2 words.

    >>> distinct_2("the cat the cat")
    0.6666666666666666
    """
    words = _words(text)
    total = len(words) - 1
    return len(set(itertools.pairwise(words))) / total if total > 0 else 1.0


def default_features() -> dict[str, TextFeature]:
    """The built-in features: ``length_chars``, ``repetition``, ``distinct_2``."""
    return {"length_chars": length_chars, "repetition": repetition, "distinct_2": distinct_2}


def _regex_feature(regex: str | re.Pattern) -> TextFeature:
    pattern = re.compile(regex) if isinstance(regex, str) else regex

    def matches(text: str) -> float:
        return 1.0 if pattern.search(text) else 0.0  # searches the text in place (no copy)

    return matches


def _token_counts(tokenizer: Any, texts: list[str]) -> list[float]:
    """Tokens of each text (its first ``FEATURE_CHARS`` characters): a Hugging Face tokenizer in
    batches, or a callable returning a count or a list of tokens."""
    windows = [t[:FEATURE_CHARS] for t in texts]
    if hasattr(tokenizer, "encode") and callable(tokenizer):  # transformers' tokenizers: batched
        out: list[float] = []
        for start in range(0, len(windows), 1024):
            ids = tokenizer(windows[start : start + 1024], add_special_tokens=False)["input_ids"]
            out.extend(float(len(row)) for row in ids)
        return out
    counts = []
    for text in windows:
        result = tokenizer(text)
        counts.append(float(result) if isinstance(result, (int, float, np.number)) else float(len(result)))
    return counts


def _check_features(features: Mapping[str, TextFeature] | None, regex: Any, tokenizer: Any) -> dict[str, Any]:
    chosen: dict[str, Any] = dict(default_features() if features is None else features)
    if regex is not None:
        if not isinstance(regex, (str, re.Pattern)):
            raise TypeError(f"regex must be a string or a compiled pattern, got {type(regex).__name__}")
        chosen["regex"] = _regex_feature(regex)
    if tokenizer is not None:
        if not callable(tokenizer):
            raise TypeError(f"tokenizer must be a callable or a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        chosen["length_tokens"] = _TokenCount(tokenizer)
    if len(chosen) > MAX_FEATURES:
        raise ValueError(f"{len(chosen)} text features; at most {MAX_FEATURES}")
    for name, fn in chosen.items():
        if not isinstance(name, str) or not name or len(name) > MAX_FEATURE_NAME or not name.isprintable():
            raise ValueError(
                f"a text feature's name must be 1 to {MAX_FEATURE_NAME} printable characters: {name!r:.60}"
            )
        if not callable(fn):
            raise TypeError(f"text feature {name!r} must be a function text -> float, got {type(fn).__name__}")
    return chosen


class _TokenCount:
    """The ``length_tokens`` feature: counted for all texts at once (a tokenizer is fastest batched)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> float:
        return _token_counts(self.tokenizer, [text])[0]


def _feature_values(fn: Any, texts: list[str]) -> np.ndarray:
    """One value per text; NaN where the function returned a non-finite value."""
    values = _token_counts(fn.tokenizer, texts) if isinstance(fn, _TokenCount) else [fn(text) for text in texts]
    out = np.array(values, dtype=np.float64)
    out[~np.isfinite(out)] = np.nan
    return out


# ---- the statistics path: the hack table --------------------------------------------------------------------


@dataclass(frozen=True)
class PickedText:
    """One sample shown in the hack table."""

    index: int  # its position in the prompt's row of completions
    text: str  # redacted and cut to max_chars (the cut marked)
    chars: int  # characters of the whole original text
    proxy: float
    true: float


@dataclass(frozen=True)
class HackRow:
    """One prompt of the hack table: what best-of-N by proxy picks against the best by true.

    ``proxy_pick`` is the first (in sample order) of the ``tied`` samples that share the top proxy
    score; ``expected_true`` is the mean true reward of all of them (best-of-N's expected true
    reward, ties broken uniformly at random, as :func:`~bon_tracker.bon_curve` does), and ``gap`` is
    ``true_pick.true - expected_true``. ``true_pick`` is the first sample with the top true reward.
    ``proxy_pick_true_rank`` is 1 + the number of samples with a strictly higher true reward than the
    shown proxy pick (1: it is also the best by true).
    """

    prompt_index: int
    prompt: str
    prompt_chars: int
    samples: int  # samples with finite scores
    tied: int
    proxy_pick: PickedText
    true_pick: PickedText
    proxy_pick_true_rank: int
    expected_true: float
    gap: float


@dataclass(frozen=True)
class FeatureSummary:
    """One text feature at one eval step, averaged over prompts: ``pick`` of best-of-N by proxy
    (ties: the mean over the tied samples), ``all`` of a random sample (each prompt's mean over its
    samples), ``diff = pick - all``. None where no prompt has a finite value."""

    name: str
    pick: float | None
    all: float | None
    diff: float | None


TABLE_COLUMNS = (
    "prompt_index",
    "prompt",
    "proxy_pick",
    "proxy_pick_proxy",
    "proxy_pick_true",
    "true_pick",
    "true_pick_proxy",
    "true_pick_true",
    "proxy_pick_true_rank",
    "samples",
    "tied",
    "expected_true",
    "gap",
)


@dataclass(frozen=True)
class HackStatistics:
    """The hack table and the text features of one eval step (see :func:`hack_statistics`)."""

    rows: tuple[HackRow, ...]
    features: tuple[FeatureSummary, ...]
    k: int
    max_chars: int
    prompts: int  # prompts with at least one sample with finite scores
    prompts_losing: int  # of them, prompts where best-of-N by proxy loses true reward (gap > 0)
    rows_dropped: int = 0  # rows of the k left out to keep the JSON within max_table_bytes
    feature_prompts: int = 0  # prompts the features average (all, or evenly spaced ones: max_feature_samples)
    notes: tuple[str, ...] = field(default=())  # features that failed, and why

    def table(self) -> tuple[tuple[str, ...], list[list[Any]]]:
        """``(columns, rows)`` for a UI table (W&B ``Table``, MLflow ``log_table``, trackio ``Table``)."""
        rows = [
            [
                r.prompt_index,
                r.prompt,
                r.proxy_pick.text,
                r.proxy_pick.proxy,
                r.proxy_pick.true,
                r.true_pick.text,
                r.true_pick.proxy,
                r.true_pick.true,
                r.proxy_pick_true_rank,
                r.samples,
                r.tied,
                r.expected_true,
                r.gap,
            ]
            for r in self.rows
        ]
        return TABLE_COLUMNS, rows

    def feature_scalars(self) -> dict[str, float]:
        """The features as numbers to chart per step: ``{name}/pick``, ``{name}/all``, ``{name}/diff``."""
        out = {}
        for f in self.features:
            for part in ("pick", "all", "diff"):
                value = getattr(f, part)
                if value is not None:
                    out[f"{f.name}/{part}"] = value
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (every float finite), as :meth:`from_dict` reads them back."""
        return {
            "version": FORMAT_VERSION,
            "k": self.k,
            "max_chars": self.max_chars,
            "prompts": self.prompts,
            "prompts_losing": self.prompts_losing,
            "rows_dropped": self.rows_dropped,
            "feature_prompts": self.feature_prompts,
            "notes": list(self.notes),
            "features": [{"name": f.name, "pick": f.pick, "all": f.all, "diff": f.diff} for f in self.features],
            "rows": [_row_dict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HackStatistics:
        if data.get("version") != FORMAT_VERSION:
            raise ValueError(f"hack statistics of format version {data.get('version')!r}; this reads {FORMAT_VERSION}")
        return cls(
            rows=tuple(_row_from(r) for r in data["rows"]),
            features=tuple(FeatureSummary(f["name"], f["pick"], f["all"], f["diff"]) for f in data["features"]),
            k=int(data["k"]),
            max_chars=int(data["max_chars"]),
            prompts=int(data["prompts"]),
            prompts_losing=int(data["prompts_losing"]),
            rows_dropped=int(data["rows_dropped"]),
            feature_prompts=int(data["feature_prompts"]),
            notes=tuple(data["notes"]),
        )

    def to_json(self) -> str:
        """Compact JSON (UTF-8 text, not ASCII-escaped); at most ``max_table_bytes`` bytes in UTF-8."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> HackStatistics:
        return cls.from_dict(json.loads(text))


def _pick_dict(p: PickedText) -> dict[str, Any]:
    return {"index": p.index, "text": p.text, "chars": p.chars, "proxy": p.proxy, "true": p.true}


def _row_dict(r: HackRow) -> dict[str, Any]:
    return {
        "prompt_index": r.prompt_index,
        "prompt": r.prompt,
        "prompt_chars": r.prompt_chars,
        "samples": r.samples,
        "tied": r.tied,
        "proxy_pick": _pick_dict(r.proxy_pick),
        "true_pick": _pick_dict(r.true_pick),
        "proxy_pick_true_rank": r.proxy_pick_true_rank,
        "expected_true": r.expected_true,
        "gap": r.gap,
    }


def _row_from(d: Mapping[str, Any]) -> HackRow:
    def pick(p: Mapping[str, Any]) -> PickedText:
        return PickedText(int(p["index"]), p["text"], int(p["chars"]), float(p["proxy"]), float(p["true"]))

    return HackRow(
        prompt_index=int(d["prompt_index"]),
        prompt=d["prompt"],
        prompt_chars=int(d["prompt_chars"]),
        samples=int(d["samples"]),
        tied=int(d["tied"]),
        proxy_pick=pick(d["proxy_pick"]),
        true_pick=pick(d["true_pick"]),
        proxy_pick_true_rank=int(d["proxy_pick_true_rank"]),
        expected_true=float(d["expected_true"]),
        gap=float(d["gap"]),
    )


@dataclass
class _PromptPicks:
    """Per prompt (in input order): who best-of-N picks, and the numbers of the table."""

    valid: list[np.ndarray]  # per prompt: indices of samples with finite proxy and true
    tied: list[np.ndarray]  # per prompt: indices (into the row) of the samples at the top proxy score
    proxy_pick: np.ndarray
    true_pick: np.ndarray
    expected_true: np.ndarray
    best_true: np.ndarray
    rank: np.ndarray


def _as_rows(values: Any, name: str, lengths: list[int]) -> list[np.ndarray]:
    if hasattr(values, "detach"):
        values = values.detach().cpu().double().numpy()
    rows = list(values)
    if len(rows) != len(lengths):
        raise ValueError(f"{name} has {len(rows)} rows for {len(lengths)} prompts of texts")
    out = []
    for i, row in enumerate(rows):
        if hasattr(row, "detach"):
            row = row.detach().cpu().double().numpy()
        array = np.asarray([np.nan if v is None else v for v in row] if isinstance(row, list) else row, dtype=float)
        if array.ndim != 1 or len(array) != lengths[i]:
            raise ValueError(f"{name}[{i}] has {array.size} scores for {lengths[i]} completions")
        out.append(array)
    return out


def _picks(proxy_rows: list[np.ndarray], true_rows: list[np.ndarray]) -> _PromptPicks:
    """Best-of-N's picks of each prompt (rows of equal length at once; no copy of the texts)."""
    P = len(proxy_rows)
    proxy_pick = np.full(P, -1, dtype=np.int64)
    true_pick = np.full(P, -1, dtype=np.int64)
    expected, best, rank = np.full(P, np.nan), np.full(P, np.nan), np.zeros(P, dtype=np.int64)
    valid: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * P
    tied: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * P
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(proxy_rows):
        by_length.setdefault(len(row), []).append(i)
    for N, members in by_length.items():
        if N == 0:
            continue
        idx = np.asarray(members)
        p = np.stack([proxy_rows[i] for i in members])
        t = np.stack([true_rows[i] for i in members])
        ok = np.isfinite(p) & np.isfinite(t)
        pm = np.where(ok, p, -np.inf)
        tm = np.where(ok, t, -np.inf)
        top = pm.max(axis=1)
        at_top = ok & (pm == top[:, None])
        counts = at_top.sum(axis=1)
        has = ok.any(axis=1)
        first_top = at_top.argmax(axis=1)
        best_t = tm.max(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_t = np.where(at_top, t, 0.0).sum(axis=1) / counts
        shown_true = tm[np.arange(len(idx)), first_top]
        ranks = 1 + (tm > shown_true[:, None]).sum(axis=1)
        proxy_pick[idx] = np.where(has, first_top, -1)
        true_pick[idx] = np.where(has, tm.argmax(axis=1), -1)
        expected[idx] = np.where(has, mean_t, np.nan)
        best[idx] = np.where(has, best_t, np.nan)
        rank[idx] = ranks
        for j, i in enumerate(members):
            valid[i] = np.flatnonzero(ok[j])
            tied[i] = np.flatnonzero(at_top[j])
    return _PromptPicks(valid, tied, proxy_pick, true_pick, expected, best, rank)


def feature_prompts(sample_counts: Sequence[int], max_samples: int) -> list[int]:
    """The prompts the features average: every prompt with samples, or, when they hold more than
    ``max_samples`` samples in all, evenly spaced prompts holding about that many (as the tracker's
    agreement statistics take evenly spaced prompts), so that the cost per eval step is bounded."""
    prompts = [i for i, n in enumerate(sample_counts) if n]
    total = sum(sample_counts[i] for i in prompts)
    if total <= max_samples:
        return prompts
    m = max(1, int(len(prompts) * max_samples / total))
    return [prompts[j] for j in np.unique(np.linspace(0, len(prompts) - 1, m).round().astype(np.int64))]


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r:.60}")
    return int(value)


class HackAccumulator:
    """:func:`hack_statistics` fed a block of prompts at a time (in order), e.g. by ``bon-tracker
    analyze`` streaming a score file: memory holds the ``k`` best rows so far (texts cut) and a few
    sums per feature, never the texts of earlier blocks. :func:`hack_statistics` is one block.

    Args: as :func:`hack_statistics` (``max_feature_samples`` is chosen by the caller, per block).
    """

    def __init__(
        self,
        *,
        k: int = DEFAULT_K,
        max_chars: int = DEFAULT_MAX_CHARS,
        max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
        features: Mapping[str, TextFeature] | None = None,
        tokenizer: Any = None,
        regex: str | re.Pattern | None = None,
        redact: Callable[[str], str] | None = None,
    ):
        self.k = _check_int(k, "k", 0)
        self.max_chars = _check_int(max_chars, "max_chars", 1)
        self.max_table_bytes = _check_int(max_table_bytes, "max_table_bytes", MIN_TABLE_BYTES)
        if redact is not None and not callable(redact):
            raise TypeError(f"redact must be a function str -> str, got {type(redact).__name__}")
        self.redact = redact
        self.features = _check_features(features, regex, tokenizer)
        self._rows: list[HackRow] = []  # the best k so far, by gap (largest first), then prompt order
        self._seen = 0  # prompts fed so far: the next block's first prompt index
        self._prompts = 0
        self._losing = 0
        self._feature_prompts = 0
        # per feature: [sum of picks' values, prompts with one, sum of prompts' means, prompts with one]
        self._sums = {name: [0.0, 0, 0.0, 0] for name in self.features}
        self._notes: list[str] = []

    def add(self, proxy_rows: Any, true_rows: Any, texts: Texts, *, feature_rows: Sequence[int] | None = None) -> None:
        """One block of prompts: scores aligned with ``texts``; ``feature_rows`` are the block's rows
        whose features count (default: every row)."""
        if not isinstance(texts, Texts):
            raise TypeError(f"texts must come from check_texts(), got {type(texts).__name__}")
        lengths = [len(row) for row in texts.completions]
        proxy = _as_rows(proxy_rows, "proxy_rows", lengths)
        true = _as_rows(true_rows, "true_rows", lengths)
        picks = _picks(proxy, true)
        offset, self._seen = self._seen, self._seen + len(lengths)
        self._prompts += sum(1 for v in picks.valid if len(v))

        gap = picks.best_true - picks.expected_true
        losing = np.flatnonzero(np.nan_to_num(gap, nan=0.0) > 0)
        self._losing += len(losing)
        order = losing[np.argsort(-gap[losing], kind="stable")][: self.k]
        if len(self._rows) == self.k:  # only prompts that beat the k-th row so far (ties: the earlier prompt)
            order = order[gap[order] > self._rows[-1].gap] if self.k else order[:0]
        new = [self._row(i, offset + i, texts, proxy, true, picks, float(gap[i])) for i in order.tolist()]
        self._rows = sorted(self._rows + new, key=lambda r: (-r.gap, r.prompt_index))[: self.k]

        rows = [i for i in (range(len(lengths)) if feature_rows is None else feature_rows) if len(picks.valid[i])]
        self._feature_prompts += len(rows)
        if rows:
            self._add_features(texts, picks, rows)

    def _row(
        self, i: int, index: int, texts: Texts, proxy: list, true: list, picks: _PromptPicks, gap: float
    ) -> HackRow:
        a, b = int(picks.proxy_pick[i]), int(picks.true_pick[i])
        completions = texts.completions[i]

        def picked(j: int) -> PickedText:
            text = completions[j]
            return PickedText(
                j, kept_text(text, self.max_chars, self.redact), len(text), float(proxy[i][j]), float(true[i][j])
            )

        return HackRow(
            prompt_index=index,
            prompt=kept_text(texts.prompts[i], self.max_chars, self.redact),
            prompt_chars=len(texts.prompts[i]),
            samples=len(picks.valid[i]),
            tied=len(picks.tied[i]),
            proxy_pick=picked(a),
            true_pick=picked(b),
            proxy_pick_true_rank=int(picks.rank[i]),
            expected_true=float(picks.expected_true[i]),
            gap=gap,
        )

    def _add_features(self, texts: Texts, picks: _PromptPicks, rows: list[int]) -> None:
        """Each feature: per prompt, the pick's value (tied: their mean) and the prompt's mean, summed."""
        flat = [texts.completions[i][j] for i in rows for j in picks.valid[i]]  # references, not copies
        starts = np.cumsum([0] + [len(picks.valid[i]) for i in rows])
        # where each prompt's tied samples sit among its valid ones (valid indices are sorted)
        tied_at = [np.searchsorted(picks.valid[i], picks.tied[i]) for i in rows]
        for name, fn in list(self.features.items()):
            try:
                values = _feature_values(fn, flat)
            except Exception as err:  # a user's function: off from now on; the rest still come
                del self.features[name], self._sums[name]
                if len(self._notes) < MAX_NOTES:
                    self._notes.append(f"text feature {name!r} failed: {type(err).__name__}: {err}"[:MAX_NOTE_CHARS])
                continue
            sums = self._sums[name]
            for r in range(len(rows)):
                row = values[starts[r] : starts[r + 1]]
                at_top = row[tied_at[r]]
                if np.isfinite(at_top).any():
                    sums[0] += float(np.nanmean(at_top))
                    sums[1] += 1
                if np.isfinite(row).any():
                    sums[2] += float(np.nanmean(row))
                    sums[3] += 1

    def result(self) -> HackStatistics:
        """The statistics of every prompt fed so far; their JSON is at most ``max_table_bytes`` bytes."""
        summaries = []
        for name, (pick_sum, picks, all_sum, alls) in self._sums.items():
            pick = pick_sum / picks if picks else None
            every = all_sum / alls if alls else None
            diff = pick - every if pick is not None and every is not None else None
            summaries.append(FeatureSummary(name, pick, every, diff))
        stats = HackStatistics(
            rows=tuple(self._rows),
            features=tuple(summaries),
            k=self.k,
            max_chars=self.max_chars,
            prompts=self._prompts,
            prompts_losing=self._losing,
            feature_prompts=self._feature_prompts if summaries else 0,
            notes=tuple(self._notes),
        )
        return _within_bytes(stats, self.max_table_bytes)


def hack_statistics(
    proxy_rows: Any,
    true_rows: Any,
    texts: Texts,
    *,
    k: int = DEFAULT_K,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_table_bytes: int = DEFAULT_MAX_TABLE_BYTES,
    features: Mapping[str, TextFeature] | None = None,
    tokenizer: Any = None,
    regex: str | re.Pattern | None = None,
    redact: Callable[[str], str] | None = None,
    max_feature_samples: int = MAX_FEATURE_SAMPLES,
) -> HackStatistics:
    """The hack table and text features of one eval step (the statistics path, off the training thread).

    Rows: the ``k`` prompts with the largest ``gap`` = best true reward of the prompt's samples
    minus best-of-N's expected true reward (ties in proxy: the mean over the tied samples); only
    prompts with ``gap > 0`` (best-of-N loses something); ties in the gap in prompt order.

    Args:
        proxy_rows, true_rows: the scores as given to ``log_scores`` (``(P, N)`` or ragged rows),
            aligned with ``texts``; a sample with a non-finite score is left out.
        texts: from :func:`check_texts`.
        k: rows of the table at most.
        max_chars: characters kept of each text (the cut is marked, the full length kept).
        max_table_bytes: the table's JSON (:meth:`HackStatistics.to_json`) is at most this many
            bytes: rows are dropped from the bottom until it fits (``rows_dropped`` counts them).
        features: ``{name: fn(text) -> float}`` replacing the built-in ones
            (:func:`default_features`; pass ``{**default_features(), "mine": fn}`` to add one).
            A feature that raises is left out of the step, with a line in ``notes``.
        tokenizer: adds ``length_tokens``: a Hugging Face tokenizer or a callable ``text ->``
            tokens (or their count).
        regex: adds ``regex``, the share of texts where it matches (``re.search``).
        redact: ``str -> str`` applied to every text before the table keeps it (features are
            numbers computed from the texts as given).
        max_feature_samples: the features read at most about this many samples: beyond it, the
            samples of evenly spaced prompts (``feature_prompts`` says how many prompts).

    Returns:
        :class:`HackStatistics`, whose JSON is at most ``max_table_bytes`` bytes.
    """
    max_feature_samples = _check_int(max_feature_samples, "max_feature_samples", 1)
    accumulator = HackAccumulator(
        k=k,
        max_chars=max_chars,
        max_table_bytes=max_table_bytes,
        features=features,
        tokenizer=tokenizer,
        regex=regex,
        redact=redact,
    )
    if not isinstance(texts, Texts):
        raise TypeError(f"texts must come from check_texts(), got {type(texts).__name__}")
    lengths = [len(row) for row in texts.completions]
    rows = feature_prompts(lengths, max_feature_samples) if accumulator.features else []
    accumulator.add(proxy_rows, true_rows, texts, feature_rows=rows)
    return accumulator.result()


def _within_bytes(stats: HackStatistics, max_table_bytes: int) -> HackStatistics:
    """Drop rows from the bottom until the JSON fits (each row's size is measured once)."""
    from dataclasses import replace

    base = len(replace(stats, rows=(), rows_dropped=len(stats.rows)).to_json().encode("utf-8"))
    if base > max_table_bytes:  # bounded names and notes: only an absurdly small limit gets here
        raise ValueError(f"max_table_bytes={max_table_bytes} cannot hold even the features ({base} bytes)")
    sizes = [
        len(json.dumps(_row_dict(r), ensure_ascii=False, separators=(",", ":")).encode("utf-8")) + 1 for r in stats.rows
    ]
    kept, total = 0, base
    for size in sizes:
        if total + size > max_table_bytes:
            break
        total += size
        kept += 1
    if kept == len(stats.rows):
        return stats
    return replace(stats, rows=stats.rows[:kept], rows_dropped=len(stats.rows) - kept)
