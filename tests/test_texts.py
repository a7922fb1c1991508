"""Texts behind the curves: check_texts's validation, the hack table against brute force, a proxy
that rewards length, the features, redaction, cuts and the JSON round trip."""

from __future__ import annotations

import itertools
import json
import re
import tracemalloc

import numpy as np
import pytest

from bon_tracker.core import bon_estimate
from bon_tracker.texts import (
    REDACT_MARGIN,
    REDACTION_FAILED,
    HackAccumulator,
    HackStatistics,
    Texts,
    check_texts,
    default_features,
    distinct_2,
    hack_statistics,
    kept_text,
    repetition,
)

# ---- check_texts ------------------------------------------------------------------------------------------


def test_check_texts_copies_so_the_caller_may_change_its_lists():
    prompts, rows = ["p0", "p1"], [["a", "b"], ["c"]]
    texts = check_texts(prompts, rows, [2, 1])
    prompts.append("p2")
    rows[0][0] = "changed"
    rows[1].append("d")
    assert texts == Texts(("p0", "p1"), (("a", "b"), ("c",)))


@pytest.mark.parametrize(
    ("prompts", "rows", "lengths", "error", "message"),
    [
        ("one prompt", [["a"]], [1], TypeError, "prompts must be a list of strings, got str"),
        (["p", 3], [["a"], ["b"]], [1, 1], TypeError, r"prompts\[1\] must be a string, got int"),
        (["p"], [["a"], ["b"]], [1, 1], ValueError, "1 prompts and 2 rows of completions for 2 rows of scores"),
        (["p", "q"], [["a"], ["b", "c"]], [1, 1], ValueError, r"completions\[1\] has 2 completions for 1 scores"),
        (["p", "q"], [["a"], ["b", None]], [1, 2], TypeError, r"completions\[1\]\[1\] must be a string, got NoneType"),
        (["p"], ["abc"], [3], TypeError, r"completions\[0\] must be a list of strings, got str"),
        (["p"], [[b"bytes"]], [1], TypeError, r"completions\[0\]\[0\] must be a string, got bytes"),
    ],
)
def test_check_texts_names_what_is_wrong(prompts, rows, lengths, error, message):
    with pytest.raises(error, match=message):
        check_texts(prompts, rows, lengths)


def test_check_texts_takes_tuples_arrays_and_string_subclasses():
    class Marked(str):
        pass

    texts = check_texts(np.array(["p"]), (np.array(["a", "b"]),), np.array([2]))
    assert texts.completions == (("a", "b"),)
    assert check_texts([Marked("p")], [[Marked("x")]], [1]).completions == (("x",),)


# ---- the hack table against brute force ------------------------------------------------------------------------


def brute_force_row(p: np.ndarray, t: np.ndarray) -> dict:
    """Best-of-N by proxy over every tie-break, counted one sample at a time."""
    top = max(p)
    tied = [j for j in range(len(p)) if p[j] == top]
    shown = tied[0]
    return {
        "tied": len(tied),
        "proxy_pick": shown,
        "true_pick": int(np.argmax(t)),
        "expected_true": sum(t[j] for j in tied) / len(tied),
        "gap": max(t) - sum(t[j] for j in tied) / len(tied),
        "rank": 1 + sum(1 for j in range(len(t)) if t[j] > t[shown]),
    }


def random_case(rng, P=40, N=6, levels=3):
    proxy = rng.integers(0, levels, size=(P, N)).astype(float)  # discrete: many ties
    true = rng.normal(size=(P, N)).round(1)  # ties in true too
    prompts = [f"prompt {i}" for i in range(P)]
    completions = [[f"completion {i}.{j}" for j in range(N)] for i in range(P)]
    return proxy, true, check_texts(prompts, completions, [N] * P)


