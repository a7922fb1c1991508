"""WandbBackend against the real wandb SDK in offline mode (tests/conftest.py sets
WANDB_MODE=offline). Every assertion reads back what the run wrote to its own
transaction log (``run-<id>.wandb``) and files folder, never a mock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

wandb = pytest.importorskip("wandb")

from bon_tracker.backends import ConfigurationError, backend_from_spec  # noqa: E402
from bon_tracker.backends import wandb_transaction_log as txlog  # noqa: E402
from bon_tracker.backends.wandb import WandbBackend  # noqa: E402
from bon_tracker.core import bon_curve  # noqa: E402
from bon_tracker.record import TABLE_COLUMNS, EvalRecord  # noqa: E402
from bon_tracker.reports.charts import goodhart_text as goodhart_sentence  # noqa: E402
from bon_tracker.tracking.tracker import BonTracker  # noqa: E402

STEPS = (10, 20, 30)


@pytest.fixture(autouse=True)
def _no_run_left_open():
    yield
    if wandb.run is not None:  # a failed test must not leave its run to the next one
        wandb.run.finish()


def _goodhart_scores(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """proxy = true + heavy-tailed error: true reward of best-of-n peaks, then falls."""
    true = rng.normal(size=(64, 32))
    return true + rng.standard_t(df=2, size=(64, 32)), true


def _as_json(records: list[EvalRecord]) -> list[str]:
    return [json.dumps(r.to_json(), sort_keys=True) for r in records]


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Three eval steps logged through BonTracker("wandb", ...) into a new offline run."""
    rng = np.random.default_rng(20221019)
    root = tmp_path_factory.mktemp("wandb_root")
    scores = {step: _goodhart_scores(rng) for step in STEPS}
    tracker = BonTracker("wandb", project="test", dir=root, run_name="bon-test", images=True)
    for step, (proxy, true) in scores.items():
        tracker.log_scores(step, proxy, true, policy_kl=step / 10, lr=1e-4)
    assert tracker.flush()  # delivered in the background: wait before reading the run and its spec
    run = tracker.backend.run
    state = tracker.state()
    tracker.finish()
    run_dir = Path(run.settings.sync_dir)
    return SimpleNamespace(
        root=root,
        run=run,
        run_dir=run_dir,
        scores=scores,
        records=list(tracker.history),
        state=state,
        history=txlog.read_history(run_dir),
    )


def test_the_backend_started_the_run_and_finished_it(logged):
    assert logged.run._is_finished
    assert wandb.run is None
    assert txlog.is_complete(logged.run_dir)  # finish() waited for W&B to close the log
    assert txlog.find_transaction_log(logged.run_dir).name == f"run-{logged.run.id}.wandb"
    assert txlog.find_transaction_log(logged.root) == txlog.find_transaction_log(logged.run_dir)


def test_history_holds_the_exact_curves_at_the_training_step(logged):
    rows = logged.history
    assert [row["_step"] for row in rows] == [0, 1, 2]  # W&B's own counter: we never passed step=
    assert [row["bon/step"] for row in rows] == list(STEPS)
    for row, (proxy, true), record in zip(rows, logged.scores.values(), logged.records, strict=True):
        curve = bon_curve(proxy, true)
        for i, n in enumerate(curve.n.tolist()):
            assert row[f"bon/1_true/n{n:04d}"] == float(curve.true_mean[i])
            assert row[f"bon/2_proxy/n{n:04d}"] == float(curve.proxy_mean[i])
            assert f"bon/6_kl/n{n:04d}" not in row  # no ties: KL is the formula, in the table only
        assert {key: row[key] for key in record.scalars()} == record.scalars()


def test_curve_table_is_written_with_its_columns_and_rows(logged):
    for row, record in zip(logged.history, logged.records, strict=True):
        ref = row["bon/bon_curves"]
        assert ref["_type"] == "table-file"
        assert (logged.run_dir / "files" / ref["path"]).is_file()
        assert (ref["ncols"], ref["nrows"]) == (len(TABLE_COLUMNS), len(record.curve.n))
        rows = txlog.read_table(logged.run_dir, ref)
        assert [list(r) for r in rows] == [list(TABLE_COLUMNS)] * len(rows)
        assert rows == record.table_rows()


