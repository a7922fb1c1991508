"""What a user sees in the tracking UIs, read back from the services themselves: a real
``mlflow server`` and W&B's offline transaction log. Metric names sort numerically with
the true reward first, the curve chart is an image at every eval step, and MLflow holds
N, P, the n grid and the reward names as params, with source and user set."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.record import METRIC_SECTIONS, metric_key

STEPS = (0, 100, 200)
P, N = 32, 16


def _scores(rng: np.random.Generator, step: int) -> tuple[np.ndarray, np.ndarray]:
    true = rng.normal(size=(P, N))
    return true + (1 + step / 100) * rng.standard_t(df=2, size=(P, N)), true


def _sections(keys) -> list[str]:
    """MLflow's metrics view groups charts by the key up to its last ``/``, sorted as text."""
    return sorted({key.rsplit("/", 1)[0] for key in keys})


def _assert_numeric_order(keys, prefix: str = "bon") -> None:
    for kind in ("true", "proxy", "gap"):
        section = f"{prefix}/{METRIC_SECTIONS[kind]}/"
        names = sorted(k for k in keys if k.startswith(section) and re.search(r"/n\d+$", k))  # the UIs' text order
        ns = [int(name.rsplit("/n", 1)[1]) for name in names]
        assert ns == sorted(ns) and len(ns) == len(set(ns)) >= 5, names


# ---- MLflow ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory):
    pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    from mlflow import MlflowClient

    from bon_tracker import BonTracker
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("ui_mlflow"))
    server.start()
    try:
        rng = np.random.default_rng(3)
        tracker = BonTracker(
            "mlflow",
            tracking_uri=server.url,
            experiment="ui",
            run_name="ui",
            proxy_name="reward model",
            true_name="gold",
        )
        for step in STEPS:
            proxy, true = _scores(rng, step)
            tracker.log_scores(step, proxy, true, policy_kl=step / 100)
        tracker.finish()
        client = MlflowClient(server.url)
        run_id = tracker.backend.run_id
        yield client, client.get_run(run_id), list(tracker.history), tmp_path_factory.mktemp("ui_downloads")
    finally:
        server.stop()


def test_mlflow_metric_names_sort_numerically_true_first(mlflow_run):
    client, run, records, _ = mlflow_run
    keys = set(run.data.metrics)
    assert keys >= set(records[-1].scalars())
    _assert_numeric_order(keys)
    sections = _sections(k for k in keys if k.startswith("bon/"))
    assert sections[0] == "bon/1_true" and sections[1] == "bon/2_proxy"
    assert not any(k.startswith("bon/6_kl/") for k in keys)  # no ties: KL per n is in the table only
    values = {m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_key("true", 16))}
    assert values == {r.step: float(r.curve.true_mean[-1]) for r in records}


def test_mlflow_has_the_curve_image_at_every_step(mlflow_run):
    from PIL import Image

    client, run, _, downloads = mlflow_run
    files = [f.path for f in client.list_artifacts(run.info.run_id, "images")]
    pattern = re.compile(r"^images/bon~0_curve\+step\+(\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png$")
    steps = sorted(int(m.group(1)) for f in files if (m := pattern.match(f)))
    assert steps == list(STEPS), files  # one image per eval step, no duplicate
    assert run.data.tags.get("mlflow.loggedImages") == "True"  # the metrics view looks for images
    first = next(f for f in files if pattern.match(f))
    local = Path(client.download_artifacts(run.info.run_id, first, str(downloads)))
    with Image.open(local) as image:  # the compact chart: square, as the metrics view's card box is
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[0] == image.size[1]
    full = [f.path for f in client.list_artifacts(run.info.run_id, "bon_tracker/charts/curve")]
    assert full == [f"bon_tracker/charts/curve/step_{step:09d}.png" for step in STEPS]
    local = Path(client.download_artifacts(run.info.run_id, full[-1], str(downloads)))
    with Image.open(local) as image:  # the full two-panel chart, one click away under Artifacts
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400