def test_hack_table_equals_brute_force_with_ties():
    rng = np.random.default_rng(0)
    proxy, true, texts = random_case(rng)
    stats = hack_statistics(proxy, true, texts, k=1000)
    expected = {i: brute_force_row(proxy[i], true[i]) for i in range(len(proxy))}
    losing = [i for i in expected if expected[i]["gap"] > 0]
    assert stats.prompts == len(proxy) and stats.prompts_losing == len(losing)
    assert [r.prompt_index for r in stats.rows] == sorted(losing, key=lambda i: (-expected[i]["gap"], i))
    for row in stats.rows:
        want = expected[row.prompt_index]
        i = row.prompt_index
        assert row.tied == want["tied"]
        assert row.proxy_pick.index == want["proxy_pick"] and row.true_pick.index == want["true_pick"]
        assert row.proxy_pick_true_rank == want["rank"]
        assert row.gap == pytest.approx(want["gap"], abs=1e-12)
        assert row.expected_true == pytest.approx(want["expected_true"], abs=1e-12)
        # the gap is against exactly what the curve says best-of-N gets (its tie rule)
        at_N = bon_estimate(proxy[i : i + 1], true[i : i + 1], [proxy.shape[1]])[0, 0]
        assert row.expected_true == pytest.approx(at_N, abs=1e-12)
        assert row.proxy_pick.text == f"completion {i}.{want['proxy_pick']}"
        assert row.true_pick.text == f"completion {i}.{want['true_pick']}"
        assert (row.proxy_pick.proxy, row.proxy_pick.true) == (
            proxy[i, want["proxy_pick"]],
            true[i, want["proxy_pick"]],
        )
        assert (row.true_pick.proxy, row.true_pick.true) == (proxy[i, want["true_pick"]], true[i, want["true_pick"]])
        assert row.prompt == f"prompt {i}"


def test_blocks_fed_one_at_a_time_give_the_same_statistics():
    rng = np.random.default_rng(5)
    proxy, true, texts = random_case(rng, P=50, N=5)
    whole = hack_statistics(proxy, true, texts, k=7)
    accumulator = HackAccumulator(k=7)
    for lo, hi in [(0, 1), (1, 20), (20, 21), (21, 50)]:
        block = Texts(texts.prompts[lo:hi], texts.completions[lo:hi])
        accumulator.add(proxy[lo:hi], true[lo:hi], block)
    assert accumulator.result() == whole
    assert [r.prompt_index for r in whole.rows] == [
        r.prompt_index for r in hack_statistics(proxy, true, texts, k=50).rows[:7]
    ]


def test_top_k_ragged_rows_and_non_finite_samples():
    proxy = [[3.0, 1.0, np.nan], [0.0, 5.0], [np.nan, np.nan], [1.0, 2.0, 3.0, 4.0]]
    true = [[0.0, 2.0, 9.0], [1.0, 0.5], [1.0, 2.0], [4.0, 3.0, 2.0, 1.0]]
    completions = [["a", "b", "c"], ["d", "e"], ["f", "g"], ["h", "i", "j", "k"]]
    texts = check_texts(["p0", "p1", "p2", "p3"], completions, [3, 2, 2, 4])
    stats = hack_statistics(proxy, true, texts, k=2)
    # gaps: p0: 2 - 0 = 2 (the NaN proxy sample with true 9 is left out), p1: 0.5, p2: no sample, p3: 3
    assert [(r.prompt_index, r.gap) for r in stats.rows] == [(3, 3.0), (0, 2.0)]
    assert stats.rows[1].samples == 2 and stats.rows[1].true_pick.text == "b"
    assert stats.prompts == 3 and stats.prompts_losing == 3
    assert stats.rows[0].proxy_pick_true_rank == 4
    assert hack_statistics(proxy, true, texts, k=0).rows == ()


def test_proxy_that_agrees_with_true_has_an_empty_table():
    proxy = np.arange(12.0).reshape(3, 4)
    texts = check_texts(["a", "b", "c"], [["x"] * 4] * 3, [4] * 3)
    stats = hack_statistics(proxy, 2 * proxy, texts)
    assert stats.rows == () and stats.prompts_losing == 0 and stats.prompts == 3


# ---- a proxy that rewards length ---------------------------------------------------------------------------


