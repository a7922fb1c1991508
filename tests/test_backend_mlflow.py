"""The MLflow backend against real MLflow: a sqlite store, and a real ``mlflow server``
that is stopped and restarted to check that nothing is lost or logged twice."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

mlflow = pytest.importorskip("mlflow")
PIL_Image = pytest.importorskip("PIL.Image")

from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric  # noqa: E402

import bon_tracker  # noqa: E402
from bon_tracker import bon_curve  # noqa: E402
from bon_tracker.backends import backend_from_spec  # noqa: E402
from bon_tracker.backends.mlflow import (  # noqa: E402
    LOGGED_ARTIFACTS_TAG,
    MAX_TAG_VALUE_LENGTH,
    STEP_TABLES_TAG_BUDGET,
    MlflowBackend,
    _registered_tables,
    mlflow_key,
    read_records,
    record_path,
    step_table_path,
)
from bon_tracker.record import TABLE_COLUMNS, EvalRecord  # noqa: E402
from bon_tracker.tracking.tracker import BonTracker  # noqa: E402
from bon_tracker.tracking.wal import WriteAheadLog  # noqa: E402
from tests.mlflow_server import MlflowServer, free_port  # noqa: E402

P, N = 24, 16  # prompts x samples per eval step: small, the maths is tested elsewhere
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores(rng: np.random.Generator, drift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(proxy, true): proxy = true + heavy-tailed error, so the curves bend."""
    true = rng.normal(loc=drift, size=(P, N))
    return true + rng.standard_t(df=2, size=(P, N)), true


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def download_json(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> dict:
    local = client.download_artifacts(run_id, path, str(tmp_path / "downloads"))
    return json.loads(Path(local).read_text(encoding="utf-8"))


def expected_rows(step: int, curve: bon_tracker.BonCurve) -> list[list]:
    """Table rows in TABLE_COLUMNS order, computed independently of the backend."""
    rows = []
    for i, n in enumerate(curve.n.tolist()):
        values = {
            "step": step,
            "n": n,
            "kl": curve.kl[i],
            "kl_bound": curve.kl_bound[i],
            "true_mean": curve.true_mean[i],
            "true_se": curve.true_se[i],
            "proxy_mean": curve.proxy_mean[i],
            "proxy_se": curve.proxy_se[i],
            "gap": curve.proxy_mean[i] - curve.true_mean[i],
            "n_prompts": int(curve.n_prompts[i]),
        }
        # Table artifacts round floats to 6 significant digits (the record artifacts stay exact).
        rows.append(
            [
                float(f"{float(v):.6g}") if isinstance(v, np.floating | float) else v
                for v in (values[c] for c in TABLE_COLUMNS)
            ]
        )
    return rows


def assert_one_value_per_step(client: MlflowClient, run_id: str, curves: dict[int, bon_tracker.BonCurve]) -> None:
    """Every curve metric has exactly one entry per logged step, equal to the curve."""
    for i, n in enumerate(next(iter(curves.values())).n.tolist()):
        for kind, values in (("1_true", "true_mean"), ("2_proxy", "proxy_mean"), ("3_gap", "gap")):
            got = history(client, run_id, f"bon/{kind}/n{n:04d}")
            assert got == [(step, float(getattr(c, values)[i])) for step, c in sorted(curves.items())], (kind, n)


def assert_png(client: MlflowClient, run_id: str, path: str, tmp_path: Path) -> None:
    local = Path(client.download_artifacts(run_id, path, str(tmp_path / "pngs")))
    assert local.read_bytes()[:8] == PNG_MAGIC, path
    with PIL_Image.open(local) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One sqlite store for the module's sqlite tests (creating its schema takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow_sqlite') / 'mlflow.db'}"


@pytest.fixture
def own_server(tmp_path):
    """A server of this test's own, for a test that stops and restarts it (the others share
    ``shared_mlflow_server``, tests/conftest.py)."""
    server = MlflowServer(tmp_path / "mlflow_server")
    server.start()
    yield server
    server.stop()


