"""The Goodhart point in words and numbers, and the core's guards on its inputs.

* n* = 1 when the true reward only falls (the worst Goodhart, never reported as its absence):
  fit, record scalars, CLI, report, charts, compare, alerts;
* a far extrapolated n* is "beyond n = <4 N>": no scalar, no "∞", no 4.3e7;
* intervals that span the measured range say "not resolved" (the examples print them);
* large n grids: vectorised over n, capped at MAX_NS, Ctrl-C not held up by worker threads;
* ns = [2**63], complex scores, 10**400: clear errors showing the real values.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.core import (
    AlertMonitor,
    AlertRules,
    BonCurve,
    EvalSummary,
    GoodhartInterval,
    bon_curve,
    bon_estimate,
    bon_weights,
    fit_overoptimization,
    fit_rl_overoptimization,
    goodhart_interval,
    kl_bon,
    kl_to_n,
)
from bon_tracker.core.fit import GOODHART_HORIZON
from bon_tracker.core.threads import map_in_order
from bon_tracker.core.validation import MAX_NS
from bon_tracker.core.weights import TailWeights
from bon_tracker.record import EvalRecord

ROOT = Path(__file__).resolve().parents[1]
NS = np.array([1, 2, 4, 8, 16])
# The issue's step: true@n falls at every n while the proxy rises.
FALLING = np.array([0.507, 0.348, 0.138, -0.062, -0.257])
FALLS = "n* = 1: any selection on this proxy already lowers the true reward"


def curve_of(true_mean: np.ndarray, ns: np.ndarray = NS, proxy_mean: np.ndarray | None = None) -> BonCurve:
    kl = kl_bon(ns)
    return BonCurve(
        n=ns,
        kl=kl,
        kl_bound=kl,
        true_mean=np.asarray(true_mean, dtype=float),
        true_se=np.full(len(ns), 0.01),
        proxy_mean=np.sqrt(kl) if proxy_mean is None else proxy_mean,
        proxy_se=np.full(len(ns), 0.01),
        n_prompts=np.full(len(ns), 64),
        N=int(ns.max()),
        has_ties=False,
    )


def scores_with_curve(target: np.ndarray, prompts: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, true) of ``prompts`` x 16 tie-free samples whose best-of-n true curve at NS is
    exactly ``target`` (the least-norm solution of the all-subsets estimator's equations),
    with per-prompt offsets summing to zero; the proxy is the rank, so it rises with n."""
    N = int(NS.max())
    weights = np.stack([bon_weights(N, int(n)) for n in NS])
    by_rank = np.linalg.lstsq(weights, target, rcond=None)[0]
    rng = np.random.default_rng(seed)
    offsets = np.linspace(-0.03, 0.03, prompts)
    proxy, true = [], []
    for offset in offsets:
        order = rng.permutation(N)
        proxy.append(order.astype(float))
        true.append(by_rank[order] + offset)
    return np.array(proxy), np.array(true)


def falling_record(step: int = 3) -> EvalRecord:
    proxy, true = scores_with_curve(FALLING)
    curve = bon_curve(proxy, true)
    interval = goodhart_interval(bon_estimate(proxy, true, curve.n), curve.n, kl=curve.kl, n_resamples=200)
    return EvalRecord.build(step, curve, interval=interval)


# ---- A: n* = 1 when the true reward only falls ------------------------------------------------------------


def test_the_issue_curve_fits_to_n_star_one():
    fit = fit_overoptimization(curve_of(FALLING))
    assert fit.true.alpha == pytest.approx(-0.294, abs=2e-3) and fit.true.beta == pytest.approx(0.201, abs=2e-3)
    assert fit.true.r2 > 0.999
    assert fit.has_goodhart_point and fit.falls_from_start  # was goodhart_n = nan: "no Goodhart point"
    assert (fit.goodhart_n, fit.goodhart_kl, fit.goodhart_gain) == (1.0, 0.0, 0.0)
    assert fit.peak_within_range and not fit.beyond_horizon


def test_scores_built_for_the_issue_curve_reproduce_it():
    proxy, true = scores_with_curve(FALLING)
    curve = bon_curve(proxy, true)
    np.testing.assert_allclose(curve.true_mean, FALLING, atol=1e-12)
    assert np.all(np.diff(curve.proxy_mean) > 0)