def length_run(rng, steps=5, P=30, N=16):
    """A policy whose completions grow longer each step; the proxy rewards length, the true reward
    falls with it (a known hack): one (proxy, true, texts) per step."""
    out = []
    for s in range(steps):
        words = rng.integers(2 + 4 * s, 8 + 8 * s, size=(P, N))  # longer completions as training goes on
        completions = [
            [" ".join(f"w{(i + j + m) % 50}" for m in range(words[i, j])) for j in range(N)] for i in range(P)
        ]
        chars = np.array([[len(c) for c in row] for row in completions], dtype=float)
        proxy = chars / 10 + rng.normal(scale=0.1, size=(P, N))
        true = 5 - chars / 20 + rng.normal(scale=0.1, size=(P, N))
        out.append((proxy, true, check_texts([f"q{i}" for i in range(P)], completions, [N] * P)))
    return out


def test_length_hack_top_rows_are_the_long_completions_and_length_rises_as_true_falls():
    rng = np.random.default_rng(1)
    run = length_run(rng)
    picks_length, picks_true = [], []
    for proxy, true, texts in run:
        stats = hack_statistics(proxy, true, texts)
        assert len(stats.rows) == 10
        for row in stats.rows:
            lengths = [len(c) for c in texts.completions[row.prompt_index]]
            assert row.proxy_pick.chars > row.true_pick.chars
            assert row.proxy_pick.chars >= sorted(lengths)[-2]  # the longest or next to it (the noise)
            assert row.true_pick.chars <= sorted(lengths)[1]
        length = next(f for f in stats.features if f.name == "length_chars")
        assert length.diff > 0 and length.diff == pytest.approx(length.pick - length.all)
        # the feature of the picks is best-of-N's: the mean over prompts of the top-proxy sample's length
        top = [len(texts.completions[i][int(np.argmax(proxy[i]))]) for i in range(len(proxy))]
        assert length.pick == pytest.approx(np.mean(top))
        assert length.all == pytest.approx(np.mean([len(c) for row in texts.completions for c in row]))
        picks_length.append(length.pick)
        picks_true.append(np.mean(true[np.arange(len(true)), proxy.argmax(axis=1)]))
    assert all(b > a for a, b in itertools.pairwise(picks_length))
    assert all(b < a for a, b in itertools.pairwise(picks_true))
    assert set(stats.feature_scalars()) == {f"{n}/{p}" for n in default_features() for p in ("pick", "all", "diff")}


# ---- features -------------------------------------------------------------------------------------------------


def test_word_features_by_hand():
    assert repetition("a b c d a b c d") == pytest.approx(1 / 5)  # abcd bcda cdab dabc abcd
    assert repetition("one two three") == 0.0
    assert distinct_2("the cat the cat") == pytest.approx(2 / 3)
    assert distinct_2("alone") == 1.0


def test_pluggable_features_regex_tokenizer_and_a_failing_one():
    proxy = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])  # prompt 1: two samples tied at the top
    true = np.zeros((2, 3))
    completions = [["As an AI, no", "sure", "ok then"], ["fine", "As an AI model", "yes yes"]]
    texts = check_texts(["p", "q"], completions, [3, 3])

    def broken(text: str) -> float:
        raise RuntimeError("boom")

    stats = hack_statistics(
        proxy,
        true,
        texts,
        features={"words": lambda s: len(s.split()), "broken": broken},
        regex=r"As an AI",
        tokenizer=lambda s: list(s),  # one token per character
    )
    by_name = {f.name: f for f in stats.features}
    assert set(by_name) == {"words", "regex", "length_tokens"}
    assert by_name["words"].pick == pytest.approx((4 + (4 + 2) / 2) / 2)
    assert by_name["words"].all == pytest.approx(((4 + 1 + 2) / 3 + (1 + 4 + 2) / 3) / 2)
    assert by_name["regex"].pick == pytest.approx((1 + 0.5) / 2)
    assert by_name["regex"].all == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert by_name["length_tokens"].pick == pytest.approx((12 + (14 + 7) / 2) / 2)
    assert stats.notes == ("text feature 'broken' failed: RuntimeError: boom",)


def test_hugging_face_tokenizer_counts_tokens():
    pytest.importorskip("transformers")
    from tests.tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    texts = check_texts(["p"], [["the cat sat", "a good dog is a happy dog"]], [2])
    stats = hack_statistics([[1.0, 0.0]], [[0.0, 1.0]], texts, features={}, tokenizer=tokenizer)
    (tokens,) = stats.features
    assert (tokens.name, tokens.pick, tokens.all) == ("length_tokens", 3.0, (3 + 7) / 2)


