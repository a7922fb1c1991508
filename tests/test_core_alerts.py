"""Alert rules and the alert state machine: known onsets, once per onset, clears, resume."""

from __future__ import annotations

import json
import math

import pytest

from bon_tracker.core import bon_curve, bon_estimate, default_ns
from bon_tracker.core.alerts import RULES, Alert, AlertCleared, AlertMonitor, AlertRules, EvalSummary
from bon_tracker.core.simulation import simulated_runs
from bon_tracker.core.uncertainty import goodhart_interval
from bon_tracker.record import metric_key


def summary(step, true, proxy, se=0.1, *, n=(1,), policy_kl=None, kl=math.nan, kl_low=math.nan, kl_high=math.nan):
    """A summary with the same values at every n of the grid."""
    G = len(n)
    return EvalSummary(
        step, n=n, true_mean=(true,) * G, true_se=(se,) * G, proxy_mean=(proxy,) * G, proxy_se=(se,) * G,
        policy_kl=policy_kl, goodhart_kl=kl, goodhart_kl_low=kl_low, goodhart_kl_high=kl_high,
    )  # fmt: skip


# ---- rules configuration ---------------------------------------------------------------------
def test_every_rule_is_on_by_default_and_dict_round_trips():
    rules = AlertRules()
    assert all(getattr(rules, rule) for rule in RULES)
    assert AlertRules.from_dict(rules.to_dict()) == rules
    assert AlertRules.from_dict(None) == rules


def test_from_dict_coerces_env_strings_and_rejects_unknown_or_bad_values():
    rules = AlertRules.from_dict(
        {"window": "5", "fall_z": "2.5", "goodhart_kl": "off", "kl_budget": "10", "bon_n": 16.0}
    )
    assert (rules.window, rules.fall_z, rules.goodhart_kl, rules.kl_budget, rules.bon_n) == (5, 2.5, False, 10.0, 16)
    with pytest.raises(ValueError, match="unknown alert setting 'fallz'"):
        AlertRules.from_dict({"fallz": 1})
    with pytest.raises(ValueError, match="window"):
        AlertRules.from_dict({"window": 0})
    with pytest.raises(ValueError, match=r"window.*integer"):
        AlertRules.from_dict({"window": 2.5})
    with pytest.raises(ValueError, match=r"fall_z.*number"):
        AlertRules.from_dict({"fall_z": "lots"})
    with pytest.raises(ValueError, match="true or false"):
        AlertRules.from_dict({"headroom_shrinks": "maybe"})
    with pytest.raises(ValueError, match="kl_budget"):
        AlertRules(kl_budget=-1.0)
    with pytest.raises(ValueError, match="headroom_ratio"):
        AlertRules(headroom_ratio=1.5)
    with pytest.raises(ValueError, match="headroom_n"):
        AlertRules(headroom_n=0.5)
    with pytest.raises(ValueError, match="goodhart_kl_spread"):
        AlertRules(goodhart_kl_spread=1.0)
    assert AlertRules.from_dict({"headroom_n": "inf", "goodhart_kl_spread": "inf"}).headroom_n == math.inf
    with pytest.raises(TypeError):
        AlertRules.from_dict([("window", 3)])


# ---- rules 1 and 2 ---------------------------------------------------------------------------
def test_true_falls_fires_once_at_the_known_onset_and_clears():
    monitor = AlertMonitor(AlertRules(fall_z=3.0, window=3, bon_true_falls=False))
    se = 0.1  # a difference of two evals has sd 0.1 * sqrt(2) = 0.1414: 3 SE = 0.424
    trues = [0.0, 0.5, 1.0, 0.8, 0.55, 0.5, 0.3, 1.2, 1.3]
    events = [monitor.update(summary(step, t, step * 1.0, se)) for step, t in enumerate(trues)]
    onsets = [(s, e.rule) for s, ev in enumerate(events) for e in ev if isinstance(e, Alert)]
    clears = [(s, e.rule, e.onset_step) for s, ev in enumerate(events) for e in ev if isinstance(e, AlertCleared)]
    # step 4: 1.0 - 0.55 = 0.45 > 0.424 against step 2; 3: 0.2 is not enough; 5, 6 stay active
    assert onsets == [(4, "policy_true_falls")]
    assert clears == [(7, "policy_true_falls", 4)]
    alert = events[4][0]
    assert alert.value == pytest.approx(0.45 / (se * math.sqrt(2))) and alert.threshold == 3.0
    assert alert.reference_step == 2
    assert monitor.active == {}