def test_native_charts_and_image_are_logged(logged):
    visualize = txlog.read_config(logged.run_dir)["_wandb"]["visualize"]
    assert set(visualize) == {
        "bon/curve_chart",
        "bon/curve_chart_proxy",
        "bon/overlay/true",
        "bon/overlay/proxy",
        "bon/1_true/over_steps",
        "bon/2_proxy/over_steps",
        "bon/4_goodhart/over_steps",
    }
    last, record = logged.history[-1], logged.records[-1]
    c = record.curve
    # true and proxy each in a chart of their own: never one y axis for both scales
    for key, kind in (("bon/curve_chart", "true"), ("bon/curve_chart_proxy", "proxy")):
        chart = visualize[key]["panel_config"]
        assert chart["panelDefId"] == "wandb/lineseries/v0"
        assert chart["fieldSettings"] == {"step": "kl", "lineKey": "series", "lineVal": "reward"}
        assert json.dumps(chart["userQuery"]).count(f'"{key}_table"') == 1
        points = txlog.read_table(logged.run_dir, last[f"{key}_table"])
        assert {p["series"] for p in points} == {kind, f"{kind} -1 SE", f"{kind} +1 SE"}
        mean, se = getattr(c, f"{kind}_mean"), getattr(c, f"{kind}_se")
        for series, values in ((kind, mean), (f"{kind} +1 SE", mean + se)):
            got = [(p["n"], p["kl"], p["reward"]) for p in points if p["series"] == series]
            assert got == list(zip(c.n.tolist(), c.kl.tolist(), values.tolist(), strict=True))

    # n* and its interval over training: one chart, the values the scalars hold
    lines = txlog.read_table(logged.run_dir, last["bon/4_goodhart/over_steps_table"])
    for label, name in (("n*", "n"), ("n* 95 % low", "n_low"), ("n* 95 % high", "n_high")):
        expected = [
            (r.step, r.scalars()[f"bon/4_goodhart/{name}"])
            for r in logged.records
            if f"bon/4_goodhart/{name}" in r.scalars()
        ]
        assert [(p["step"], p["lineVal"]) for p in lines if p["lineKey"] == label] == expected

    # The overlay at the last step draws one line per eval step so far.
    for series in ("true", "proxy"):
        lines = txlog.read_table(logged.run_dir, last[f"bon/overlay/{series}_table"])
        for r in logged.records:
            mine = [(p["step"], p["lineVal"]) for p in lines if p["lineKey"] == f"step {r.step}"]
            assert mine == list(zip(r.curve.kl.tolist(), getattr(r.curve, f"{series}_mean").tolist(), strict=True))
    first_overlay = txlog.read_table(logged.run_dir, logged.history[0]["bon/overlay/true_table"])
    assert {p["lineKey"] for p in first_overlay} == {"step 10"}

    for key in ("bon/0_curve", "bon/0_curve_full"):  # the compact chart, then the full one
        image = last[key]
        assert image["_type"] == "image-file" and image["width"] >= 600
        assert (logged.run_dir / "files" / image["path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert last["bon/0_curve"]["height"] == last["bon/0_curve"]["width"]  # the compact chart is square


def test_metrics_use_the_step_metric(logged):
    metrics = [r.metric for r in txlog.iter_records(logged.run_dir) if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "bon/step" for m in metrics)
    assert any(m.glob_name == "bon/*" and m.step_metric == "bon/step" for m in metrics)
    assert any(m.name == "bon/eval_record" and m.options.hidden for m in metrics)


def test_goodhart_point_is_in_the_summary(logged):
    goodhart = logged.records[-1].goodhart
    assert goodhart is not None  # the heavy-tailed proxy makes true reward peak
    summary = txlog.read_summary(logged.run_dir)
    assert summary["bon/4_goodhart/n"] == goodhart.n
    assert summary["bon/4_goodhart/kl"] == goodhart.kl
    assert summary["bon/4_goodhart/peak_gain"] == goodhart.peak_gain
    assert summary["bon/4_goodhart/step"] == STEPS[-1]
    # the reports' sentence, with its interval, as W&B's run overview shows the summary
    assert summary["bon/4_goodhart/sentence"] == f"step {STEPS[-1]}: {goodhart_sentence(logged.records[-1])}"
    onsets = [a for r in logged.records for a in r.onsets]
    expected = "\n".join(f"step {a.step}, {a.rule}: {a.message}" for a in onsets) or "no alerts so far"
    assert summary["bon/7_alert/sentences"] == expected


def test_run_config_holds_n_p_the_grid_and_the_reward_names(logged):
    config = txlog.read_config(logged.run_dir)
    params = logged.records[-1].run_params()
    assert {key: config[f"bon.{key}"] for key in params} == params


def test_read_records_round_trips_exactly(logged):
    assert _as_json(txlog.read_records(logged.run_dir)) == _as_json(logged.records)


def test_spec_resumes_the_same_run(logged, tmp_path):
    spec = logged.state["backend"]
    assert spec["backend"] == "wandb"
    assert (spec["project"], spec["run_id"], spec["mode"]) == ("test", logged.run.id, "offline")
    assert spec["dir"] == str(logged.root)
    json.dumps(spec)  # a saved state must be JSON

    backend = backend_from_spec({**spec, "dir": str(tmp_path)})  # own folder: offline resume is a new one
    assert backend.run_id == logged.run.id
    record = EvalRecord.build(40, bon_curve(*logged.scores[STEPS[-1]]))
    backend.log_eval(record)
    assert backend.run.id == logged.run.id
    backend.finish()
    assert _as_json(txlog.read_records(tmp_path)) == _as_json([record])


def test_attaches_to_the_active_run_and_leaves_it_open(tmp_path, rng):
    run = wandb.init(project="test", dir=tmp_path)
    run.log({"train/loss": 1.0, "user/eval_record": "the user's own text"})  # read_records skips it
    tracker = BonTracker(WandbBackend())
    tracker.log_scores(5, *_goodhart_scores(rng))
    assert tracker.flush()
    assert tracker.backend.run is run
    given = WandbBackend(run=run)  # a run object passed in explicitly
    extra = EvalRecord.build(7, bon_curve(*_goodhart_scores(rng)))
    given.log_eval(extra)
    assert given.run is run
    tracker.finish()
    given.finish()
    assert wandb.run is run and not run._is_finished

    run.log({"train/loss": 0.5})  # the trainer carries on
    run_dir = Path(run.settings.sync_dir)
    run.finish()
    assert txlog.wait_until_complete(run_dir)  # finish() returns before the log is closed
    rows = txlog.read_history(run_dir)
    assert [row["_step"] for row in rows] == [0, 1, 2, 3]
    assert [row.get("bon/step") for row in rows] == [None, 5, 7, None]
    assert [row.get("train/loss") for row in rows] == [1.0, None, None, 0.5]
    assert _as_json(txlog.read_records(run_dir)) == _as_json([*tracker.history, extra])


def test_a_step_is_logged_once(tmp_path, rng):
    backend = WandbBackend(project="test", dir=tmp_path, images=False)
    record = EvalRecord.build(3, bon_curve(*_goodhart_scores(rng)))
    backend.log_eval(record)
    backend.log_eval(record)  # the tracker's replay after a failure it could not see through
    one_prompt = EvalRecord.build(4, bon_curve([[0.3, 0.1, 0.2, 0.9]], [[1.0, 0.0, 0.5, 0.25]]))  # NaN SEs
    backend.log_eval(one_prompt)
    run_dir = Path(backend.run.settings.sync_dir)
    backend.finish()
    rows = txlog.read_history(run_dir)
    assert [row["bon/step"] for row in rows] == [3, 4]
    assert "bon/0_curve" not in rows[0]
    assert _as_json(txlog.read_records(run_dir)) == _as_json([record, one_prompt])
    assert all(np.isnan(r["true_se"]) for r in txlog.read_table(run_dir, rows[1]["bon/bon_curves"]))


def test_custom_step_metric_and_bounded_overlay(tmp_path, rng):
    backend = WandbBackend(project="test", dir=tmp_path, step_metric="train/global_step", images=False, overlay_steps=2)
    for step in (8, 9, 10):
        backend.log_eval(EvalRecord.build(step, bon_curve(*_goodhart_scores(rng))))
    run_dir = Path(backend.run.settings.sync_dir)
    backend.finish()
    rows = txlog.read_history(run_dir)
    assert [row["train/global_step"] for row in rows] == [8, 9, 10]
    assert all("bon/step" not in row for row in rows)
    metrics = [r.metric for r in txlog.iter_records(run_dir) if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "bon/*" and m.step_metric == "train/global_step" for m in metrics)
    overlay = txlog.read_table(run_dir, rows[-1]["bon/overlay/true_table"])
    assert {p["lineKey"] for p in overlay} == {"step 8", "step 10"}  # first and last of 3 steps


def test_reopens_the_run_when_its_owner_finished_it(tmp_path, rng):
    run = wandb.init(project="test", dir=tmp_path / "trainer")
    backend = WandbBackend(dir=tmp_path / "ours")
    backend.log_eval(EvalRecord.build(1, bon_curve(*_goodhart_scores(rng))))
    run.finish()  # e.g. transformers' WandbCallback at the end of train()
    late = EvalRecord.build(2, bon_curve(*_goodhart_scores(rng)))
    backend.log_eval(late)  # continues the same run (resume="allow"), which it now owns
    assert backend.run is not run and backend.run.id == run.id
    backend.finish()
    assert wandb.run is None
    assert _as_json(txlog.read_records(tmp_path / "ours")) == _as_json([late])


def test_reader_follows_records_across_blocks_and_rejects_corruption(tmp_path):
    rng = np.random.default_rng(1)
    blob = "".join(rng.choice(list('abcdefghij"\\é'), size=80_000))  # > 2 blocks: FIRST, MIDDLE, LAST chunks
    run = wandb.init(project="test", dir=tmp_path)
    for i in range(50):
        run.log({"i": i, "x": float(rng.normal())} if i != 25 else {"i": i, "blob": blob})
    run_dir = Path(run.settings.sync_dir)
    run.finish()
    assert txlog.wait_until_complete(run_dir)
    log = txlog.find_transaction_log(run_dir)
    assert log.stat().st_size > 3 * txlog.BLOCK_SIZE
    rows = txlog.read_history(run_dir)
    assert [row["i"] for row in rows] == list(range(50))
    assert rows[25]["blob"] == blob

    torn = tmp_path / "torn" / log.name  # a run killed mid-write: its complete records still read
    torn.parent.mkdir()
    torn.write_bytes(log.read_bytes()[: txlog.BLOCK_SIZE + 1000])
    assert 0 < len(txlog.read_history(torn)) < 50
    assert txlog.is_complete(log) and not txlog.is_complete(torn)
    assert not txlog.wait_until_complete(torn, timeout=0.05)

    corrupt = tmp_path / "corrupt" / log.name
    corrupt.parent.mkdir()
    data = bytearray(log.read_bytes())
    data[txlog.BLOCK_SIZE // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        list(txlog.iter_records(corrupt))

    (tmp_path / "not_a_log.wandb").write_bytes(b"nonsense" + log.read_bytes())
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(txlog.iter_records(tmp_path / "not_a_log.wandb"))


def test_constructing_touches_nothing(tmp_path):
    code = (
        "import sys; from bon_tracker.backends.wandb import WandbBackend; "
        f"b = WandbBackend(project='p', dir={str(tmp_path / 'never')!r}); "
        "assert b.run is None and b.run_id is None, b.run_id; "
        "assert b.spec()['backend'] == 'wandb'; "
        "assert 'wandb' not in sys.modules, 'wandb imported before the first log_eval'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
    assert not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="mode"):
        WandbBackend(mode="sometimes")


# ---- the process's exit ---------------------------------------------------------------------------------------------

EXITING = r"""
import socket, sys, time
import numpy as np
import wandb
from bon_tracker import BonTracker

online = sys.argv[1] == "online"
root = sys.argv[2]
options = {"mode": "offline"}
if online:  # W&B online, its server unreachable: a closed loopback port
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    # wandb.init's own init_timeout (90 s) left as it is: that is the wait the exit must not inherit.
    unreachable = wandb.Settings(base_url=f"http://127.0.0.1:{port}", api_key="x" * 40)
    options = {"mode": "online", "init_kwargs": {"settings": unreachable}}
tracker = BonTracker("wandb", project="exit", dir=root + "/w", images=False, spool_dir=root + "/wal", backoff_max=1.0,
                     finish_timeout=3, **options)
rng = np.random.default_rng(0)
for step in range(2):
    true = rng.normal(size=(16, 8))
    tracker.log_scores(step, true + rng.normal(size=true.shape), true)
if not online:
    assert tracker.flush(60)
print(tracker.wal_path, flush=True)
print(time.time(), flush=True)  # finish() starts now; the parent times it to the process's exit
tracker.finish()
"""


def _run_and_time_exit(tmp_path: Path, mode: str) -> tuple[float, str, subprocess.CompletedProcess]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("WANDB_SERVICE", None)  # this process's own W&B service (a run of an earlier test): not shared
    for key in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):  # W&B's state: here
        (tmp_path / key.lower()).mkdir()
        env[key] = str(tmp_path / key.lower())
    proc = subprocess.run(
        [sys.executable, "-c", EXITING, mode, str(tmp_path)], capture_output=True, text=True, env=env, timeout=240
    )
    ended = time.time()
    lines = proc.stdout.split()
    assert proc.returncode == 0 and len(lines) == 2, proc.stderr[-3000:]
    return ended - float(lines[1]), lines[0], proc


def test_process_exit_is_bounded_by_finish_timeout_when_wandb_is_unreachable(tmp_path):
    """W&B's exit hook waited for its service, stuck on the unreachable server: ~85 s after finish()."""
    from bon_tracker.tracking.wal import WriteAheadLog

    took, wal, proc = _run_and_time_exit(tmp_path, "online")
    assert took < 3 + 10, f"the process exited {took:.1f} s after finish(timeout=3)"
    assert "stopped it" in proc.stderr  # said so
    assert [e.record.step for e in WriteAheadLog(wal).pending() if e.record] == [0, 1]  # kept for `bon-tracker sync`


def test_process_exit_leaves_a_healthy_wandb_alone(tmp_path):
    took, _, proc = _run_and_time_exit(tmp_path, "offline")
    assert took < 3 + 10
    assert "stopped it" not in proc.stderr  # W&B's own exit: nothing of ours was in flight
    (run_dir,) = (tmp_path / "w" / "wandb").glob("offline-run-*")
    assert [r.step for r in txlog.read_records(run_dir)] == [0, 1]  # its log closed whole


def test_a_state_saved_before_the_first_delivery_resumes_the_same_run(tmp_path, rng):
    """save_state never waits for the run to exist: the run key in the spec is its id."""
    first = BonTracker("wandb", project="test", mode="offline", dir=str(tmp_path / "a"), images=False)
    first.log_scores(0, rng.normal(size=(4, 8)), rng.normal(size=(4, 8)))
    state = first.state()  # at once; the worker may not have called wandb.init yet
    first.finish()
    assert first.backend.run_id == state["backend"]["run_key"]
    second = BonTracker("wandb", resume={**state, "backend": {**state["backend"], "dir": str(tmp_path / "b")}})
    second.log_scores(1, rng.normal(size=(4, 8)), rng.normal(size=(4, 8)))
    second.finish()
    assert second.backend.run_id == first.backend.run_id
    assert [r.step for r in txlog.read_records(tmp_path / "b")] == [1]


def test_online_without_an_api_key_is_an_error_at_construction(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match=r"W&B is online but no API key .* was found: run `wandb login`"):
        BonTracker("wandb", project="test", spool_dir=tmp_path / "wal")
    (tmp_path / ".netrc").write_text("machine api.example.test login user password " + "k" * 40 + "\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.example.test")
    BonTracker("wandb", project="test", spool_dir=tmp_path / "wal")  # credentials found: no error


def test_a_goodhart_point_beyond_the_horizon_is_no_number_in_the_summary(tmp_path):
    from tests.test_goodhart_reporting import far_record

    record = far_record()
    assert record.goodhart_status() == "beyond" and record.goodhart.n > 1e6
    backend = WandbBackend(project="test", mode="offline", dir=str(tmp_path), images=False)
    backend.log_eval(record)
    backend.finish()
    summary = txlog.read_summary(tmp_path)
    assert summary.get("bon/4_goodhart/n") is None and summary.get("bon/4_goodhart/kl") is None
    assert summary["bon/4_goodhart/status"] == "beyond"
