"""Alerts through the tracker: simulated runs with a known onset, every way an alert is
reported (record, metric, logger, ``tracker.alerts``, ``on_alert``), resume, configuration,
and the alert read back from each real backend."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

if "trackio" not in sys.modules:  # trackio reads TRACKIO_DIR once, when first imported
    os.environ["TRACKIO_DIR"] = tempfile.mkdtemp(prefix="bon_tracker_trackio_")

from bon_tracker import BonTracker
from bon_tracker.core import Alert, AlertRules, bon_curve
from bon_tracker.core.alerts import RULES
from bon_tracker.core.simulation import SimulationModel, simulated_runs
from bon_tracker.record import PREDICTION_COLUMNS, EvalRecord, metric_key
from bon_tracker.tracking.config import ConfigError, load_config, resolve_config

P, N = 200, 8
# The policy's true reward (all n shift with it) rises, holds, then drops at eval 4 and
# recovers at eval 6; its proxy rises throughout. The drop at eval 4 is tens of SE of the
# difference against evals 2-3, the step-3 plateau none.
TRUE_LEVEL = (0.0, 0.5, 1.0, 1.0, 0.3, 0.2, 1.5)
ONSET, CLEAR = 4, 6


def _scores(rng: np.random.Generator, i: int) -> tuple[np.ndarray, np.ndarray]:
    u = rng.normal(size=(P, N))
    proxy = u + 0.5 * i
    true = TRUE_LEVEL[i] + 0.3 * u + 0.5 * rng.normal(size=(P, N))  # linear in u: no best-of-n peak
    return proxy, true


def _known_onset_run(tracker: BonTracker, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(len(TRUE_LEVEL)):
        tracker.log_scores(100 * i, *_scores(rng, i))


# ---- the tracker -------------------------------------------------------------------------------


def test_known_onset_fires_once_reports_everywhere_and_clears(tmp_path, caplog):
    seen: list[Alert] = []
    options = {"root": tmp_path, "run_name": "r", "on_alert": seen.append, "charts": False}
    with caplog.at_level(logging.INFO, logger="bon_tracker"), BonTracker("local", **options) as tracker:
        _known_onset_run(tracker)
    onsets = [(a.step, a.rule) for a in tracker.alerts]
    assert onsets == [(100 * ONSET, "policy_true_falls"), (100 * ONSET, "bon_true_falls")]
    assert seen == tracker.alerts  # on_alert got each one, once
    first = tracker.alerts[0]
    assert first.reference_step in (200, 300) and first.value >= 3.0  # the plateau: either eval is the one before
    assert first.message.startswith(f"At step {100 * ONSET} the policy's true reward (n = 1) fell by 0.")
    assert "while the proxy rose by" in first.message and first.message.endswith("more optimization is now hurting.")
    # the fall it states is the curve's own
    h = {r.step: r for r in tracker.history}
    fell = float(h[first.reference_step].curve.true_mean[0] - h[100 * ONSET].curve.true_mean[0])
    assert f"fell by {fell:.3g} (" in first.message
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "alert" in r.getMessage()]
    assert warnings == [f"bon_tracker: alert {a.rule}: {a.message}" for a in tracker.alerts]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "cleared" in r.getMessage()]
    assert len(infos) == 2 and all(f"cleared at step {100 * CLEAR}" in m for m in infos)

    states = [r.alert_states["policy_true_falls"] for r in tracker.history]
    assert states == [0, 0, 0, 0, 1, 1, 0]
    assert set(tracker.history[0].alert_states) == set(RULES)  # every enabled rule, at every step
    key = metric_key("alert", "policy_true_falls")
    assert [r.scalars()[key] for r in tracker.history] == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    kinds = [(r.step, e.kind, e.rule) for r in tracker.history for e in r.alerts]
    assert kinds == [
        (400, "onset", "policy_true_falls"),
        (400, "onset", "bon_true_falls"),
        (600, "clear", "policy_true_falls"),
        (600, "clear", "bon_true_falls"),
    ]


def test_goodhart_kl_fires_when_the_policy_kl_passes_the_reference_fit():
    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    exact = model.bon_peak(0.0)["kl"]
    rng = np.random.default_rng(1)
    prompts = model.draw_prompts(1000, rng)
    kls = [0.0, 0.5 * exact, 0.8 * exact, 1.3 * exact, 1.6 * exact]
    rules = AlertRules(policy_true_falls=False, bon_true_falls=False, headroom_shrinks=False)
    with BonTracker("local", root=tempfile.mkdtemp(), charts=False, alerts=rules) as tracker:
        for i, kl in enumerate(kls):
            tracker.log_scores(i, *model.sample(prompts, 16, 0.0, rng), policy_kl=kl)
    (alert,) = tracker.alerts
    assert (alert.step, alert.rule, alert.reference_step) == (3, "goodhart_kl", 0)
    reference = tracker.history[0].interval
    assert alert.threshold == pytest.approx(reference.kl) and reference.kl == pytest.approx(exact, rel=0.25)
    assert reference.kl_low < exact < reference.kl_high  # the interval covers the exact peak here
    assert f"reached the Goodhart KL* = {reference.kl:.3g} nats fitted on the best-of-n curve of step 0" in (
        alert.message
    )


def test_kl_budget_fires_at_the_first_eval_past_it():
    rng = np.random.default_rng(2)
    with BonTracker("local", root=tempfile.mkdtemp(), charts=False, alerts={"kl_budget": 1.0}) as tracker:
        for i, kl in enumerate([0.2, 0.6, 0.95, 1.05, 1.4]):
            proxy = rng.normal(size=(64, 16))
            tracker.log_scores(i, proxy, proxy + rng.normal(size=proxy.shape), policy_kl=kl)
    assert [(a.step, a.rule) for a in tracker.alerts] == [(3, "goodhart_kl")]
    assert tracker.alerts[0].message == (
        "At step 3 the policy's KL from its reference reached 1.05 nats, the KL budget of 1 nats set for this run."
    )


def test_headroom_shrinks_fires_when_the_goodhart_point_collapses():
    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    rng = np.random.default_rng(3)
    prompts = model.draw_prompts(1000, rng)
    rules = AlertRules(policy_true_falls=False, bon_true_falls=False, goodhart_kl=False)
    with BonTracker("local", root=tempfile.mkdtemp(), charts=False, alerts=rules) as tracker:
        for i, lam in enumerate([0.0, 0.0, 1.3, 1.3]):
            tracker.log_scores(i, *model.sample(prompts, 16, lam, rng))
    assert [(a.step, a.rule) for a in tracker.alerts] == [(2, "headroom_shrinks")]
    first, now = tracker.history[0].interval, tracker.history[2].interval
    assert now.kl_high < first.kl_low and now.kl <= 0.25 * first.kl
    assert tracker.alerts[0].message.startswith(f"At step 2 the Goodhart point of best-of-n fell to n* ≈ {now.n:.3g}")


@pytest.mark.parametrize("kind", ["peaked", "rising"])
def test_simulated_runs_alert_after_the_peak_and_not_on_rising_runs(kind):
    """Four runs of the documented family through the tracker: every peaked run alerts by
    its peak + 2 evals, no rising run alerts under rules 1-3 (the docs' measured rates)."""
    rules = AlertRules(headroom_shrinks=kind == "peaked")
    for run in simulated_runs(kind, 4, n_prompts=64, n_samples=16, noise=0.5, seed=7):
        with BonTracker("local", root=tempfile.mkdtemp(), charts=False, alerts=rules) as tracker:
            for i, proxy, true, kl in run.evals():
                tracker.log_scores(i, proxy, true, policy_kl=kl)
        steps = [a.step for a in tracker.alerts]
        if kind == "rising":
            assert steps == [], tracker.alerts
        else:
            assert steps and min(steps) <= run.peak_eval + 2, (run.peak_eval, tracker.alerts)
            for rule in {a.rule for a in tracker.alerts}:  # once per onset: a rule fires again only after a clear
                kinds = [e.kind for r in tracker.history for e in r.alerts if e.rule == rule]
                assert kinds == ["onset", "clear"] * (len(kinds) // 2) + ["onset"] * (len(kinds) % 2), kinds


def test_alerts_off_and_a_failing_callback(tmp_path, caplog):
    with BonTracker("local", root=tmp_path, run_name="off", alerts=False, charts=False) as tracker:
        _known_onset_run(tracker)
    assert tracker.alerts == [] and all(r.alert_states is None for r in tracker.history)
    assert not any("/7_alert/" in key for key in tracker.history[-1].scalars())

    def broken(alert):
        raise RuntimeError("user bug")

    options = {"root": tmp_path, "run_name": "cb", "on_alert": broken, "charts": False}
    with caplog.at_level(logging.ERROR, logger="bon_tracker"), BonTracker("local", **options) as tracker:
        _known_onset_run(tracker)  # never raises into training
    assert len(tracker.alerts) == 2
    assert sum("on_alert callback raised" in r.getMessage() for r in caplog.records) == 2


def test_resume_continues_the_alert_state(tmp_path):
    rng = np.random.default_rng(0)
    options = {"root": tmp_path, "run_name": "res", "charts": False}
    first = BonTracker("local", **options)
    for i in range(ONSET + 1):  # up to and including the onset
        first.log_scores(100 * i, *_scores(rng, i))
    first.finish()
    state = json.loads(json.dumps(first.state()))  # what save_state writes
    second = BonTracker("local", resume=state, **options)
    assert [(a.step, a.rule) for a in second.alerts] == [(a.step, a.rule) for a in first.alerts]
    for i in range(ONSET + 1, len(TRUE_LEVEL)):
        second.log_scores(100 * i, *_scores(rng, i))
    second.finish()
    assert len(second.alerts) == 2  # still active at eval 5: no second onset after the resume
    assert [e.kind for r in second.history for e in r.alerts] == ["clear", "clear"]


def test_ragged_input_gets_an_interval_but_no_agreement(tmp_path):
    rng = np.random.default_rng(4)
    rows = [rng.normal(size=16 if i % 2 else 12) for i in range(40)]
    with BonTracker("local", root=tmp_path, charts=False) as tracker:
        tracker.log_scores(0, rows, [r + rng.normal(size=r.shape) for r in rows])
    record = tracker.history[0]
    assert record.agreement is None and record.interval is not None
    assert record.interval.n_prompts == 40


# ---- the record ----------------------------------------------------------------------------------


def test_record_round_trips_and_reads_records_written_before_alerts(tmp_path):
    with BonTracker("local", root=tmp_path, charts=False) as tracker:
        _known_onset_run(tracker)
    record = tracker.history[ONSET]
    again = EvalRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again.to_json() == record.to_json() and again.alerts == record.alerts
    assert again.agreement.q == (1.0, 0.5) and again.agreement.n_top == (8, 4)  # N = 8: down to 4 samples
    old = {k: v for k, v in record.to_json().items() if k not in ("interval", "agreement", "predictions", "alerts")}
    old.pop("alert_states")
    legacy = EvalRecord.from_json(old)
    assert legacy.interval is None and legacy.alerts == () and legacy.alert_states is None
    assert not any(k.split("/")[1] in ("7_alert", "8_agreement") for k in legacy.scalars())

    scalars = record.scalars()
    agreement = record.agreement
    assert scalars["bon/8_agreement/top1"] == agreement.mean[0]
    assert scalars["bon/8_agreement/top0_5"] == agreement.mean[1]
    for name in ("n_low", "kl_low"):  # interval bounds are numbers only within 4 x the largest n
        key = f"bon/4_goodhart/{name}"
        if record.interval.n_low <= record.horizon_n:
            assert scalars[key] == getattr(record.interval, name)
        else:
            assert key not in scalars  # here n_low ~ 535 for N = 8: an extrapolation, no number
    assert all(math.isfinite(v) for v in scalars.values())
    # predictions: beyond the measured n only, at 2N and 4N, all marked predicted
    rows = record.prediction_rows()
    assert [r["n"] for r in rows] == [2 * N, 4 * N] and all(r["predicted"] for r in rows)
    assert all(set(PREDICTION_COLUMNS) <= set(r) for r in rows)
    assert all(r["true_mean_low"] <= r["true_mean"] <= r["true_mean_high"] for r in rows)


# ---- configuration ---------------------------------------------------------------------------------


def test_alerts_from_yaml_env_and_arguments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("backend: local\nalerts:\n  fall_z: 2.5\n  headroom_shrinks: off\n")
    config = load_config(path)
    assert config.alerts == AlertRules(fall_z=2.5, headroom_shrinks=False)
    assert config.tracker_kwargs()["alerts"] == config.alerts
    path.write_text("backend: local\nalerts:\n  fall_z: 2.5\n  windw: 3\n")
    with pytest.raises(ConfigError, match=r"c\.yaml line 4, key 'alerts\.windw': unknown alert setting 'windw'"):
        load_config(path)
    path.write_text("alerts: off\n")
    assert load_config(path).alerts is False
    path.write_text("alerts: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"line 1, key 'alerts': expected a mapping of alert settings"):
        load_config(path)

    assert resolve_config(environ={"BON_TRACKER_ALERTS": "off"}).alerts is False
    env = {"BON_TRACKER_ALERTS": '{"window": 5, "kl_budget": "8"}'}
    assert resolve_config(environ=env).alerts == AlertRules(window=5, kl_budget=8.0)
    with pytest.raises(ConfigError, match=r"BON_TRACKER_ALERTS: .*fall_z"):
        resolve_config(environ={"BON_TRACKER_ALERTS": '{"fall_z": -1}'})
    assert resolve_config(environ=env, alerts={"window": 2}).alerts == AlertRules(window=2)  # argument wins
    assert "alerts" not in resolve_config(environ={}).tracker_kwargs()  # unset: the tracker's defaults
    tracker = BonTracker(**resolve_config(environ=env, root=str(tmp_path)).tracker_kwargs())
    assert tracker._alerts.rules.window == 5


# ---- every backend, read back from the real service -------------------------------------------------


def _local(tracker, tmp_path):
    from bon_tracker.backends.local import read_alerts

    run_dir = tracker.backend.run_dir
    scalars = {row["step"]: row for row in map(json.loads, (run_dir / "scalars.jsonl").read_text().splitlines())}
    states = [scalars[s]["bon/7_alert/policy_true_falls"] for s in sorted(scalars)]
    onsets = [(a["step"], a["rule"], a["message"]) for a in read_alerts(run_dir) if a["kind"] == "onset"]
    report = (run_dir / "report.html").read_text()
    assert onsets and all(message in _unescape(report) for _, _, message in onsets)
    predictions = (run_dir / "bon_predictions.csv").read_text().splitlines()
    assert predictions[0] == ",".join(PREDICTION_COLUMNS) and len(predictions) == 1 + 2 * len(TRUE_LEVEL)
    return states, onsets


def _unescape(text: str) -> str:
    import html

    return html.unescape(text)


def _mlflow(tracker, tmp_path):
    from mlflow import MlflowClient

    spec = tracker.backend.spec()
    client = MlflowClient(spec["tracking_uri"])
    history = client.get_metric_history(spec["run_id"], "bon/7_alert/policy_true_falls")
    states = [m.value for m in sorted(history, key=lambda m: m.step)]
    tags = client.get_run(spec["run_id"]).data.tags
    onsets = [(int(tags[f"bon.alert.{rule}"]), rule, None) for rule in ("policy_true_falls", "bon_true_falls")]
    assert "bon.alert.goodhart_kl" not in tags
    return states, onsets


def _wandb(tracker, tmp_path):
    from bon_tracker.backends import wandb_transaction_log as txlog

    run_dir = next((tmp_path / "wandb").glob("offline-run-*"))
    history = sorted(txlog.read_history(run_dir), key=lambda row: row["bon/step"])
    states = [row["bon/7_alert/policy_true_falls"] for row in history]
    log = txlog.find_transaction_log(run_dir)
    alerts = [r.alert for r in txlog.iter_records(log) if r.WhichOneof("record_type") == "alert"]
    assert all(a.level == "WARN" for a in alerts)
    onsets = []
    for a in alerts:
        rule, _, step = a.title.removeprefix("bon_tracker: ").partition(" at step ")
        onsets.append((int(step), rule, a.text))
    return states, onsets


def _tensorboard(tracker, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import (
        STORE_EVERYTHING_SIZE_GUIDANCE,
        EventAccumulator,
    )
    from tensorboard.util import tensor_util

    log_dir = tracker.backend.spec()["log_dir"]
    acc = EventAccumulator(log_dir, size_guidance=STORE_EVERYTHING_SIZE_GUIDANCE).Reload()
    events = sorted(acc.Tensors("bon/7_alert/policy_true_falls"), key=lambda e: e.step)
    states = [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]
    texts = {e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode() for e in acc.Tensors("bon/alerts")}
    assert sorted(texts) == [100 * ONSET, 100 * CLEAR] and "cleared at step 600" in texts[100 * CLEAR]
    onsets = [(100 * ONSET, rule, None) for rule in ("policy_true_falls", "bon_true_falls") if rule in texts[400]]
    return states, onsets


def _trackio(tracker, tmp_path):
    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    spec = tracker.backend.spec()
    logs = SQLiteStorage.get_logs(spec["project"], run=spec["run_name"], run_id=spec["run_id"])
    logs = sorted(logs, key=lambda row: row["step"])
    states = [row["bon/7_alert/policy_true_falls"] for row in logs]
    alerts = trackio.Api().alerts(spec["project"], run=spec["run_name"])
    assert all(a["level"] == "warn" for a in alerts)
    onsets = [(a["step"], a["title"].removeprefix("bon_tracker: ").split(" at step")[0], a["text"]) for a in alerts]
    return states, onsets


READERS = {
    "local": (lambda tmp: {"root": tmp / "runs"}, _local),
    "mlflow": (lambda tmp: {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "experiment": "alerts"}, _mlflow),
    "wandb": (lambda tmp: {"project": "alerts", "dir": str(tmp), "mode": "offline", "images": False}, _wandb),
    "tensorboard": (lambda tmp: {"log_dir": tmp / "tb", "charts": False}, _tensorboard),
    "trackio": (lambda tmp: {"project": f"alerts-{tmp.name}", "charts": False}, _trackio),
}


@pytest.mark.parametrize("backend", sorted(READERS))
def test_the_alert_reaches_every_backend(backend, tmp_path):
    pytest.importorskip(backend if backend != "local" else "numpy")
    options, read_back = READERS[backend]
    with BonTracker(backend, run_name="alerts", spool_dir=tmp_path / "spool", **options(tmp_path)) as tracker:
        _known_onset_run(tracker)
    states, onsets = read_back(tracker, tmp_path)
    assert states == [0, 0, 0, 0, 1, 1, 0], backend
    expected = {(a.step, a.rule): a.message for a in tracker.alerts}
    assert sorted((step, rule) for step, rule, _ in onsets) == sorted(expected), backend
    for step, rule, text in onsets:
        assert text is None or text == expected[(step, rule)], backend


def test_prediction_columns_are_stable_and_curve_table_unchanged():
    from bon_tracker.record import TABLE_COLUMNS

    assert "predicted" not in TABLE_COLUMNS  # predictions are their own table: bon_curves keeps its columns
    curve = bon_curve(np.eye(4), np.eye(4), ns=[1, 4])
    assert EvalRecord.build(0, curve).prediction_rows() == []


def test_charts_show_the_interval_predictions_agreement_and_alerts(tmp_path):
    pytest.importorskip("matplotlib")
    from bon_tracker.reports import charts

    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    rng = np.random.default_rng(5)
    prompts = model.draw_prompts(256, rng)
    with BonTracker("local", root=tmp_path, charts=False) as tracker:
        for i, lam in enumerate([0.0, 0.4, 0.8, 1.2, 1.6]):
            tracker.log_scores(i, *model.sample(prompts, 32, lam, rng), policy_kl=lam**2 / 2)
    first = tracker.history[0]
    fig = charts.curve_chart(first)
    labels = [t.get_text() for ax in fig.axes for legend in [ax.get_legend()] if legend for t in legend.get_texts()]
    assert "KL* 95 % interval" in labels
    assert sum(label.startswith("predicted at n = 64, 128") for label in labels) == 2  # true and proxy panels
    band = next(p for p in fig.axes[0].patches if p.get_label() == "KL* 95 % interval")
    x0, x1 = band.get_x(), band.get_x() + band.get_width()
    assert (x0, x1) == pytest.approx((first.interval.kl_low, first.interval.kl_high))
    trend = charts.trend_chart(tracker.history)
    assert len(trend.axes) == 4 and trend.axes[3].get_ylabel().startswith("rank agreement")
    onsets = sorted({a.step for a in tracker.alerts})
    assert onsets
    lines = [line.get_xdata()[0] for line in trend.axes[0].get_lines() if line.get_linestyle() == "--"]
    assert sorted(set(lines)) == onsets


def test_the_demo_shows_an_alert_and_the_report_explains_it(tmp_path):
    import subprocess

    demo = Path(__file__).resolve().parents[1] / "examples" / "demo.py"
    out = subprocess.run(
        [sys.executable, str(demo), "--root", str(tmp_path), "--prompts", "128", "--samples", "32"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "\nAlerts (" in out
    first = next(line for line in out.splitlines() if line.startswith("  [")).split("] ", 1)[1]
    assert first.startswith("At step ")
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "<h2>Alerts</h2>" in report and _unescape(report).count(first) == 1


def test_agreement_past_2048_prompts_averages_an_even_subset():
    from bon_tracker.tracking.alerting import MAX_AGREEMENT_PROMPTS, eval_statistics

    rng = np.random.default_rng(6)
    proxy = rng.normal(size=(3000, 8))
    true = proxy + rng.normal(size=proxy.shape)
    stats = eval_statistics(proxy, true, bon_curve(proxy, true))
    assert stats.agreement.n_prompts[0] == MAX_AGREEMENT_PROMPTS == 2048
    assert stats.interval.n_prompts == 3000  # the interval resamples every prompt
