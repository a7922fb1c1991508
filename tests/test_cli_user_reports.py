"""A new user's reports about ``bon-tracker analyze`` and ``compare``, each reproduced end to end.

1. ``analyze`` raised no alerts: it now runs the tracker's alert reporter over the steps of
   each run, so the same data give the same alerts at the same steps as ``log_scores``.
2. ``compare --n 64`` on runs with N = 16 drew an empty panel under a wrong heading.
3. ``analyze 'dumps/*.parquet'`` (the README's Ray command) did not expand the pattern.
4. Re-running ``analyze`` piled up ``scores-331856`` folders without a word.
5. Smaller: the backend's cause printed three times after computing, ``--out`` with ``--root``,
   "1 samples", and the alert and agreement metric names of the docs.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bon_tracker import BonTracker
from bon_tracker.backends.local import read_alerts, read_records
from bon_tracker.cli.main import EXIT_OK, EXIT_PENDING, EXIT_USAGE, main
from bon_tracker.core import AlertMonitor, AlertRules
from bon_tracker.core.alerts import RULES
from bon_tracker.core.simulation import SimulationModel
from bon_tracker.record import curve_image_key, metric_key

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
STEPS = (0, 100, 200, 300, 400, 500)
EXPECTED_ONSETS = [(200, "bon_true_falls"), (300, "headroom_shrinks")]


@pytest.fixture(autouse=True)
def _isolated(cli_folder):
    """Each test in its own working folder: no bon_tracker.yaml, runs or spool from elsewhere."""


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def peaked_run(P: int = 400, N: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """A simulated RL run (docs/alerts.md's family) whose best-of-16 true reward falls at step 200
    while its proxy rises, and whose best-of-n headroom is gone by step 300."""
    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    rng = np.random.default_rng(3)
    prompts = model.draw_prompts(P, rng)
    return [model.sample(prompts, N, lam, rng) for lam in (0.0, 0.4, 0.8, 1.2, 1.6, 2.0)]


def score_rows(data, order: np.random.Generator | None = None) -> list[dict]:
    """One row per sample, grouped by step and prompt (or shuffled with ``order``)."""
    rows = [
        {"step": step, "prompt_id": f"p{i:04d}", "proxy": float(p), "true": float(t)}
        for step, (proxy, true) in zip(STEPS, data)
        for i in range(proxy.shape[0])
        for p, t in zip(proxy[i], true[i])
    ]
    if order is not None:
        rows = [rows[i] for i in order.permutation(len(rows))]
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def tracker_run(tmp_path: Path, data, **options):
    with BonTracker("local", root=tmp_path / "tracker", run_name="train", charts=False, **options) as tracker:
        for step, (proxy, true) in zip(STEPS, data):
            tracker.log_scores(step, proxy, true)
    return tracker


def scalars(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "scalars.jsonl").read_text().splitlines()]


# ---- 1. analyze raises the alerts log_scores raises -----------------------------------------------------------


@pytest.fixture(scope="module")
def run_data():
    return peaked_run()


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "shuffled"])
def test_analyze_raises_the_alerts_that_log_scores_raises(tmp_path, capsys, run_data, grouped):
    tracker = tracker_run(tmp_path, run_data)
    assert [(a.step, a.rule) for a in tracker.alerts] == EXPECTED_ONSETS

    rows = score_rows(run_data, None if grouped else np.random.default_rng(1))
    path = write_jsonl(tmp_path / "scores.jsonl", rows)
    code, out, err = cli(capsys, "analyze", path, "--out", tmp_path / "runs", "--json", "-q")
    assert code == EXIT_OK, err
    (run,) = json.loads(out)["runs"]
    assert [(a["step"], a["rule"]) for a in run["alerts"]] == EXPECTED_ONSETS
    run_dir = Path(run["run_dir"])

    # the local run folder: alerts.jsonl, bon/7_alert/* at every step, the records, the report
    onsets = [(line["step"], line["rule"]) for line in read_alerts(run_dir) if line["kind"] == "onset"]
    assert onsets == EXPECTED_ONSETS
    for rule in RULES:
        key = metric_key("alert", rule)
        assert [s[key] for s in scalars(run_dir)] == [float(r.alert_states[rule]) for r in tracker.history], rule
    records = read_records(run_dir)
    assert [r.step for r in records] == list(STEPS)
    assert all(r.interval is not None and r.predictions for r in records)
    assert all(r.agreement is not None for r in records)
    if grouped:  # the same prompts in the same order: the same interval, agreement and sentences
        for got, want in zip(records, tracker.history):
            assert got.interval.kl == pytest.approx(want.interval.kl, rel=1e-9)
            assert got.interval.kl_high == pytest.approx(want.interval.kl_high, rel=1e-9)
            assert got.interval.n_low == pytest.approx(want.interval.n_low, rel=1e-9)
            np.testing.assert_allclose(got.agreement.mean, want.agreement.mean, rtol=1e-12)
            assert len(got.predictions) == len(want.predictions)
        assert [a.message for r in records for a in r.onsets] == [a.message for a in tracker.alerts]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<h2>Alerts</h2>" in html
    for r in records:
        for alert in r.onsets:
            assert f"data-rule='{alert.rule}'" in html


@pytest.mark.parametrize("batch_rows", [7, 1 << 16])
def test_analyze_statistics_equal_log_scores_on_ragged_prompts_cut_by_batches(tmp_path, capsys, batch_rows):
    """Prompts of 5 to 16 samples, cut across batches of 7 rows: each step's interval and predictions
    are those of ``log_scores`` on the same prompts (ragged input: no agreement in either)."""
    rng = np.random.default_rng(11)
    steps = {}
    for step in (0, 10, 20):
        lengths = rng.integers(5, 17, size=60)
        true = [rng.normal(size=n) + 0.05 * step for n in lengths]
        steps[step] = ([t + (1 + step / 10) * rng.standard_t(2, size=len(t)) for t in true], true)
    rows = [
        {"step": step, "prompt_id": f"q{i:03d}", "proxy": float(a), "true": float(b)}
        for step, (proxy, true) in steps.items()
        for i, (p, t) in enumerate(zip(proxy, true))
        for a, b in zip(p, t)
    ]
    path = write_jsonl(tmp_path / "ragged.jsonl", rows)
    code, out, err = cli(capsys, "analyze", path, "--out", "runs", "--json", "-q", "--batch-rows", batch_rows)
    assert code == EXIT_OK, err
    got = read_records(json.loads(out)["runs"][0]["run_dir"])
    with BonTracker("local", root=tmp_path / "tracker", charts=False) as tracker:
        for step, (proxy, true) in steps.items():
            tracker.log_scores(step, proxy, true)
    for a, b in zip(got, tracker.history):
        assert a.step == b.step and b.interval is not None and a.agreement is None is b.agreement
        for field in ("n", "n_low", "n_high", "kl", "kl_low", "kl_high", "gain", "gain_low", "gain_high"):
            assert getattr(a.interval, field) == pytest.approx(getattr(b.interval, field), rel=1e-9, abs=1e-12), field
        assert [r["n"] for r in a.predictions] == [r["n"] for r in b.predictions]
        np.testing.assert_allclose(
            [r["true_mean_high"] for r in a.predictions], [r["true_mean_high"] for r in b.predictions], rtol=1e-9
        )
    assert [r.alert_states for r in got] == [r.alert_states for r in tracker.history]


def test_analyze_text_summary_names_each_alert(tmp_path, capsys, run_data):
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data))
    code, out, _ = cli(capsys, "analyze", path, "--out", tmp_path / "runs", "-q")
    assert code == EXIT_OK
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith("alert ")]
    assert [line.split(":")[0] for line in lines] == [
        "alert bon_true_falls at step 200",
        "alert headroom_shrinks at step 300",
    ]
    assert "the true reward of best-of-16 fell by" in lines[0]


@pytest.mark.parametrize("how", ["env", "config"])
def test_alerts_off_means_no_alerts_in_analyze(tmp_path, capsys, monkeypatch, run_data, how):
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data))
    extra: list = []
    if how == "env":
        monkeypatch.setenv("BON_TRACKER_ALERTS", "off")
    else:
        (tmp_path / "cfg.yaml").write_text("alerts: off\n", encoding="utf-8")
        extra = ["--config", tmp_path / "cfg.yaml"]
    code, out, err = cli(capsys, "analyze", path, "--out", tmp_path / "runs", "--json", "-q", *extra)
    assert code == EXIT_OK, err
    (run,) = json.loads(out)["runs"]
    run_dir = Path(run["run_dir"])
    assert run["alerts"] == [] and not (run_dir / "alerts.jsonl").exists()
    assert not any("/7_alert/" in key for s in scalars(run_dir) for key in s)
    assert "<h2>Alerts</h2>" not in (run_dir / "report.html").read_text(encoding="utf-8")
    assert all(r.interval is not None for r in read_records(run_dir))  # the statistics stay


def test_analyze_alert_settings_are_honoured(tmp_path, capsys, monkeypatch, run_data):
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data))
    monkeypatch.setenv("BON_TRACKER_ALERTS", json.dumps({"headroom_shrinks": False}))
    code, out, err = cli(capsys, "analyze", path, "--out", tmp_path / "runs", "--json", "-q")
    assert code == EXIT_OK, err
    (run,) = json.loads(out)["runs"]
    assert [(a["step"], a["rule"]) for a in run["alerts"]] == [(200, "bon_true_falls")]
    assert "bon/7_alert/headroom_shrinks" not in scalars(run["run_dir"])[0]


# ---- 2. compare --n beyond the runs' n --------------------------------------------------------------------------


def test_compare_n_beyond_every_run_is_an_error_naming_the_largest_n(tmp_path, capsys, rng):
    for name in ("a", "b"):
        with BonTracker("local", root=tmp_path / "runs", run_name=name, charts=False, alerts=False) as tracker:
            for step in (0, 10):
                proxy = rng.normal(size=(20, 16))
                tracker.log_scores(step, proxy, proxy + rng.normal(size=proxy.shape))
    runs = [tmp_path / "runs" / "a", tmp_path / "runs" / "b"]
    code, out, err = cli(capsys, "compare", *runs, "--n", 64, "--out", tmp_path / "cmp")
    assert code == EXIT_USAGE and out == ""
    assert "--n 64: run 'a' has no n = 64 at step 10" in err and "the largest n every run has there is 16" in err
    assert not (tmp_path / "cmp").exists()
    code, out, err = cli(capsys, "compare", *runs, "--n", 16, "--out", tmp_path / "cmp")
    assert code == EXIT_OK, err
    assert "<th>true@16</th>" in (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")


# ---- 3. glob patterns in file arguments -----------------------------------------------------------------------


def test_analyze_expands_a_quoted_glob_pattern_in_sorted_order(tmp_path, capsys, run_data):
    rows = score_rows(run_data[:2])
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    half = len(rows) // 2 + 5  # a prompt split across the two files
    write_jsonl(dumps / "b.jsonl", rows[half:])
    write_jsonl(dumps / "a.jsonl", rows[:half])
    code, out, err = cli(capsys, "analyze", "dumps/*.jsonl", "--out", tmp_path / "runs", "--json", "-q")
    assert code == EXIT_OK, err
    summary = json.loads(out)
    assert summary["rows"] == len(rows) and summary["grouped"] is True  # a first, then b: one table
    (run,) = summary["runs"]
    assert run["name"] == "a" and [s["prompts"] for s in run["steps"]] == [400, 400]

    code, _, err = cli(capsys, "analyze", "dumps/*.parquet", "-q")
    assert code == EXIT_USAGE and "dumps/*.parquet: no file matches this pattern" in err
    literal = write_jsonl(tmp_path / "odd[1].jsonl", rows[:64])  # a real file named like a pattern
    code, out, err = cli(capsys, "analyze", literal, "--out", tmp_path / "runs", "--json", "-q")
    assert code == EXIT_OK, err and json.loads(out)["rows"] == 64


# ---- 4. re-running analyze: a new folder said once, or --overwrite ------------------------------------------


def test_rerun_makes_a_new_folder_and_says_so_overwrite_replaces_it(tmp_path, capsys, run_data):
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data[:2]))
    runs = tmp_path / "bon_runs"
    code, out, err = cli(capsys, "analyze", path, "-q")
    assert code == EXIT_OK and not err
    assert out.splitlines()[-1] == "  run folder: bon_runs/scores (report: bon_runs/scores/report.html)"

    code, out, err = cli(capsys, "analyze", path, "-q")
    assert code == EXIT_OK
    assert err.splitlines() == [
        "bon-tracker analyze: bon_runs/scores holds an earlier run, so this run is written to "
        "bon_runs/scores-2; pass --overwrite to replace the earlier one instead"
    ]
    assert out.splitlines()[-1].startswith("  run folder: bon_runs/scores-2 ")
    assert sorted(p.name for p in runs.iterdir()) == ["scores", "scores-2"]

    (runs / "scores" / "stale.txt").write_text("from the first run")
    code, out, err = cli(capsys, "analyze", path, "-q", "--overwrite", "--json")
    assert code == EXIT_OK and not err
    (run,) = json.loads(out)["runs"]
    assert run["run_dir"] == "bon_runs/scores" and run["replaced"] is True
    assert sorted(p.name for p in runs.iterdir()) == ["scores", "scores-2"]  # nothing left aside
    assert not (runs / "scores" / "stale.txt").exists() and len(read_records(runs / "scores")) == 2
    assert json.loads((runs / "scores" / "analyze.json").read_text())["inputs"] == [str(path)]


def test_overwrite_never_replaces_a_folder_analyze_did_not_write(tmp_path, capsys, run_data):
    with BonTracker("local", root=tmp_path / "bon_runs", run_name="scores", charts=False) as tracker:
        tracker.log_scores(0, *run_data[0])  # a training run's folder of the same name
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data[:1]))
    code, out, err = cli(capsys, "analyze", path, "-q", "--overwrite")
    assert code == EXIT_USAGE and out == ""
    assert "--overwrite replaces only a run folder that bon-tracker analyze wrote" in err
    assert [r.step for r in read_records(tmp_path / "bon_runs" / "scores")] == [0]
    assert sorted(p.name for p in (tmp_path / "bon_runs").iterdir()) == ["scores"]


def test_the_last_line_names_where_the_backend_run_is(tmp_path, capsys, run_data):
    pytest.importorskip("tensorboard")
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data[:2]))
    code, out, err = cli(capsys, "analyze", path, "-q", "--backend", "tensorboard")
    assert code == EXIT_OK, err
    last = out.splitlines()[-1]
    log_dir = (tmp_path / "runs" / "scores").resolve()
    assert last.startswith(f"  tensorboard: {log_dir} (view: tensorboard --logdir ") and "None" not in out
    assert last.endswith("(2 eval steps logged)")
    assert "logged to" not in err  # said once, in the summary


# ---- 5. smaller reports ------------------------------------------------------------------------------------------


def test_a_backend_configuration_error_stops_analyze_before_reading(tmp_path, capsys, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    bad = tmp_path / "scores.csv"
    bad.write_text("prompt_id,proxy,true\nq,1,2\nq,abc,3\n", encoding="utf-8")  # an error on line 3
    code, out, err = cli(capsys, "analyze", bad, "-q", "--backend", "wandb", "--wandb-mode", "online")
    assert code == EXIT_USAGE and out == ""
    assert "cannot set up the wandb backend: W&B is online but no API key" in err
    assert "abc" not in err  # the file was never read
    assert not (tmp_path / "bon_runs").exists()


def test_a_failure_at_first_contact_is_reported_once(tmp_path, capsys, run_data):
    pytest.importorskip("mlflow")
    missing = "0" * 32
    (tmp_path / "cfg.yaml").write_text(
        textwrap.dedent(f"""
        finish_timeout: 5
        mlflow: {{tracking_uri: "sqlite:///{tmp_path / "mlflow.db"}", run_id: "{missing}", charts: false}}
        """),
        encoding="utf-8",
    )
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data[:2]))
    code, out, err = cli(capsys, "analyze", path, "-q", "--config", tmp_path / "cfg.yaml", "--backend", "mlflow")
    assert code == EXIT_PENDING and "run folder: bon_runs/scores " in out  # the local folder regardless
    assert err.count(missing) == 1, err  # the cause (the run it cannot find), once
    assert err.count("bon-tracker sync ") == 2  # the delivery's line and the summary's, both with the command
    last = err.strip().splitlines()[-1]
    assert last.startswith("  mlflow: 0 eval steps logged; 2 records could not be logged and are kept in ")


def test_out_and_root_together_is_an_error(tmp_path, capsys, run_data):
    path = write_jsonl(tmp_path / "scores.jsonl", score_rows(run_data[:1]))
    code, out, err = cli(capsys, "analyze", path, "-q", "--out", "a", "--root", "b")
    assert code == EXIT_USAGE and out == ""
    assert "--out and --root both name the folder that holds the run folders; give one" in err
    code, out, err = cli(capsys, "analyze", path, "-q", "--root", "b")
    assert code == EXIT_OK and "run folder: b/scores " in out


def test_counts_are_singular_and_plural(tmp_path, capsys):
    one = tmp_path / "one.csv"
    one.write_text("prompt_id,proxy,true\nq,1,2\n", encoding="utf-8")
    code, out, _ = cli(capsys, "analyze", one, "-q")
    assert code == EXIT_OK
    assert "read 1 sample from 1 file" in out and "run 'one': 1 eval step\n" in out
    assert "step 0: 1 prompt, N=1;" in out
    assert not re.search(r"\b1 (samples|prompts|files|eval steps)\b", out)


def _doc_metric_names(text: str) -> set[str]:
    """The ``bon/...`` metric names a document names: whole names in backticks or code, with the
    siblings that follow one in a list (`` `bon/4_goodhart/n`, `/kl` `` or `` `bon/8_agreement/top1`,
    `top0_5` ``), ``<rule>`` expanded to every rule; ``…`` and ``...`` mark a prefix."""
    flat = re.sub(r"\s+", " ", text)
    names: set[str] = set()
    for match in re.finditer(r"`(bon/[^`\s]+)`((?:, `/?[A-Za-z0-9_…]+`)*)", flat):
        first = match.group(1)
        names.add(first)
        parent = first.rsplit("/", 1)[0]
        for sibling in re.findall(r"`/?([A-Za-z0-9_…]+)`", match.group(2)):
            names.add(f"{parent}/{sibling}")
    for code in re.findall(r"```.*?```", text, flags=re.S):  # names in code comments
        for match in re.finditer(r"\b(bon/[0-9]_[a-z]+/[A-Za-z0-9_<>]+)((?:, [a-z0-9_]+)*)", code):
            names.add(match.group(1))
            parent = match.group(1).rsplit("/", 1)[0]
            names.update(f"{parent}/{s}" for s in match.group(2).split(", ") if s)
    out = set()
    for name in names:
        name = name.rstrip(".,;:")
        if "<rule>" in name:
            out.update(name.replace("<rule>", rule) for rule in RULES)
        else:
            out.add(name)
    return out


# Names the docs give that are no scalar of a run folder's scalars.jsonl, and where each is made.
NOT_SCALARS = {
    curve_image_key(): "the per-step chart image",
    "bon/0_curve_full": "the full chart image (W&B, TensorBoard, trackio)",
    "bon/curve_chart": "a W&B custom chart (bon_tracker/backends/wandb.py)",
    "bon/curve_chart_proxy": "a W&B custom chart (bon_tracker/backends/wandb.py)",
    "bon/4_goodhart/over_steps": "a W&B line-series panel (bon_tracker/backends/wandb.py)",
    "bon/4_goodhart/sentence": "W&B run summary text (bon_tracker/backends/wandb.py)",
    "bon/7_alert/sentences": "W&B run summary text (bon_tracker/backends/wandb.py)",
    "bon/step": "W&B's step metric (bon_tracker/backends/wandb.py)",
    "bon/1_true/over_steps": "a W&B line-series panel (bon_tracker/backends/wandb.py)",
    "bon/alerts": "TensorBoard's text summary (bon_tracker/backends/tensorboard.py)",
    "bon/*": "a wildcard",
}


def test_every_metric_name_in_the_docs_is_what_a_tracker_run_writes(tmp_path):
    docs = {name: (ROOT / name).read_text(encoding="utf-8") for name in ("README.md", "docs/alerts.md")}
    named = {doc: _doc_metric_names(text) for doc, text in docs.items()}
    assert "bon/7_alert/headroom_shrinks" in named["docs/alerts.md"] and "bon/4_goodhart/kl" in named["README.md"]

    model = SimulationModel(rho=0.8, gamma=0.267, noise=0.5)
    rng = np.random.default_rng(5)
    prompts = model.draw_prompts(1000, rng)
    with BonTracker("local", root=tmp_path, run_name="names", charts=False) as tracker:
        for step, lam in enumerate((0.0, 0.3)):  # tie-free, with a measured Goodhart point and its interval
            tracker.log_scores(step, *model.sample(prompts, 16, lam, rng), policy_kl=lam**2 / 2)
        proxy, true = model.sample(prompts, 16, 0.5, rng)
        tracker.log_scores(2, np.round(proxy, 1), true, policy_kl=0.125)  # ties: the exact KL per n
    written = {key for line in scalars(tmp_path / "names") for key in line if key != "step"}
    assert len(tracker.history) == 3

    for doc, names in named.items():
        for name in sorted(names):
            if name in NOT_SCALARS:
                continue
            if name.endswith(("…", "...")):
                prefix = name.rstrip("….")
                assert any(key.startswith(prefix) for key in written), f"{doc}: {name}"
            else:
                assert name in written, f"{doc} names {name}, which a tracker run never writes"
    # the core's own names are the tracker's
    monitor = AlertMonitor(AlertRules())
    assert set(monitor.metrics()) == {metric_key("alert", rule) for rule in RULES}
    assert set(monitor.metrics()) <= written


def test_log_record_of_records_without_alerts_raises_the_curve_alerts(tmp_path, run_data):
    """Records built elsewhere (``EvalRecord.build`` on a curve, no interval) logged with ``log_record``:
    the rules that need only the curves fire as in ``log_scores`` (``headroom_shrinks`` needs the interval)."""
    from bon_tracker.core import bon_curve
    from bon_tracker.record import EvalRecord

    with BonTracker("local", root=tmp_path, run_name="records", charts=False) as tracker:
        for step, (proxy, true) in zip(STEPS, run_data):
            tracker.log_record(EvalRecord.build(step, bon_curve(proxy, true)))
    assert [(a.step, a.rule) for a in tracker.alerts] == [(200, "bon_true_falls")]
    assert [line["rule"] for line in read_alerts(tmp_path / "records")] == ["bon_true_falls"]
    assert [s["bon/7_alert/bon_true_falls"] for s in scalars(tmp_path / "records")] == [0, 0, 1, 1, 1, 1]