def test_mlflow_description_names_the_goodhart_point_and_every_alert(mlflow_run):
    from bon_tracker.backends.mlflow import NOTE_TAG, run_description

    _, run, records, _ = mlflow_run
    note = run.data.tags[NOTE_TAG]
    assert note == run_description(records, [line for line in note.splitlines() if line.startswith("- **")])
    assert note.startswith("**bon_tracker** best-of-n at step 200")
    for record in records:
        for alert in record.onsets:
            assert alert.message.replace("*", "\\*") in note


def test_mlflow_params_source_user_and_rounded_tables(mlflow_run):
    client, run, records, downloads = mlflow_run
    c = records[-1].curve
    params = run.data.params
    assert params["bon.N"] == str(N) and params["bon.P"] == str(P)
    assert params["bon.ns"] == ",".join(str(n) for n in c.n.tolist())
    assert params["bon.proxy_name"] == "reward model" and params["bon.true_name"] == "gold"
    assert run.data.tags.get("mlflow.user") and run.data.tags.get("mlflow.source.name")
    found = client.search_runs([run.info.experiment_id], filter_string=f"params.`bon.N` = '{N}'")
    assert [r.info.run_id for r in found] == [run.info.run_id]  # runs can be filtered by them
    path = client.download_artifacts(run.info.run_id, f"bon_curves/step_{STEPS[-1]:09d}.json", str(downloads))
    table = json.loads(Path(path).read_text())
    floats = [v for row in table["data"] for v in row if isinstance(v, float)]
    assert floats and all(len(repr(v).lstrip("-").replace(".", "").lstrip("0")) <= 7 for v in floats), floats


# ---- W&B offline --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    from bon_tracker import BonTracker
    from bon_tracker.backends import wandb_transaction_log as txlog

    rng = np.random.default_rng(4)
    root = tmp_path_factory.mktemp("ui_wandb")
    tracker = BonTracker("wandb", project="ui", dir=root, run_name="ui", mode="offline")  # images: the default
    try:
        for step in STEPS:
            proxy, true = _scores(rng, step)
            tracker.log_scores(step, proxy, true)
        tracker.finish()
    finally:
        if wandb.run is not None:
            wandb.run.finish()
    run_dir = txlog.find_transaction_log(root).parent  # written from the delivery thread
    return run_dir, txlog.read_history(run_dir), list(tracker.history)


def test_wandb_metric_names_sort_numerically(wandb_run):
    _, rows, records = wandb_run
    assert len(rows) == len(STEPS)
    for row, record in zip(rows, records, strict=True):
        scalars = record.scalars()
        assert {key: row[key] for key in scalars} == scalars
    _assert_numeric_order(rows[-1])


def test_wandb_logs_the_curve_image_at_every_step_by_default(wandb_run):
    from PIL import Image

    run_dir, rows, _ = wandb_run
    for row in rows:
        image = row["bon/0_curve"]
        assert image["_type"] == "image-file" and image["format"] == "png"
        path = run_dir / "files" / image["path"]
        with Image.open(io.BytesIO(path.read_bytes())) as png:
            assert png.size[0] >= 600


def test_wandb_panels_of_mean_and_se_per_n_over_steps(wandb_run):
    from bon_tracker.backends import wandb_transaction_log as txlog

    run_dir, rows, records = wandb_run
    table = txlog.read_table(run_dir, rows[-1]["bon/1_true/over_steps_table"])
    by_line = {}
    for row in table:
        by_line.setdefault(row["lineKey"], []).append((row["step"], row["lineVal"]))
    n = int(records[-1].curve.n[-1])
    expected_mean = [(r.step, float(r.curve.true_mean[-1])) for r in records]
    expected_hi = [(r.step, float(r.curve.true_mean[-1] + r.curve.true_se[-1])) for r in records]
    for line, expected in ((f"n={n}", expected_mean), (f"n={n} +1 SE", expected_hi)):
        assert [step for step, _ in by_line[line]] == [step for step, _ in expected]
        assert [value for _, value in by_line[line]] == pytest.approx([value for _, value in expected], rel=1e-12)
    assert {"n=1", "n=1 -1 SE", f"n={n} -1 SE"} <= set(by_line)