def test_features_on_evenly_spaced_prompts_beyond_the_budget():
    rng = np.random.default_rng(2)
    P, N = 100, 4
    completions = [["x" * int(rng.integers(1, 50)) for _ in range(N)] for _ in range(P)]
    proxy, true = rng.normal(size=(P, N)), rng.normal(size=(P, N))
    texts = check_texts([str(i) for i in range(P)], completions, [N] * P)
    stats = hack_statistics(proxy, true, texts, features={"n": len}, max_feature_samples=40)
    chosen = np.unique(np.linspace(0, P - 1, 10).round().astype(int))
    assert stats.feature_prompts == len(chosen) == 10
    (f,) = stats.features
    assert f.pick == pytest.approx(np.mean([len(completions[i][int(np.argmax(proxy[i]))]) for i in chosen]))
    assert f.all == pytest.approx(np.mean([len(c) for i in chosen for c in completions[i]]))
    assert hack_statistics(proxy, true, texts, features={"n": len}).feature_prompts == P


# ---- texts: cut, redacted, escaped, bounded -----------------------------------------------------------------


def one_prompt(completion: str, prompt: str = "prompt") -> tuple:
    return [[1.0, 0.0]], [[0.0, 1.0]], check_texts([prompt], [[completion, "the true pick"]], [2])


def test_unicode_newlines_pipes_and_html_survive_the_json_round_trip():
    nasty = 'é 🙂 中文\nline two\r\n| a | b |\t<script>alert("x")</script> &amp; \\ "quoted" \x00\x1f'
    proxy, true, texts = one_prompt(nasty, prompt=nasty[::-1])
    stats = hack_statistics(proxy, true, texts)
    text = stats.to_json()
    assert HackStatistics.from_json(text) == stats
    assert stats.rows[0].proxy_pick.text == nasty and stats.rows[0].prompt == nasty[::-1]
    assert len(text.encode("utf-8")) <= 256 * 1024
    json.loads(text)  # plain JSON, no NaN


def test_lone_surrogates_become_valid_utf8():
    proxy, true, texts = one_prompt("bad \udc80 byte")
    stats = hack_statistics(proxy, true, texts)
    assert stats.rows[0].proxy_pick.text == "bad ? byte"
    stats.to_json().encode("utf-8")


def peak_bytes(completion: str, **options) -> tuple[int, HackStatistics]:
    proxy, true, texts = one_prompt(completion)
    hack_statistics(proxy, true, texts, **options)  # warm-up (imports, regex cache)
    tracemalloc.start()
    try:
        stats = hack_statistics(proxy, true, texts, **options)
        return tracemalloc.get_traced_memory()[1], stats
    finally:
        tracemalloc.stop()


def test_a_1mb_completion_is_cut_in_bounded_memory():
    options = {"regex": "hack", "redact": lambda s: s.replace("hack", "h4ck")}
    peak, stats = peak_bytes("hack " * 200_000, **options)  # 1,000,000 characters
    # Word features read the first 20,000 characters (~200 KB of words); a copy of the text would be 1 MB.
    assert peak < 500_000, f"peak {peak:,} bytes for a 1,000,000-character completion"
    peak_4mb, _ = peak_bytes("hack " * 800_000, **options)
    assert abs(peak_4mb - peak) < 50_000, f"{peak:,} bytes at 1 MB, {peak_4mb:,} bytes at 4 MB"
    pick = stats.rows[0].proxy_pick
    assert pick.chars == 1_000_000
    assert pick.text == ("h4ck " * 400) + " …[cut: 1,000,000 characters in all]"
    length = next(f for f in stats.features if f.name == "length_chars")
    assert length.pick == 1_000_000  # the whole length, counted without a copy
    assert HackStatistics.from_json(stats.to_json()) == stats