def test_true_falling_without_a_proxy_rise_is_not_goodhart():
    monitor = AlertMonitor(AlertRules(bon_true_falls=False))
    steps = [(0, 1.0, 1.0), (1, 0.0, 0.9), (2, -1.0, 0.8)]  # both fall: a bad run, not overoptimization
    assert all(monitor.update(summary(s, t, p)) == [] for s, t, p in steps)


def test_the_window_limits_how_far_back_the_fall_is_judged():
    trues = [2.0, 1.8, 1.6, 1.4, 1.2]  # 3 SE of a difference = 0.636: only step 4 against step 0 is enough
    for window, fires in ((3, False), (4, True)):
        monitor = AlertMonitor(AlertRules(window=window, fall_z=3.0, bon_true_falls=False))
        events = [monitor.update(summary(s, t, float(s), se=0.15)) for s, t in enumerate(trues)]
        assert any(events[4]) is fires
        assert not any(events[:4])


def test_bon_rule_reads_the_chosen_n():
    n = (1, 4, 16)

    def at(step, true_at_4):
        return EvalSummary(
            step, n=n, true_mean=(0.0, true_at_4, 0.0), true_se=(0.1,) * 3, proxy_mean=(step, step + 1.0, step + 2.0),
            proxy_se=(0.1,) * 3,
        )  # fmt: skip

    monitor = AlertMonitor(AlertRules(bon_n=4))
    assert monitor.update(at(0, 1.0)) == []
    (alert,) = monitor.update(at(1, 0.0))
    assert alert.rule == "bon_true_falls" and "best-of-4" in alert.message
    default = AlertMonitor(AlertRules())  # the largest n: flat at 0, never fires
    assert default.update(at(0, 1.0)) == [] and default.update(at(1, 0.0)) == []


# ---- rules 3 and 4 ---------------------------------------------------------------------------
def test_goodhart_kl_fires_when_policy_kl_reaches_the_reference_fit():
    monitor = AlertMonitor(AlertRules(policy_true_falls=False, bon_true_falls=False, headroom_shrinks=False))
    kls = [0.0, 0.5, 1.0, 1.6, 2.0, 1.0]
    events = []
    for step, kl in enumerate(kls):
        ref = {"kl": 1.5, "kl_low": 1.0, "kl_high": 2.5} if step == 0 else {"kl": 0.1, "kl_low": 0.0, "kl_high": 0.5}
        events.append(monitor.update(summary(step, 0.0, 0.0, policy_kl=kl, **ref)))
    assert [bool(e) for e in events] == [False, False, False, True, False, True]
    onset = events[3][0]
    assert (onset.rule, onset.value, onset.threshold, onset.reference_step) == ("goodhart_kl", 1.6, 1.5, 0)
    assert events[5][0].kind == "clear"


def test_goodhart_kl_needs_a_significant_reference_peak_but_the_budget_always_applies():
    rules = AlertRules(policy_true_falls=False, bon_true_falls=False, headroom_shrinks=False, kl_budget=3.0)
    monitor = AlertMonitor(rules)
    no_peak = {"kl": 1.0, "kl_low": 0.5, "kl_high": math.inf}  # the interval reaches "no peak"
    assert monitor.update(summary(0, 0.0, 0.0, policy_kl=0.0, **no_peak)) == []
    assert monitor.update(summary(1, 0.0, 0.0, policy_kl=2.0, **no_peak)) == []
    (alert,) = monitor.update(summary(2, 0.0, 0.0, policy_kl=3.0, **no_peak))
    assert alert.threshold == 3.0 and "budget" in alert.message