# ---- construction ---------------------------------------------------------------------------
def test_constructing_touches_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    backend = MlflowBackend(experiment="exp")
    assert backend.run_id is None
    assert backend.spec() == {
        "backend": "mlflow",
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "run_id": None,
        "experiment": "exp",
        "run_key": backend.run_key,  # the identity a new run is created with, known before it exists
        "end_run": None,
    }
    assert len(backend.run_key) == 32 and MlflowBackend().run_key != backend.run_key
    backend.finish()  # nothing opened: nothing to close, nothing created
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert MlflowBackend().spec()["tracking_uri"] == "http://127.0.0.1:1"
    assert MlflowBackend(tracking_uri="sqlite:////x/y.db").tracking_uri == "sqlite:////x/y.db"
    with pytest.raises(ValueError, match="max_retries"):
        MlflowBackend(max_retries=11)


def test_keys_follow_mlflow_rules():
    from mlflow.utils.validation import _validate_metric_name

    for raw in ("bon/1_true/n0016", "bon/context/lr (x)", "a//../b:c", "..x", "/lead", "é/ü", "x" * 400, "bad?key"):
        key = mlflow_key(raw)
        _validate_metric_name(key)  # raises on a key MLflow refuses
        assert len(key) <= 250
    assert mlflow_key("bon/1_true/n0016") == "bon/1_true/n0016"


