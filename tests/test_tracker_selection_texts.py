"""BonTracker with reward-model ensembles, several true rewards and texts (issues 15 and 16):
the returned curve is the deployed rule's, the record's selection statistics and hack table
equal the core's own computation on the same scores, bad input is named, and the alert rules
run on the deployed rule under every true reward."""

from __future__ import annotations

import numpy as np
import pytest

from bon_tracker import BonTracker, bon_curve
from bon_tracker.backends.local import read_records
from bon_tracker.core.selection import rule_scores, selection_input
from bon_tracker.core.selection_stats import compute_selection_statistics
from bon_tracker.texts import check_texts, hack_statistics

SETTINGS = {"n_resamples": 40, "lambdas": [0.0, 1.0, float("inf")]}  # small: the values are compared, not studied


def _ensemble(seed: int, prompts: int = 20, samples: int = 8, members: int = 3):
    rng = np.random.default_rng(seed)
    true = rng.normal(size=(prompts, samples))
    return {f"rm{k}": true + rng.standard_t(2, size=true.shape) for k in range(members)}, true


def _tracker(tmp_path, name: str, **options) -> BonTracker:
    return BonTracker(
        "local", root=tmp_path / "runs", run_name=name, charts=False, spool_dir=tmp_path / "spool", **options
    )


@pytest.mark.parametrize("rule", ["mean", "worst", "uwo", "rm1"])
def test_an_ensemble_logs_the_deployed_rules_curve_and_every_rules_statistics(tmp_path, rule):
    members, true = _ensemble(0)
    harmless = np.random.default_rng(9).normal(size=true.shape)
    trues = {"helpful": true, "harmless": harmless}
    tracker = _tracker(tmp_path, rule, selection_rule=rule, selection=SETTINGS)
    curve = tracker.log_scores(0, members, trues)
    tracker.finish(60)
    inp = selection_input(members, trues)
    assert curve.to_dict() == bon_curve(rule_scores(inp, rule, 0.5), true).to_dict()
    (record,) = read_records(tmp_path / "runs" / rule)
    assert record.curve.to_dict() == curve.to_dict()
    expected = compute_selection_statistics(inp, **SETTINGS)
    assert record.selection.to_json() == expected.to_json()
    assert record.selection.rules == ("rm0", "rm1", "rm2", "mean", "worst", "uwo")
    assert record.selection.true_names == ("helpful", "harmless")


def test_members_as_an_array_or_a_tensor_give_the_same_record(tmp_path):
    torch = pytest.importorskip("torch")
    members, true = _ensemble(1)
    stacked = np.stack(list(members.values()))
    tracker = _tracker(tmp_path, "arr", selection=SETTINGS)
    a = tracker.log_scores(0, stacked, true)
    b = tracker.log_scores(1, torch.tensor(stacked), torch.tensor(true))
    c = tracker.log_scores(2, members, {"true": true})
    tracker.finish(60)
    assert a.to_dict() == b.to_dict() == c.to_dict()
    records = read_records(tmp_path / "runs" / "arr")
    assert records[0].selection.rules == ("member_0", "member_1", "member_2", "mean", "worst", "uwo")
    assert [r.selection.get("mean").to_dict() for r in records[:2]] == [records[0].selection.get("mean").to_dict()] * 2


def test_a_plain_proxy_gets_selection_statistics_only_when_asked(tmp_path):
    members, true = _ensemble(2)
    plain = _tracker(tmp_path, "plain")
    plain.log_scores(0, members["rm0"], true)
    plain.finish(60)
    asked = _tracker(tmp_path, "asked", selection=SETTINGS, proxy_name="rm", true_name="gold")
    asked.log_scores(0, members["rm0"], true)
    asked.finish(60)
    assert read_records(tmp_path / "runs" / "plain")[0].selection is None
    (record,) = read_records(tmp_path / "runs" / "asked")
    expected = compute_selection_statistics(selection_input({"rm": members["rm0"]}, {"gold": true}), **SETTINGS)
    assert record.selection.to_json() == expected.to_json()


def test_bad_ensembles_and_settings_are_named(tmp_path):
    members, true = _ensemble(3)
    tracker = _tracker(tmp_path, "bad")
    short = {**members, "rm2": members["rm2"][:, :5]}
    with pytest.raises(ValueError, match="rm2"):
        tracker.log_scores(0, short, true)
    with pytest.raises(ValueError, match=r"selection_rule 'best' is neither"):
        _tracker(tmp_path, "rule", selection_rule="best").log_scores(0, members, true)
    with pytest.raises(ValueError, match=r"selection: unknown setting\(s\) \['n_resample'\]"):
        _tracker(tmp_path, "settings", selection={"n_resample": 10})
    with pytest.raises(ValueError, match=r"hack_table: unknown setting\(s\) \['rows'\]"):
        _tracker(tmp_path, "hack", hack_table={"rows": 3})
    assert tracker.last_step is None  # nothing was logged