def test_a_convex_fall_is_n_star_one_in_the_fit_and_the_interval():
    """True falls fast then levels off (beta < 0): the fit's maximum over what was measured is
    n = 1, in the fit and in every resample -- not "true keeps rising" (n* = inf)."""
    d = np.sqrt(kl_bon(NS))
    mean = -0.4 * d + 0.08 * d * d  # minimum at d = 2.5, past the measured d (1.35)
    fit = fit_overoptimization(curve_of(mean))
    assert fit.true.beta < 0 and fit.true.alpha < 0
    assert fit.falls_from_start and fit.goodhart_n == 1.0
    rng = np.random.default_rng(3)
    interval = goodhart_interval(mean + 0.01 * rng.standard_normal((100, 5)), NS)
    assert (interval.n, interval.kl, interval.n_high) == (1.0, 0.0, 1.0)  # was inf, inf, inf


def test_the_record_logs_n_star_one_and_kl_zero():
    record = EvalRecord.build(3, curve_of(FALLING))
    scalars = record.scalars()
    assert scalars["bon/4_goodhart/n"] == 1.0 and scalars["bon/4_goodhart/kl"] == 0.0  # was absent (nan)
    assert record.goodhart.falls_from_start and record.goodhart.peak_gain == 0.0
    assert record.goodhart_status() == "measured"
    again = EvalRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again.goodhart == record.goodhart


def test_reports_and_charts_say_n_star_one():
    pytest.importorskip("matplotlib")
    from bon_tracker.reports import charts, compare, html

    record = falling_record()
    text = charts.goodhart_text(record)
    assert text.startswith(FALLS) and "still rises" not in text
    summary = html.goodhart_summary(record)
    assert "n* = 1" in summary and "any selection on this proxy already lowers the true reward" in summary
    assert "still rises" not in summary
    assert compare._goodhart_cells(record)[:2] == ("1", "0")
    fig = charts.curve_chart(record)
    assert any("n* = 1" in t.get_text() for t in fig.axes[0].texts)
    earlier = EvalRecord.build(0, curve_of(FALLING + 0.3 * np.sqrt(kl_bon(NS))))
    for fig, panel in (
        (charts.trend_chart([earlier, record]), 2),
        (charts.runs_trend_chart({"a": [earlier, record]}), -1),
    ):
        points = [y for line in fig.axes[panel].get_lines() for x, y in zip(line.get_xdata(), line.get_ydata())]
        assert 1.0 in points  # the step's n* = 1 is drawn, not dropped


def test_the_headroom_alert_sees_n_star_one_as_the_smallest_headroom():
    from bon_tracker.tracking.alerting import AlertReporter

    rng = np.random.default_rng(4)
    d = np.sqrt(kl_bon(NS))
    peaked = d * (1.6 - 0.6 * d)  # the reference: KL* = 1.78 nats (n* ~ 15), within the measured range
    rows = [peaked, FALLING - FALLING[0]]
    reporter = AlertReporter(AlertRules())
    monitor = AlertMonitor(AlertRules())
    events = []
    for step, mean in enumerate(rows):
        true_pp = mean + 0.02 * rng.standard_normal((200, 5))
        interval = goodhart_interval(true_pp, NS, n_resamples=400)
        curve = curve_of(true_pp.mean(axis=0))
        events.append(monitor.update(EvalSummary.from_curve(step, curve, interval=interval)))
        worded, _ = reporter.update(step, curve, None, interval)
    (onset,) = [e for e in events[1] if e.rule == "headroom_shrinks"]
    assert "= 1: any selection on this proxy already lowers the true reward" in onset.message
    (worded_onset,) = [e for e in worded if e.rule == "headroom_shrinks"]
    assert "n* = 1 (any selection on this proxy already lowers the true reward)" in worded_onset.message
    assert "∞" not in worded_onset.message and "inf" not in worded_onset.message


