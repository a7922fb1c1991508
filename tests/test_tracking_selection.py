"""The tracker's selection entry points: member checking, the JSON record, alerts per rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bon_tracker.core.alerts import AlertMonitor, AlertRules
from bon_tracker.tracking.selection import (
    SelectionStatistics,
    check_members,
    selection_alert_summaries,
    selection_statistics,
)


def _eval(seed=0, P=200, N=16, K=5):
    rng = np.random.default_rng(seed)
    true = rng.standard_normal((P, N))
    members = {f"rm{k}": true + rng.standard_normal((P, N)) for k in range(K)}
    trues = {"gold": true, "verifier": (true > 0.5).astype(float)}
    return members, trues


def test_json_round_trip_is_exact_and_bounded():
    members, trues = _eval()
    stats = selection_statistics(members, trues, rules=["mean", "worst", "uwo"], n_resamples=50)
    text = stats.to_json()
    back = SelectionStatistics.from_json(text)
    assert back.to_json() == text
    assert json.loads(text) == json.loads(back.to_json())
    assert back.get("worst", "verifier").curve("bop").values == stats.get("worst", "verifier").curve("bop").values
    assert len(text) < 100_000  # 3 rules x 2 true rewards x 3 families, plus optima and frontier
    assert {row["rule"] for row in back.table()} == {"mean", "worst", "uwo"}
    assert set(stats.frontier) == {"gold", "verifier"}


def test_every_statistic_exists_per_rule_and_true_reward():
    members, trues = _eval(K=2)
    stats = selection_statistics(members, trues, n_resamples=20)
    assert stats.rules == ("rm0", "rm1", "mean", "worst", "uwo")
    assert len(stats.statistics) == 10
    for s in stats.statistics:
        assert [c.family for c in s.curves] == ["bon", "bop", "soft"]
        assert {(o.family, o.method) for o in s.optima} == {
            (f, m) for f in ("bon", "bop", "soft") for m in ("derivative_root", "curve_argmax")
        }


def test_check_members_names_the_member_and_prompt():
    good = np.zeros((3, 4))
    with pytest.raises(ValueError, match=r"proxy 'b' prompt 1 has 3 samples but proxy 'a' has 4"):
        check_members({"a": [[0, 1, 2, 3], [0, 1, 2, 3]], "b": [[0, 1, 2, 3], [0, 1, 2]]})
    with pytest.raises(ValueError, match=r"proxy 'b' has 3 prompts but proxy 'a' has 2"):
        check_members({"a": np.zeros((2, 4)), "b": good})
    bad = good.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"proxy 'rm_b' has 1 non-finite value\(s\).*\(2, 1\).*nan_policy='omit'"):
        check_members({"rm_a": good, "rm_b": bad})
    names, rows = check_members({"rm_a": good, "rm_b": bad}, nan_policy="omit")
    assert names == ("rm_a", "rm_b") and [r.shape for r in rows] == [(2, 4), (2, 4), (2, 3)]
    with pytest.raises(TypeError, match="proxy 'x'"):
        check_members({"x": [["a", "b"]]})
    with pytest.raises(ValueError, match="empty mapping"):
        check_members({})


def test_check_members_forms():
    arr = np.arange(24.0).reshape(2, 3, 4)
    assert check_members(arr)[0] == ("member_0", "member_1")
    assert check_members(arr[0])[0] == ("member",)
    names, rows = check_members([[[1.0, 2.0], [3.0]], [[0.0, 1.0], [2.0]]])  # two ragged members
    assert names == ("member_0", "member_1") and [r.tolist() for r in rows] == [
        [[1.0, 2.0], [0.0, 1.0]],
        [[3.0], [2.0]],
    ]


def test_ragged_prompts_and_omitted_samples_give_statistics():
    rng = np.random.default_rng(4)
    lengths = [12, 16, 16, 9] * 10
    true = [rng.standard_normal(n) for n in lengths]
    members = {
        "a": [t + rng.standard_normal(len(t)) for t in true],
        "b": [t + rng.standard_normal(len(t)) for t in true],
    }
    members["a"][3][0] = np.nan
    stats = selection_statistics(members, true, nan_policy="omit", n_resamples=20)
    assert stats.N == 16
    bon = stats.get("mean").curve("bon")
    assert bon.values[-1] == 16 and all(math.isfinite(v) for v in bon.true_mean)
    assert stats.get("mean").curve("bop").values[-1] <= 8  # the BoP grid is set by the smallest prompt (8 after omit)
    with pytest.raises(ValueError, match="non-finite"):
        selection_statistics(members, true)


def test_true_reward_shapes_must_match_the_members():
    with pytest.raises(ValueError, match=r"true 'gold' prompt 0 has 3 samples but proxy 'a' has 4"):
        selection_statistics({"a": np.zeros((2, 4))}, {"gold": [[0, 1, 2], [0, 1, 2]]})


def test_bad_options_are_named():
    members, trues = _eval(P=10, N=8, K=2)
    with pytest.raises(ValueError, match="unknown selection rule 'best'"):
        selection_statistics(members, trues, rules=["best"])
    with pytest.raises(ValueError, match="uwo_lambda"):
        selection_statistics(members, trues, uwo_lambda=math.nan)
    with pytest.raises(ValueError, match="mus has 65 points"):
        selection_statistics(members, trues, mus=np.linspace(0, 8, 65))


def test_one_alert_monitor_per_rule_fires_on_the_rule_in_use():
    rng = np.random.default_rng(6)
    P, N = 300, 32
    monitors: dict = {}
    fired = set()
    for step in range(2):
        true = rng.standard_normal((P, N))
        hack = 0.5 * rng.standard_normal((P, N))
        a = true + 0.3 * rng.standard_normal((P, N)) if step == 0 else -true + 3.0 + hack  # rm a gets hacked
        b = true + 0.3 * rng.standard_normal((P, N))
        stats = selection_statistics({"a": a, "b": b}, true, rules=["a", "b"], lambdas=[0.0], n_resamples=20)
        for key, summary in selection_alert_summaries(stats, step).items():
            monitor = monitors.setdefault(key, AlertMonitor(AlertRules(window=1)))
            fired |= {(key, event.rule) for event in monitor.update(summary)}
    assert ((("a", "true"), "bon_true_falls")) in fired
    assert not any(key == ("b", "true") for key, _ in fired)