def _texts(proxy: np.ndarray):
    """Completions whose length follows the proxy (the proxy rewards length), with HTML and pipes."""
    prompts = [f"prompt <{i}> | what?" for i in range(proxy.shape[0])]
    completions = [[f"ans{j} " + "<b>x</b> | " * int(3 + 2 * v) for j, v in enumerate(row)] for row in np.abs(proxy)]
    return prompts, completions


def test_texts_become_the_hack_table_the_core_computes_after_redaction(tmp_path):
    members, true = _ensemble(4)
    proxy = members["rm0"]
    prompts, completions = _texts(proxy)
    redact = lambda text: text.replace("ans", "[id]")  # noqa: E731
    tracker = _tracker(tmp_path, "texts", redact=redact, hack_table={"k": 5, "max_chars": 60})
    tracker.log_scores(0, proxy, true, prompts=prompts, completions=completions)
    prompts[0] = "changed after the call"  # the tracker kept its own copy
    off = _tracker(tmp_path, "off", log_texts=False)
    off.log_scores(0, proxy, true, prompts=prompts, completions=completions)
    tracker.finish(60)
    off.finish(60)
    (record,) = read_records(tmp_path / "runs" / "texts")
    expected = hack_statistics(
        proxy, true, check_texts(_texts(proxy)[0], completions, [8] * 20), k=5, max_chars=60, redact=redact
    )
    assert record.hacks == expected and len(record.hacks.rows) == 5
    assert all("ans" not in row.proxy_pick.text and "ans" not in row.true_pick.text for row in record.hacks.rows)
    assert read_records(tmp_path / "runs" / "off")[0].hacks is None


def test_texts_that_do_not_match_the_scores_are_named(tmp_path):
    members, true = _ensemble(5)
    prompts, completions = _texts(members["rm0"])
    tracker = _tracker(tmp_path, "mismatch")
    with pytest.raises(ValueError, match="pass both prompts= and completions="):
        tracker.log_scores(0, members["rm0"], true, prompts=prompts)
    completions[3] = completions[3][:-1]
    with pytest.raises(ValueError, match=r"completions\[3\] has 7 completions for 8 scores"):
        tracker.log_scores(0, members["rm0"], true, prompts=prompts, completions=completions)
    with pytest.raises(TypeError, match=r"completions\[1\]\[2\] must be a string"):
        bad = [list(row) for row in _texts(members["rm0"])[1]]
        bad[1][2] = None
        tracker.log_scores(0, members["rm0"], true, prompts=prompts, completions=bad)


def test_the_alert_rules_run_on_the_deployed_rule_under_every_true_reward(tmp_path):
    tracker = _tracker(tmp_path, "two_trues", selection={"n_resamples": 40, "lambdas": [0.0, float("inf")]})
    levels = ((0.0, 0.0), (0.0, 1.0), (0.0, -1.0))  # helpful flat; harmless rises, then falls
    for step, (helpful, harmless) in enumerate(levels):
        rng = np.random.default_rng(step)
        noise = rng.normal(size=(64, 8))
        members = {f"rm{k}": step + noise + 0.01 * rng.normal(size=noise.shape) for k in range(2)}
        trues = {
            "helpful": helpful + 0.3 * rng.normal(size=noise.shape),
            "harmless": harmless + 0.3 * noise + 0.05 * rng.normal(size=noise.shape),
        }
        tracker.log_scores(step, members, trues)
    assert tracker.wait(60)
    onsets = [(a.step, a.rule) for a in tracker.alerts]
    assert (2, "policy_true_falls") in onsets
    assert all(a.message.startswith("[true reward 'harmless']") for a in tracker.alerts)
    state = tracker.state()
    assert set(state["alerts_by_true"]) == {"harmless"}
    tracker.finish(60)
    last = read_records(tmp_path / "runs" / "two_trues")[-1]
    assert last.alert_states["harmless/policy_true_falls"] == 1 and last.alert_states["policy_true_falls"] == 0
    resumed = _tracker(tmp_path, "two_trues_resumed", resume=state)
    assert resumed._true_alerts["harmless"].state_dict() == state["alerts_by_true"]["harmless"]