# ---- a local sqlite store -------------------------------------------------------------------
@pytest.mark.slow
def test_sqlite_run_reads_back_exactly(sqlite_uri, tmp_path, rng, monkeypatch):
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # nothing may land in the working directory (no ./mlruns)
    curves, policy_kls = {}, {100: 0.5, 200: 1.5, 300: 3.0}
    with BonTracker(
        "mlflow", tracking_uri=sqlite_uri, experiment="sqlite_e2e", run_name="e2e", spool_dir=tmp_path / "spool"
    ) as tracker:
        for step, policy_kl in policy_kls.items():
            proxy, true = scores(rng, drift=step / 1000)
            curves[step] = bon_curve(proxy, true)
            tracker.log_scores(step, proxy, true, policy_kl=policy_kl, **{"lr (x)": 0.01 * step})
        # delivered in the background: wait for it before reading the run (generously: the first
        # write creates the store's schema and the charts, ~40 s on two busy cores)
        assert tracker.flush(180)
        run_id = tracker.backend.run_id
        assert run_id is not None
        assert tracker.backend.spec() == {
            "backend": "mlflow",
            "tracking_uri": sqlite_uri,
            "run_id": run_id,
            "experiment": "sqlite_e2e",
            "run_name": "e2e",
            "end_run": True,  # the backend started the run: a replay by `bon-tracker sync` may end it
        }
    assert list(workdir.iterdir()) == []
    assert not (tmp_path / "spool").exists() or not list((tmp_path / "spool").iterdir())

    client = MlflowClient(sqlite_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "sqlite_e2e"
    db_dir = Path(sqlite_uri.removeprefix("sqlite:///")).parent
    assert experiment.artifact_location == (db_dir / "mlartifacts").as_uri()  # artifacts beside the db

    # metrics: one value per step and key, exactly the curve's
    assert_one_value_per_step(client, run_id, curves)
    ns = curves[100].n.tolist()
    assert history(client, run_id, f"bon/3_gap/n{ns[-1]:04d}") == [
        (s, float(c.proxy_mean[-1] - c.true_mean[-1])) for s, c in curves.items()
    ]
    assert history(client, run_id, "bon/5_policy/kl") == list(policy_kls.items())
    assert history(client, run_id, "bon/5_policy/true") == [(s, float(c.true_mean[0])) for s, c in curves.items()]
    assert history(client, run_id, "bon/context/lr _x_") == [(s, 0.01 * s) for s in curves]

    # tags
    tags = run.data.tags
    assert tags["bon_tracker.version"] == bon_tracker.__version__
    assert (tags["bon_tracker.N"], tags["bon_tracker.P"]) == (str(N), str(P))
    assert tags["bon_tracker.ns"] == ",".join(str(n) for n in ns) == "1,2,4,8,16"

    # per-step tables, in log_table's format, registered for the UI's table view
    for step, curve in curves.items():
        table = download_json(client, run_id, step_table_path(step), tmp_path)
        assert table == {"columns": list(TABLE_COLUMNS), "data": expected_rows(step, curve)}
    registered = json.loads(tags[LOGGED_ARTIFACTS_TAG])
    assert [e["path"] for e in registered] == [*map(step_table_path, curves), "bon_curves.json"]
    assert {e["type"] for e in registered} == {"table"}

    # the cumulative table, readable by MLflow's own load_table (which searches runs
    # through the global tracking URI, whatever the client's)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    frame = client.load_table(run.info.experiment_id, "bon_curves.json", run_ids=[run_id])
    assert frame["step"].tolist() == [s for s in curves for _ in ns]
    # pandas parses floats only to about 1e-15 (read_json: precise_float=False)
    np.testing.assert_allclose(frame["true_mean"], np.concatenate([c.true_mean for c in curves.values()]), atol=1e-12)

    # records: the full EvalRecord per step, and read_records() round-trips them
    assert download_json(client, run_id, record_path(200), tmp_path)["step"] == 200
    records = read_records(run_id, sqlite_uri)
    assert [r.step for r in records] == list(curves)
    for record, curve in zip(records, curves.values(), strict=True):
        assert isinstance(record, EvalRecord)
        for field in ("n", "kl", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts"):
            np.testing.assert_array_equal(getattr(record.curve, field), getattr(curve, field))
    assert [r.policy.kl for r in records] == list(policy_kls.values())

    # charts: a valid PNG per step, and the views over training
    for step in curves:
        assert_png(client, run_id, f"bon_tracker/charts/curve/step_{step:09d}.png", tmp_path)
    for name in ("overlay", "trend", "rl"):
        assert_png(client, run_id, f"bon_tracker/charts/{name}.png", tmp_path)


def test_replay_of_a_step_logs_each_metric_once(sqlite_uri, rng, tmp_path):
    backend = MlflowBackend(tracking_uri=sqlite_uri, experiment="replay", charts=False)
    records = {step: EvalRecord.build(step, bon_curve(*scores(rng))) for step in (1, 2)}
    backend.log_eval(records[1])
    backend.log_eval(records[1])  # the tracker's retry after a failure
    # A replay that is not byte-identical (another timestamp: a SQL store would not
    # deduplicate it by itself), and one after a later step was already written.
    backend.log_eval(dataclasses.replace(records[1], timestamp=records[1].timestamp + 60))
    backend.log_eval(records[2])
    backend.log_eval(dataclasses.replace(records[1], timestamp=records[1].timestamp + 120))

    # A failure midway through a step's metrics: some keys are in, the rest are not.
    record = EvalRecord.build(3, bon_curve(*scores(rng)))
    scalars = record.scalars()
    client = MlflowClient(sqlite_uri)
    run_id = backend.run_id
    partial = [Metric(k, v, int(time.time() * 1000) - 5000, 3) for k, v in list(scalars.items())[::3]]
    client.log_batch(run_id, metrics=partial, synchronous=True)
    backend.log_eval(record)
    backend.finish()

    logged = {**records, 3: record}
    assert_one_value_per_step(client, run_id, {step: r.curve for step, r in logged.items()})
    for key in set().union(*(r.scalars() for r in logged.values())):  # every key, Goodhart point included
        steps = [step for step, r in logged.items() if key in r.scalars()]
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == steps, key
    assert [r.step for r in read_records(run_id, sqlite_uri)] == [1, 2, 3]
    table = json.loads(client.get_run(run_id).data.tags[LOGGED_ARTIFACTS_TAG])
    assert len(table) == len({e["path"] for e in table}) == 4  # 3 steps + cumulative, no repeats


@pytest.mark.slow
def test_more_metrics_than_one_batch(sqlite_uri, rng):
    ns = np.arange(1, 401)  # 3 metrics per n (no ties: no KL): 1200 > MLflow's 1000 per batch
    proxy, true = rng.normal(size=(4, 400)), rng.normal(size=(4, 400))
    record = EvalRecord.build(7, bon_curve(proxy, true, ns=ns))
    assert len(record.scalars()) > 1000
    backend = MlflowBackend(tracking_uri=sqlite_uri, experiment="big", charts=False)
    backend.log_eval(record)
    backend.log_eval(record)
    backend.finish()
    run = MlflowClient(sqlite_uri).get_run(backend.run_id)
    assert run.data.metrics == record.scalars()
    assert run.data.metrics["bon/1_true/n0400"] == float(record.curve.true_mean[-1])


@pytest.mark.slow
def test_attaches_to_the_active_run_and_leaves_it_open(sqlite_uri, rng, tmp_path, monkeypatch):
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("attach", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)  # as the user's mlflow.set_tracking_uri would
    curves = {}
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracker = BonTracker("mlflow", spool_dir=tmp_path / "spool")  # no URI, no run id: the active run's
        for step in (5, 10):
            proxy, true = scores(rng)
            curves[step] = bon_curve(proxy, true)
            tracker.log_scores(step, proxy, true)
        tracker.finish()
        assert tracker.backend.run_id == run.info.run_id
        assert client.get_run(run.info.run_id).info.status == "RUNNING"  # not ended by bon_tracker
        assert tracker.backend.spec()["experiment"] == "attach"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"  # ended by its owner
    assert_one_value_per_step(client, run.info.run_id, curves)
    assert [r.step for r in read_records(run.info.run_id, sqlite_uri)] == [5, 10]


def test_attaches_to_a_given_run_id(sqlite_uri, rng, tmp_path, monkeypatch):
    client = MlflowClient(sqlite_uri)
    experiment_id = client.create_experiment("by_id", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment_id).info.run_id  # as Lightning's MLFlowLogger does
    records = [EvalRecord.build(step, bon_curve(*scores(rng))) for step in (3, 4)]
    backend = MlflowBackend(tracking_uri=sqlite_uri, run_id=run_id, charts=False)
    assert backend.run_id == run_id
    backend.log_eval(records[0])
    backend.finish()
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)  # MLflow's own "continue this run" variable
    by_env = MlflowBackend(tracking_uri=sqlite_uri, charts=False)
    by_env.log_eval(records[1])
    by_env.finish()
    assert by_env.run_id == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    assert history(client, run_id, "bon/1_true/n0016") == [(r.step, float(r.curve.true_mean[-1])) for r in records]


def test_spec_rebuilds_a_backend_on_the_same_run(sqlite_uri, rng):
    """What ``bon-tracker sync`` does with a spooled record's spec."""
    records = [EvalRecord.build(step, bon_curve(*scores(rng))) for step in (1, 2)]
    first = MlflowBackend(tracking_uri=sqlite_uri, experiment="sync", max_retries=3, charts=False)
    first.log_eval(records[0])
    spec = first.spec()
    assert spec == {
        "backend": "mlflow",
        "tracking_uri": sqlite_uri,
        "run_id": first.run_id,
        "experiment": "sync",
        "max_retries": 3,
        "charts": False,
        "end_run": True,  # it started the run
    }
    assert json.loads(json.dumps(spec)) == spec
    # sync ends the run only when the log says the tracker had finished; here it had not
    rebuilt = backend_from_spec({**spec, "end_run": False})
    rebuilt.log_eval(records[1])
    rebuilt.finish()  # attached: writes its table, leaves the run open
    client = MlflowClient(sqlite_uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    first.finish()
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [r.step for r in read_records(first.run_id, sqlite_uri)] == [1, 2]
    assert_one_value_per_step(client, first.run_id, {r.step: r.curve for r in records})
    table = json.loads((Path(client.download_artifacts(first.run_id, "bon_curves.json"))).read_text())
    assert [row[0] for row in table["data"]] == [1] * len(records[0].curve.n) + [2] * len(records[1].curve.n)


def test_fails_fast_when_the_server_is_unreachable(rng):
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")}
    backend = MlflowBackend(tracking_uri=f"http://127.0.0.1:{free_port()}", experiment="down", timeout=2)
    record = EvalRecord.build(1, bon_curve(*scores(rng)))
    started = time.monotonic()
    with pytest.raises(mlflow.exceptions.MlflowException):
        backend.log_eval(record)
    assert time.monotonic() - started < 20  # a guard against minutes of retries, not a benchmark
    assert backend.run_id is None
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_HTTP")} == before  # restored


def test_logged_tables_tag_stays_within_mlflow_limit():
    value = None
    for step in range(0, 100_000, 100):
        value = _registered_tables(value, step_table_path(step), STEP_TABLES_TAG_BUDGET) or value
        assert len(value) <= STEP_TABLES_TAG_BUDGET
    entries = json.loads(value)
    assert entries[-1]["path"] == step_table_path(99_900)  # the newest are kept
    foreign = json.dumps([{"path": "eval_results.json", "type": "table"}, *entries])
    value = _registered_tables(foreign, "bon_curves.json", MAX_TAG_VALUE_LENGTH)
    entries = json.loads(value)
    assert entries[0]["path"] == "eval_results.json" and entries[-1]["path"] == "bon_curves.json"
    assert _registered_tables(value, "bon_curves.json", MAX_TAG_VALUE_LENGTH) is None  # already there
    assert _registered_tables('[{"path": "x.json", "ty', "bon_curves.json", MAX_TAG_VALUE_LENGTH) is None


# ---- a real mlflow server -------------------------------------------------------------------
@pytest.mark.slow
def test_server_run_reads_back(shared_mlflow_server, rng, tmp_path):
    server = shared_mlflow_server
    curves = {}
    with BonTracker("mlflow", tracking_uri=server.url, experiment="server_e2e", spool_dir=tmp_path / "spool") as t:
        for step in (1, 2):
            proxy, true = scores(rng)
            curves[step] = bon_curve(proxy, true)
            t.log_scores(step, proxy, true)
    run_id = t.backend.run_id  # known once delivered: read after the block (finish) ends
    client = MlflowClient(server.url)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert_one_value_per_step(client, run_id, curves)
    assert download_json(client, run_id, step_table_path(2), tmp_path)["data"] == expected_rows(2, curves[2])
    assert_png(client, run_id, "bon_tracker/charts/curve/step_000000002.png", tmp_path)
    assert (server.root / "artifacts").is_dir()  # proxied: stored by the server, not the client
    assert [r.step for r in read_records(run_id, server.url)] == [1, 2]


@pytest.mark.slow
def test_server_outage_loses_nothing_and_duplicates_nothing(own_server, rng, tmp_path, monkeypatch):
    server = own_server
    spool = tmp_path / "spool"
    tracker = BonTracker(
        "mlflow", tracking_uri=server.url, experiment="outage", spool_dir=spool, backoff_max=0.5, finish_timeout=60
    )
    curves = {}

    def log(step: int) -> float:
        proxy, true = scores(rng, drift=step / 10)
        curves[step] = bon_curve(proxy, true)
        started = time.monotonic()
        tracker.log_scores(step, proxy, true)
        return time.monotonic() - started

    log(1)
    assert tracker.flush()
    run_id = tracker.backend.run_id
    assert run_id is not None
    server.stop()
    assert log(2) < 20  # training does not wait for the dead server
    assert not tracker.flush(timeout=5)  # delivery is retrying: the record stays in the write-ahead log
    assert tracker.delivery_stats.last_error is not None and tracker.delivery_stats.config_error is None
    wal = WriteAheadLog(tracker.wal_path)
    assert [e.record.step for e in wal.pending()] == [2]
    assert wal.spec()["run_id"] == run_id  # `bon-tracker sync` can find the run
    server.start()  # same port, database and artifacts
    log(3)  # delivered after step 2, which the worker retries first
    assert tracker.flush(timeout=60)
    assert len(wal) == 0 and tracker.pending == 0
    assert tracker.delivery_stats.delivered == 3 and tracker.delivery_stats.dead_lettered == 0
    tracker.finish()
    assert not tracker.wal_path.exists()  # everything delivered: the log is gone

    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert_one_value_per_step(client, run_id, curves)
    assert [r.step for r in read_records(run_id, server.url)] == [1, 2, 3]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)  # load_table searches the global URI
    frame = client.load_table(run.info.experiment_id, "bon_curves.json", run_ids=[run_id])
    assert sorted(set(frame["step"])) == [1, 2, 3] and len(frame) == 3 * len(curves[1].n)
    assert math.isclose(frame["true_mean"].iloc[-1], float(curves[3].true_mean[-1]), abs_tol=1e-12)


@pytest.mark.slow
def test_active_run_of_another_store_is_left_alone(shared_mlflow_server, sqlite_uri, rng, tmp_path, monkeypatch):
    """An active run that is not in this backend's store: start a run there instead."""
    server = shared_mlflow_server
    local = MlflowClient(sqlite_uri)
    experiment_id = local.create_experiment("elsewhere", artifact_location=(tmp_path / "artifacts").as_uri())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    with mlflow.start_run(experiment_id=experiment_id) as active:
        backend = MlflowBackend(tracking_uri=server.url, experiment="other_store", charts=False)
        backend.log_eval(EvalRecord.build(1, bon_curve(*scores(rng))))
        backend.finish()
    assert backend.run_id != active.info.run_id
    remote = MlflowClient(server.url)
    assert remote.get_run(backend.run_id).info.status == "FINISHED"  # its own run: ended
    assert "bon/1_true/n0001" in remote.get_run(backend.run_id).data.metrics
    assert local.get_run(active.info.run_id).data.metrics == {}