def test_goodhart_kl_ignores_a_vague_reference_peak():
    rules = AlertRules(policy_true_falls=False, bon_true_falls=False, headroom_shrinks=False)
    vague = {"kl": 1.0, "kl_low": 0.5, "kl_high": 40.0}  # bounded, but known only within a factor of 40
    for spread, fires in ((10.0, False), (math.inf, True)):
        monitor = AlertMonitor(AlertRules(**{**rules.to_dict(), "goodhart_kl_spread": spread}))
        assert monitor.update(summary(0, 0.0, 0.0, policy_kl=0.0, **vague)) == []
        assert bool(monitor.update(summary(1, 0.0, 0.0, policy_kl=1.2, **vague))) is fires


def test_headroom_fires_when_the_headroom_is_all_but_gone():
    rules = AlertRules(policy_true_falls=False, bon_true_falls=False, goodhart_kl=False)
    floor = math.log(3.0) - 2.0 / 3.0  # KL of best-of-3 (headroom_n = 3): 0.432 nats
    points = [(2.0, 1.5, 3.0), (1.2, 0.8, 1.8), (0.9, 0.6, 1.4), (0.3, 0.15, 0.5), (0.2, 0.1, 0.4)]
    points.append((2.0, 1.6, math.inf))
    monitor = AlertMonitor(rules)
    fired = [monitor.update(summary(s, 0.0, 0.0, kl=k, kl_low=lo, kl_high=hi)) for s, (k, lo, hi) in enumerate(points)]
    # step 2: significantly below the reference (1.4 < 1.5) but n* may still reach ~10: headroom left, no alert;
    # step 3: upper end 0.5 nats > 0.432; step 4: best-of-n peaks by n = 3 at 95 %
    assert [[e.kind for e in ev] for ev in fired] == [[], [], [], [], ["onset"], ["clear"]]
    onset = fired[4][0]
    assert (onset.value, onset.threshold, onset.reference_step) == (0.4, pytest.approx(floor), 0)
    # without the headroom floor (headroom_n = inf) the shrink alone fires, as soon as the ratio holds
    monitor = AlertMonitor(AlertRules(**{**rules.to_dict(), "headroom_n": math.inf, "headroom_ratio": 0.5}))
    fired = [monitor.update(summary(s, 0.0, 0.0, kl=k, kl_low=lo, kl_high=hi)) for s, (k, lo, hi) in enumerate(points)]
    assert [[e.kind for e in ev] for ev in fired] == [[], [], ["onset"], [], [], ["clear"]]


def test_headroom_reads_a_reference_without_a_peak_estimate():
    monitor = AlertMonitor(AlertRules(policy_true_falls=False, bon_true_falls=False, goodhart_kl=False))
    assert monitor.update(summary(0, 0.0, 0.0, kl=math.inf, kl_low=3.0, kl_high=math.inf)) == []
    (onset,) = monitor.update(summary(1, 0.0, 0.0, kl=0.1, kl_low=0.0, kl_high=0.3))
    assert onset.rule == "headroom_shrinks"
    no_headroom_yet = AlertMonitor(AlertRules())  # a reference that already has no headroom: nothing can fall below it
    assert no_headroom_yet.update(summary(0, 0.0, 0.0, kl=0.0, kl_low=0.0, kl_high=0.1)) == []
    assert no_headroom_yet.update(summary(1, 0.0, 0.0, kl=0.0, kl_low=0.0, kl_high=0.0)) == []


# ---- state -----------------------------------------------------------------------------------
def test_steps_must_increase():
    monitor = AlertMonitor()
    monitor.update(summary(5, 0.0, 0.0))
    with pytest.raises(ValueError, match="increasing step order"):
        monitor.update(summary(5, 0.0, 0.0))