def test_redact_is_applied_to_every_text_kept():
    def redact(text: str) -> str:
        return re.sub(r"sk-[A-Za-z0-9]+", "[KEY]", text)

    rng = np.random.default_rng(3)
    P, N = 12, 5
    prompts = [f"my key is sk-prompt{i}" for i in range(P)]
    completions = [[f"answer {j} with sk-secret{i}x{j}" for j in range(N)] for i in range(P)]
    texts = check_texts(prompts, completions, [N] * P)
    stats = hack_statistics(rng.normal(size=(P, N)), rng.normal(size=(P, N)), texts, k=P, redact=redact)
    assert stats.rows
    assert "sk-" not in stats.to_json()
    assert all("[KEY]" in r.prompt and "[KEY]" in r.proxy_pick.text and "[KEY]" in r.true_pick.text for r in stats.rows)


def test_redact_sees_a_secret_across_the_cut_and_never_shows_part_of_one():
    def redact(text: str) -> str:
        return re.sub(r"sk-[a-j]+", "[KEY]", text)

    secret = "sk-" + "abcdefghij" * 3
    across = "x" * 1990 + secret + "y" * 500  # the secret straddles the cut at 2,000
    assert kept_text(across, 2000, redact) == "x" * 1990 + "[KEY]" + "y" * 5 + " …[cut: 2,523 characters in all]"
    # longer than the window redact sees: the window's last REDACT_MARGIN characters (after redaction)
    # go too, so a redaction that shrank the window by 28 characters shows 28 fewer
    longer = across + "y" * 5000
    assert kept_text(longer, 2000, redact) == "x" * 1972 + " …[cut: 7,523 characters in all]"

    # A secret cut by the end of the window redact sees (its first 10 characters too short for the
    # pattern), after a redaction that shrank the window by far more than the margin: not shown.
    def long_keys(text: str) -> str:
        return re.sub(r"sk-[a-j]{20,}", "[KEY]", text)

    window_end = 2000 + REDACT_MARGIN
    shrinking = "sk-" + "a" * 2900 + "z" * (window_end - 2903 - 10) + secret + "tail" * 100
    assert long_keys(shrinking[:window_end]).endswith("sk-abcdefg")  # what redact leaves at the window's end
    kept = kept_text(shrinking, 2000, long_keys)
    assert "sk-" not in kept and "abc" not in kept


def test_a_failing_redact_withholds_the_text():
    def redact(text: str) -> str:
        raise ValueError("cannot parse")

    proxy, true, texts = one_prompt("private")
    stats = hack_statistics(proxy, true, texts, redact=redact)
    assert "private" not in stats.to_json() and "prompt" not in stats.rows[0].prompt
    assert stats.rows[0].proxy_pick.text == f"{REDACTION_FAILED} (ValueError)"
    stats = hack_statistics(proxy, true, texts, redact=lambda s: None)
    assert stats.rows[0].proxy_pick.text.startswith(REDACTION_FAILED)


def test_the_table_is_bounded_in_bytes_dropping_rows_from_the_bottom():
    rng = np.random.default_rng(4)
    P, N = 40, 3
    completions = [["🙂" * 3000 for _ in range(N)] for _ in range(P)]  # 4 bytes a character in UTF-8
    proxy, true = rng.normal(size=(P, N)), rng.normal(size=(P, N))
    texts = check_texts(["🙂" * 3000] * P, completions, [N] * P)
    full = hack_statistics(proxy, true, texts, k=P, max_table_bytes=10**8)
    bounded = hack_statistics(proxy, true, texts, k=P, max_table_bytes=100_000)
    size = len(bounded.to_json().encode("utf-8"))
    assert size <= 100_000 and size > 100_000 - 30_000  # one more row would not fit (a row is ~24 KB)
    assert bounded.rows == full.rows[: len(bounded.rows)]
    assert bounded.rows_dropped == len(full.rows) - len(bounded.rows) > 0
    assert HackStatistics.from_json(bounded.to_json()) == bounded


def test_bad_arguments_are_named():
    proxy, true, texts = one_prompt("x")
    with pytest.raises(TypeError, match="texts must come from check_texts"):
        hack_statistics(proxy, true, [["x", "y"]])
    with pytest.raises(ValueError, match="max_chars must be an integer >= 1"):
        hack_statistics(proxy, true, texts, max_chars=0)
    with pytest.raises(ValueError, match="max_table_bytes must be an integer >= 16384"):
        hack_statistics(proxy, true, texts, max_table_bytes=100)
    with pytest.raises(ValueError, match=r"proxy_rows\[0\] has 3 scores for 2 completions"):
        hack_statistics([[1.0, 2.0, 3.0]], true, texts)
    with pytest.raises(TypeError, match="text feature 'n' must be a function"):
        hack_statistics(proxy, true, texts, features={"n": 3})
    with pytest.raises(TypeError, match="redact must be a function"):
        hack_statistics(proxy, true, texts, redact="no")