def _cli(capsys, *args) -> tuple[int, str]:
    from bon_tracker.cli.main import main

    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def test_analyze_and_compare_a_step_where_true_only_falls(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setenv("BON_TRACKER_SPOOL_DIR", str(tmp_path / "spool"))
    for name in ("BON_TRACKER_DIR", "BON_TRACKER_CONFIG", "BON_TRACKER_BACKEND", "BON_TRACKER_NS"):
        monkeypatch.delenv(name, raising=False)
    proxy, true = scores_with_curve(FALLING, prompts=6)
    path = tmp_path / "falls.jsonl"
    with path.open("w") as f:
        for p, (row_p, row_t) in enumerate(zip(proxy, true)):
            for a, b in zip(row_p, row_t):
                f.write(json.dumps({"prompt_id": f"q{p}", "proxy": float(a), "true": float(b), "step": 7}) + "\n")
    code, out = _cli(capsys, "analyze", path, "--out", tmp_path / "out", "--quiet")
    assert code == 0
    assert FALLS in out and "does not peak" not in out and "still rises" not in out
    code, out = _cli(capsys, "analyze", path, "--out", tmp_path / "out2", "--quiet", "--json")
    (step,) = json.loads(out)["runs"][0]["steps"]
    assert (step["goodhart_n"], step["goodhart_kl"], step["goodhart_falls_from_start"]) == (1.0, 0.0, True)
    run_dir = Path(json.loads(out)["runs"][0]["run_dir"])
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "Goodhart point n* = 1" in report and "still rises" not in report
    scalars = [json.loads(line) for line in (run_dir / "scalars.jsonl").read_text().splitlines()]
    assert scalars[-1]["bon/4_goodhart/n"] == 1.0 and scalars[-1]["bon/4_goodhart/kl"] == 0.0
    code, _ = _cli(capsys, "compare", run_dir, "--out", tmp_path / "cmp")
    assert code == 0
    page = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    # n*, its interval, KL*, where the peak lies
    assert re.search(r"<td>1</td><td>[^<]*</td><td>0</td><td>n\* = 1: true falls from n = 1</td>", page), page


# ---- B: extrapolations beyond 4 N ----------------------------------------------------------------------------


def far_record() -> EvalRecord:
    d = np.sqrt(kl_bon(NS))
    record = EvalRecord.build(5, curve_of(d * (0.5 - 0.0608 * d)))  # still rising, a fitted peak at KL ~ 17 nats
    assert record.goodhart is not None and record.goodhart.n > 1e7
    return record


def test_a_far_extrapolated_goodhart_point_is_no_number():
    record = far_record()
    assert record.goodhart_status() == "beyond" and record.horizon_n == GOODHART_HORIZON * 16 == 64
    scalars = record.scalars()
    assert "bon/4_goodhart/n" not in scalars and "bon/4_goodhart/kl" not in scalars  # was 4.3e7
    interval = GoodhartInterval(
        n=record.goodhart.n, n_low=40.0, n_high=math.inf, kl=record.goodhart.kl, kl_low=2.7, kl_high=math.inf,
        gain=0.9, gain_low=0.4, gain_high=math.inf, alpha=0.5, beta=0.06, p_no_peak=0.3, level=0.95,
        method="percentile", n_resamples=200, n_prompts=64,
    )  # fmt: skip
    with_interval = EvalRecord.build(5, record.curve, interval=interval).scalars()
    assert with_interval["bon/4_goodhart/n_low"] == 40.0 and with_interval["bon/4_goodhart/kl_low"] == 2.7
    for name in ("n", "kl", "n_high", "kl_high", "gain", "gain_high"):
        assert f"bon/4_goodhart/{name}" not in with_interval


def test_a_far_extrapolated_goodhart_point_reads_beyond_n_4N():
    pytest.importorskip("matplotlib")
    from bon_tracker.reports import charts, compare, html

    record = far_record()
    for text in (
        charts.goodhart_text(record),
        html.goodhart_summary(record),
        " ".join(compare._goodhart_cells(record)),
    ):
        assert "beyond n = 64" in text and "∞" not in text and "e+0" not in text and "e+07" not in text


def test_alert_messages_never_print_infinity_as_n_star():
    from bon_tracker.tracking.alerting import AlertReporter

    far_kl = 965.0  # the issue's KL*: n = e^966, past any float
    assert kl_to_n(far_kl) == math.inf
    interval = GoodhartInterval(
        n=math.inf, n_low=math.inf, n_high=math.inf, kl=far_kl, kl_low=900.0, kl_high=1000.0, gain=1.0,
        gain_low=0.5, gain_high=2.0, alpha=1.0, beta=1e-4, p_no_peak=0.0, level=0.95, method="percentile",
        n_resamples=200, n_prompts=64,
    )  # fmt: skip
    curve = curve_of(np.sqrt(kl_bon(NS)))
    monitor, reporter = AlertMonitor(AlertRules()), AlertReporter(AlertRules())
    monitor.update(EvalSummary.from_curve(0, curve, policy_kl=1.0, interval=interval))
    reporter.update(0, curve, 1.0, interval)
    (core,) = monitor.update(EvalSummary.from_curve(1, curve, policy_kl=1000.0, interval=interval))
    worded, _ = reporter.update(1, curve, 1000.0, interval)
    (worded,) = worded
    for message in (core.message, worded.message):
        assert core.rule == "goodhart_kl" and "beyond n = 64" in message
        assert "∞" not in message and "inf" not in message


# ---- not resolved: intervals that span the measured range ---------------------------------------------------


def test_a_flat_curve_is_not_resolved():
    rng = np.random.default_rng(5)
    true_pp = 0.5 + 0.2 * rng.standard_normal((64, 5))
    true_pp[:, 1:] += 0.02 * np.sqrt(kl_bon(NS[1:])) * (1.0 - 0.6 * np.sqrt(kl_bon(NS[1:])))
    curve = curve_of(true_pp.mean(axis=0))
    interval = goodhart_interval(true_pp, NS, n_resamples=300)
    record = EvalRecord.build(1, curve, interval=interval)
    assert record.goodhart is not None and record.goodhart_resolved() is False
    pytest.importorskip("matplotlib")
    from bon_tracker.reports import charts

    text = charts.goodhart_text(record)
    assert "not resolved" in text and "interval" in text and "within the measured range" not in text


def test_the_plain_loop_example_prints_the_interval_and_not_resolved(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_loop_example.py"), "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("Goodhart point")]
    assert "not resolved" in line and "95 % interval" in line and "within the measured range" not in line


# ---- C: large n grids ------------------------------------------------------------------------------------


def _brute(proxy: np.ndarray, true: np.ndarray, n: int) -> float:
    order = np.argsort(proxy, axis=1, kind="stable")
    return float((np.take_along_axis(true, order, axis=1) @ bon_weights(proxy.shape[1], n)).mean())


@pytest.mark.parametrize("N, prompts", [(10_000, 3), (20_000, 2)])  # the dense path, and one huge prompt at a time
def test_a_ten_thousand_point_grid_is_fast_and_exact(N, prompts):
    rng = np.random.default_rng(6)
    proxy = rng.normal(size=(prompts, N))
    true = proxy + rng.normal(size=proxy.shape)
    ns = np.unique(np.linspace(1, N, 10_000).round().astype(np.int64))
    assert len(ns) == 10_000
    start = time.perf_counter()
    curve = bon_curve(proxy, true, ns=ns)
    per_prompt = bon_estimate(proxy, true, ns)
    elapsed = time.perf_counter() - start
    for i in (0, 1, 2, 777, 5000, len(ns) - 2, len(ns) - 1):
        assert curve.true_mean[i] == pytest.approx(_brute(proxy, true, int(ns[i])), rel=1e-12, abs=1e-13)
    few = [0, 1, 777, len(ns) - 1]
    small = bon_curve(proxy, true, ns=ns[few])  # the plain path of a short grid
    np.testing.assert_allclose(curve.true_mean[few], small.true_mean, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(per_prompt.mean(axis=0), curve.true_mean, rtol=1e-12, atol=1e-13)
    assert elapsed < 60  # seconds, generous: about 3 s on 2 busy cores; 80-200 s before (per-n loops)


def test_tail_weights_are_the_exact_weights():
    for N in (1, 2, 7, 300):
        tail = TailWeights(N, np.arange(1, N + 1))
        for index, (cols, _, length) in enumerate(tail.chunks):
            weights = tail.chunk_weights(index)
            for row, col in enumerate(cols):
                exact = bon_weights(N, int(col) + 1)[::-1][:length]
                exact[exact < 1e-300] = 0.0
                np.testing.assert_array_equal(weights[row], exact)


def test_a_grid_past_the_limit_is_a_clear_error():
    with pytest.raises(ValueError, match=r"1,000,000 points; at most 16,384 .*MAX_NS"):
        bon_curve(np.eye(4), np.eye(4), ns=np.arange(1, 1_000_001))
    assert MAX_NS == 16_384


def test_ctrl_c_is_not_held_up_by_running_worker_threads():
    def slow(item):
        time.sleep(3.0)
        return item

    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        list(map_in_order(slow, range(8), 2))
    assert time.perf_counter() - start < 2.0  # was 3 s: the finally block waited for the running items


# ---- D: values that do not fit ------------------------------------------------------------------------------


def test_ns_beyond_int64_reports_the_value_given():
    with pytest.raises(ValueError) as err:
        bon_curve(np.eye(4), np.eye(4), ns=[2**63])
    assert "9223372036854775808" in str(err.value) and "-9223372036854775808" not in str(err.value)
    with pytest.raises(ValueError, match="an integer of 401 digits"):
        bon_curve(np.eye(4), np.eye(4), ns=[10**400])
    with pytest.raises(TypeError, match="complex"):
        bon_curve(np.eye(4), np.eye(4), ns=[2 + 1j])


def test_complex_scores_are_a_type_error():
    true = np.eye(3)
    with pytest.raises(TypeError, match="real-valued"):
        bon_curve(np.eye(3) + 1j, true)
    with pytest.raises(TypeError, match=r"real-valued|complex"):
        bon_curve([[1 + 2j, 0.5, 0.1], [0.2, 0.3, 0.4], [0.0, 1.0, 2.0]], true.tolist())
    with pytest.raises(TypeError, match="complex"):
        bon_curve([[0.5, 0.1], [0.2, 0.3, 0.4]], [[np.complex128(1 + 1j), 0.5], [0.1, 0.2, 0.3]])  # ragged
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="complex tensor"):
        bon_curve(torch.tensor([[1 + 1j, 2.0, 3.0]]), torch.tensor([[1.0, 2.0, 3.0]]))


def test_numbers_too_large_for_a_float_are_a_value_error_naming_them():
    with pytest.raises(ValueError, match=r"proxy at \(0, 0\) is an integer of 401 digits: too large for a float"):
        bon_curve([[10**400, 1.0, 2.0]], [[0.0, 1.0, 2.0]])
    curve = bon_curve(np.eye(4), np.eye(4))
    with pytest.raises(ValueError, match="policy_kl"):
        EvalRecord.build(0, curve, policy_kl=10**400)
    with pytest.raises(ValueError, match="policy_kl"):
        EvalSummary.from_curve(0, curve, policy_kl=10**400)
    with pytest.raises(ValueError, match=r"AlertRules\.kl_budget"):
        AlertRules(kl_budget=10**400)
    with pytest.raises(ValueError, match="too large for a float"):
        kl_bon(10**400)
    with pytest.raises(ValueError, match="kl at 1"):
        fit_rl_overoptimization([1, 10**400], [1.0, 2.0])


def test_one_sample_per_prompt_says_there_is_no_curve():
    from bon_tracker.reports.charts import goodhart_text

    record = EvalRecord.build(0, bon_curve(np.arange(4.0)[:, None], np.arange(4.0)[:, None]))
    assert goodhart_text(record).startswith("N = 1 sample per prompt: no curve beyond n = 1")


def test_ragged_prompts_say_how_many_reach_the_largest_n():
    from bon_tracker.reports.html import samples_text

    rows = [np.arange(11.0)] * 4 + [np.arange(8.0)] * 26
    text = samples_text(bon_curve(rows, rows))
    assert text == (
        "30 prompts with up to N = 11 samples each (ragged: n = 11 averages only the 4 of 30 prompts with that many)"
    )
    assert samples_text(bon_curve(np.ones((3, 4)), np.ones((3, 4)))) == "3 prompts, N = 4 samples per prompt"


def test_none_in_a_row_is_a_missing_score_under_nan_policy():
    """As docs/trl.md says: a reward function's None counts as missing, as in TRL's nansum."""
    curve = bon_curve([[1.0, None, 2.0], [1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], nan_policy="omit")
    want = bon_curve([[1.0, 2.0], [1.0, 2.0, 3.0]], [[1.0, 3.0], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(curve.true_mean, want.true_mean)
    with pytest.raises(ValueError, match=r"proxy has 1 non-finite value\(s\) \(NaN, inf or None: missing\) at"):
        bon_curve([[1.0, None, 2.0]], [[1.0, 2.0, 3.0]])