def test_resume_from_json_state_gives_the_same_events():
    run = simulated_runs("peaked", 1, n_prompts=128, noise=0.5, seed=4)[0]
    ns = default_ns(run.n_samples)
    summaries = []
    for i, proxy, true, kl in run.evals():
        interval = goodhart_interval(bon_estimate(proxy, true, ns), ns, n_resamples=300, rng=i)
        summaries.append(EvalSummary.from_curve(i, bon_curve(proxy, true, ns), policy_kl=kl, interval=interval))
    whole = AlertMonitor()
    expected = [[e.to_dict() for e in whole.update(s)] for s in summaries]
    assert any(expected)
    first = AlertMonitor()
    got = [[e.to_dict() for e in first.update(s)] for s in summaries[:6]]
    state = json.loads(json.dumps(first.state_dict(), allow_nan=False))
    resumed = AlertMonitor()
    resumed.load_state_dict(state)
    assert resumed.last_step == 5
    got += [[e.to_dict() for e in resumed.update(EvalSummary.from_dict(s.to_dict()))] for s in summaries[6:]]
    assert got == expected
    assert resumed.metrics() == whole.metrics()
    assert set(whole.metrics()) == {metric_key("alert", rule) for rule in RULES}  # the tracker's names


# ---- simulated runs with known onset ----------------------------------------------------------
def _onsets(run, rules):
    monitor = AlertMonitor(rules)
    ns = default_ns(run.n_samples)
    first = {}
    for i, proxy, true, kl in run.evals():
        interval = goodhart_interval(bon_estimate(proxy, true, ns), ns, n_resamples=400, rng=i)  # as the benchmark
        s = EvalSummary.from_curve(i, bon_curve(proxy, true, ns), policy_kl=kl, interval=interval)
        for event in monitor.update(s):
            first.setdefault(event.rule, i)
    return first


def test_simulated_peaked_runs_alert_near_the_known_peak():
    runs = simulated_runs("peaked", 6, n_prompts=64, n_samples=16, noise=0.5, seed=7)
    for run in runs:
        first = _onsets(run, AlertRules())
        peak = run.peak_eval
        assert run.model.policy_true(run.lams[peak]) == pytest.approx(max(run.model.policy_true(run.lams)))
        assert min(first.values()) <= peak + 2
        assert peak - 1 <= first["goodhart_kl"] <= peak + 2  # policy KL passes the base fit's KL* just after the peak
        assert peak - 2 <= first["headroom_shrinks"] <= peak  # n* shrinks to 1 as the policy reaches the peak
        assert first.get("policy_true_falls", peak + 1) > peak  # a true fall needs time after a smooth peak


def test_simulated_linear_runs_raise_no_alert():
    runs = [r for r in simulated_runs("rising", 8, n_prompts=64, seed=8) if r.model.gamma == 0]
    assert len(runs) == 4
    for run in runs:
        assert _onsets(run, AlertRules()) == {}


def test_default_rules_do_not_fire_on_a_concave_rising_run_whose_goodhart_point_shrinks():
    """Run 5 of the benchmark's tuning family (seed 2, 64 x 16, sigma = 1): concave, its true
    peak about 4 times as far as the run goes. n* really shrinks (the reference's KL* interval
    starts at ~5 nats, the last evals' end below it: the shrink alone fires) but best-of-n
    still gains up to n* of ~10: headroom left, and the default rules stay quiet."""
    run = simulated_runs("rising", 6, n_prompts=64, n_samples=16, noise=1.0, seed=2)[5]
    assert run.model.gamma > 0 and run.peak_eval is None
    assert run.model.peak_lam > 2 * run.lams[-1]
    assert run.model.bon_peak(run.lams[-1])["n"] > 10  # the exact headroom at the last eval
    shrink_only = AlertRules(headroom_n=math.inf)
    assert "headroom_shrinks" in _onsets(run, shrink_only)
    assert _onsets(run, AlertRules()) == {}


def test_default_rules_do_not_fire_on_rising_runs():
    runs = simulated_runs("rising", 8, n_prompts=64, n_samples=16, noise=1.0, seed=9)
    assert sum(r.model.gamma > 0 for r in runs) == 4  # half concave, half linear
    for run in runs:
        assert _onsets(run, AlertRules()) == {}