# ---- integrations: the texts each one passes ------------------------------------------------------------------
#
# ``TextsTracker`` stands in for issue 16's ``BonTracker.log_scores(..., prompts=, completions=)``
# until the tracker has those arguments: a real BonTracker (a real run folder) that also runs
# check_texts and hack_statistics on what the integration passed. Once the tracker takes texts,
# these tests should read the hack table back from the run instead.


def texts_tracker(root, name):
    from bon_tracker.tracking.tracker import BonTracker

    class TextsTracker(BonTracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.hacks: list[tuple[int, Texts, HackStatistics]] = []

        def log_scores(self, step, proxy, true, *, policy_kl=None, prompts=None, completions=None, **context):
            curve = super().log_scores(step, proxy, true, policy_kl=policy_kl, **context)
            if curve is not None and prompts is not None:
                texts = check_texts(prompts, completions, [len(row) for row in proxy])
                self.hacks.append((step, texts, hack_statistics(proxy, true, texts)))
            return curve

    return TextsTracker("local", root=root, run_name=name)


def words(text: str) -> int:
    return len(text.split())


def length_hacks(stats: HackStatistics) -> int:
    """tests/tiny_models.py's proxy rewards words and its true reward punishes them past three: a pick the
    true reward beats is always the longer one (equal "good" counts cannot reverse the order). Returns
    how many rows were checked."""
    beaten = [row for row in stats.rows if row.proxy_pick.true < row.true_pick.true]
    for row in beaten:
        assert words(row.proxy_pick.text) > words(row.true_pick.text)
    return len(beaten)


def test_transformers_callback_passes_the_sampled_completions(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from bon_tracker.integrations.transformers import BonTrackerCallback
    from tests.test_integration_transformers import N, _trainer
    from tests.tiny_models import PROMPTS, RecordingScorer, proxy_reward, true_reward

    tracker = texts_tracker(tmp_path / "runs", "hf")
    proxy = RecordingScorer(lambda p, c: torch.tensor(proxy_reward(p, c)))
    callback = BonTrackerCallback(
        tracker, prompts=PROMPTS, proxy_fn=proxy, true_fn=true_reward, num_samples=N,
        generation_kwargs={"max_new_tokens": 8},
    )  # fmt: skip
    _trainer(tmp_path, [callback]).train()
    assert [step for step, _, _ in tracker.hacks] == [2, 4]
    checked = 0
    for call, (_, texts, stats) in enumerate(tracker.hacks):
        _, completions, _ = proxy.calls[call]
        assert texts.prompts == tuple(PROMPTS)
        assert texts.completions == tuple(tuple(completions[i * N : (i + 1) * N]) for i in range(len(PROMPTS)))
        checked += length_hacks(stats)
    assert checked > 0  # the proxy is gamed somewhere, and its picks are the long completions
    tracker.finish()

    quiet = texts_tracker(tmp_path / "runs", "hf-quiet")
    callback = BonTrackerCallback(
        quiet, prompts=PROMPTS, proxy_fn=proxy_reward, true_fn=true_reward, num_samples=N,
        generation_kwargs={"max_new_tokens": 4}, log_texts=False,
    )  # fmt: skip
    _trainer(tmp_path, [callback], max_steps=2).train()
    assert quiet.hacks == [] and [r.step for r in quiet.history] == [2]
    quiet.finish()


def test_trl_callback_passes_each_groups_prompt_and_completions(tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from bon_tracker.integrations.trl import BonTrackerCallback, as_text
    from tests.test_integration_trl import G, likes_good
    from tests.tiny_models import PROMPTS, tiny_gpt2, tiny_tokenizer, true_reward

    tokenizer = tiny_tokenizer()
    model_dir = tmp_path / "model"
    tiny_gpt2(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    gold_calls = []

    def gold(prompts, completions, **kwargs):
        gold_calls.append((list(prompts), list(completions)))
        return true_reward(prompts, completions)

    tracker = texts_tracker(tmp_path / "runs", "grpo")
    bon = BonTrackerCallback(tracker, reward_funcs=[likes_good], true_fn=gold)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=G, num_generations=G,
        num_generations_eval=G, per_device_eval_batch_size=2 * G, max_completion_length=8, beta=0.0,
        eval_strategy="steps", eval_steps=1, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    GRPOTrainer(
        model=str(model_dir),
        reward_funcs=bon.reward_funcs,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS * 2}),
        eval_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
        callbacks=[bon],
    ).train()
    assert [step for step, _, _ in tracker.hacks] == [1, 2]
    checked = 0
    for (_, texts, stats), (prompts, completions) in zip(tracker.hacks, gold_calls, strict=True):
        assert texts.prompts == tuple(prompts[::G])
        assert texts.completions == tuple(tuple(completions[i : i + G]) for i in range(0, len(completions), G))
        checked += length_hacks(stats)
    assert checked > 0
    tracker.finish()
    conversation = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
    ]
    assert as_text(conversation) == "user: hi\nassistant: yo"


def test_lightning_callback_passes_the_returned_texts(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from bon_tracker.integrations.lightning import BonTrackerCallback
    from tests.test_integration_lightning import TinyPolicy, _fit

    class TextPolicy(TinyPolicy):
        def validation_step(self, batch, batch_idx):
            out = super().validation_step(batch, batch_idx)
            rows = out["bon_proxy"].shape[0]
            out["bon_prompts"] = [f"prompt {batch_idx}.{i}" for i in range(rows)]
            out["bon_completions"] = [
                [f"c{batch_idx}.{i}.{j}" for j in range(out["bon_proxy"].shape[1])] for i in range(rows)
            ]
            return out

    tracker = texts_tracker(tmp_path / "runs", "lit")
    module = _fit(tmp_path, [BonTrackerCallback(tracker)], max_epochs=1, module=TextPolicy())
    ((step, texts, stats),) = tracker.hacks
    assert step == 4 and texts.prompts == (
        "prompt 0.0",
        "prompt 0.1",
        "prompt 0.2",
        "prompt 1.0",
        "prompt 1.1",
        "prompt 1.2",
    )
    proxy = np.vstack([p for p, _ in module.returned[4]])
    true = np.vstack([t for _, t in module.returned[4]])
    assert stats == hack_statistics(proxy, true, texts)
    tracker.finish()

    quiet = texts_tracker(tmp_path / "runs", "lit-quiet")
    _fit(tmp_path, [BonTrackerCallback(quiet, log_texts=False)], max_epochs=1, module=TextPolicy())
    assert quiet.hacks == [] and [r.step for r in quiet.history] == [4]
    quiet.finish()


# ---- bon-tracker analyze: text columns -------------------------------------------------------------------------


def analyze_rows(rng, steps=2, P=12, N=5):
    """Per-sample rows of a length hack, with texts that need escaping; and each step's direct statistics."""
    rows, expected = [], {}
    for step in range(steps):
        lengths = rng.integers(1, 30 + 20 * step, size=(P, N))
        completions = [[f"<b>é|{i}</b>\n" + "w " * int(lengths[i, j]) for j in range(N)] for i in range(P)]
        prompts = [f"prompt | {i} 🙂\nline" for i in range(P)]
        proxy = lengths + rng.normal(scale=0.5, size=(P, N))
        true = -lengths + rng.normal(scale=0.5, size=(P, N))
        expected[step] = hack_statistics(proxy, true, check_texts(prompts, completions, [N] * P))
        for i in range(P):
            for j in range(N):
                rows.append(
                    {"step": step, "prompt_id": f"q{i}", "proxy": float(proxy[i, j]), "true": float(true[i, j]),
                     "question": prompts[i], "answer": completions[i][j]}
                )  # fmt: skip
    return rows, expected


def check_hack_summary(summary: dict, expected: dict) -> None:
    steps = summary["runs"][0]["steps"]
    assert [s["step"] for s in steps] == sorted(expected)
    for s in steps:
        want = expected[s["step"]]
        length = next(f for f in want.features if f.name == "length_chars")
        assert s["hack_rows"] == len(want.rows) == 10
        assert s["hack_prompts_losing"] == want.prompts_losing
        assert s["hack_top_prompt"] == want.rows[0].prompt_index
        assert s["hack_top_gap"] == pytest.approx(want.rows[0].gap, rel=1e-12)
        assert s["length_chars_pick"] == pytest.approx(length.pick, rel=1e-12)
        assert s["length_chars_all"] == pytest.approx(length.all, rel=1e-12)
        assert length.pick > length.all  # the proxy's picks are the long completions


@pytest.mark.parametrize("batch_rows", ["7", "100000"])
def test_analyze_reads_text_columns_into_a_hack_table(tmp_path, capsys, batch_rows):
    from tests.test_cli import analyze_json

    rows, expected = analyze_rows(np.random.default_rng(6))
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = analyze_json(
        capsys, path, "--prompt-text-col", "question", "--completion-col", "answer", "--out", tmp_path / "runs",
        "--batch-rows", batch_rows,
    )  # fmt: skip
    check_hack_summary(summary, expected)


def test_analyze_texts_of_shuffled_rows_csv_and_rows_of_one_prompt(tmp_path, capsys):
    import csv

    from tests.test_cli import analyze_json

    rows, expected = analyze_rows(np.random.default_rng(7))
    options = ("--prompt-text-col", "question", "--completion-col", "answer")
    # shuffled rows (the buffered pass), as CSV; prompts keep the order they first appear in
    order = np.random.default_rng(8).permutation(len(rows))
    first_seen = {}
    for r in (rows[i] for i in order):
        first_seen.setdefault((r["step"], r["prompt_id"]), len(first_seen))
    path = tmp_path / "shuffled.csv"
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    summary = analyze_json(capsys, path, *options, "--out", tmp_path / "runs")
    for s in summary["runs"][0]["steps"]:
        want = expected[s["step"]]
        top = want.rows[0].prompt_index  # its index in the file's prompt order, unshuffled
        ranks = sorted(k for k in first_seen if k[0] == s["step"])
        position = sorted(ranks, key=first_seen.get).index((s["step"], f"q{top}"))
        assert s["hack_top_prompt"] == position
        assert s["hack_top_gap"] == pytest.approx(want.rows[0].gap, rel=1e-12)
    # one row per prompt: the completion column holds a list
    by_prompt = {}
    for r in rows:
        entry = by_prompt.setdefault((r["step"], r["prompt_id"]), {**r, "proxy": [], "true": [], "answer": []})
        for key in ("proxy", "true", "answer"):
            entry[key].append(r[key])
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in by_prompt.values()), encoding="utf-8")
    check_hack_summary(analyze_json(capsys, path, *options, "--out", tmp_path / "runs"), expected)


def test_analyze_texts_from_parquet(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from tests.test_cli import analyze_json

    rows, expected = analyze_rows(np.random.default_rng(9))
    path = tmp_path / "samples.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=17)
    options = ("--prompt-text-col", "question", "--completion-col", "answer", "--out", tmp_path / "runs")
    check_hack_summary(analyze_json(capsys, path, *options), expected)


def test_analyze_text_column_errors_name_the_place(tmp_path, capsys):
    from bon_tracker.cli.main import EXIT_USAGE
    from tests.test_cli import cli

    path = tmp_path / "s.jsonl"
    path.write_text(
        '{"prompt_id": "a", "proxy": 1, "true": 0, "question": "q", "answer": "x"}\n'
        '{"prompt_id": "a", "proxy": 0, "true": 1, "question": "q", "answer": 3}\n'
    )
    code, _, err = cli(capsys, "analyze", path, "--prompt-text-col", "question", "--completion-col", "answer", "-q")
    assert code != 0 and "s.jsonl line 2, column 'answer': 3 is not a text" in err
    code, _, err = cli(capsys, "analyze", path, "--prompt-text-col", "question", "--completion-col", "reply", "-q")
    assert code != 0 and "line 1, column 'reply': missing" in err and "--completion-col" in err
    code, _, err = cli(capsys, "analyze", path, "--prompt-text-col", "question", "-q")
    assert code == EXIT_USAGE and "--prompt-text-col and --completion-col go together" in err
