"""Test-wide setup: every tracking service offline and inside a temporary folder."""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import tempfile

import numpy as np
import pytest

_checkcache = linecache.checkcache


def _checkcache_tolerating_other_threads(filename=None):
    """doctest's debugger calls linecache.checkcache(), which iterates the cache's keys while a
    delivery thread of an earlier test may add or drop SQLAlchemy's generated-code entries
    (CPython < 3.13 does not guard this): an entry gone mid-check is simply not checked."""
    with contextlib.suppress(KeyError):
        _checkcache(filename)


linecache.checkcache = _checkcache_tolerating_other_threads

# Set before any test imports wandb/mlflow/transformers, so nothing reaches the network
# or the user's home folder. A session-wide temporary folder holds W&B's state.
_SESSION_DIR = tempfile.mkdtemp(prefix="bon_tracker_tests_")
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "WANDB_DISABLE_GIT": "true",
    "WANDB_DIR": os.path.join(_SESSION_DIR, "wandb"),
    "WANDB_CACHE_DIR": os.path.join(_SESSION_DIR, "wandb_cache"),
    "WANDB_DATA_DIR": os.path.join(_SESSION_DIR, "wandb_data"),
    "WANDB_CONFIG_DIR": os.path.join(_SESSION_DIR, "wandb_config"),
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DO_NOT_TRACK": "1",
    "MPLBACKEND": "Agg",
    "BON_TRACKER_SPOOL_DIR": os.path.join(_SESSION_DIR, "spool"),
}.items():
    os.environ[_key] = _value
for _dir in ("wandb", "wandb_cache", "wandb_data", "wandb_config"):
    os.makedirs(os.path.join(_SESSION_DIR, _dir), exist_ok=True)
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_RUN_ID", None)


@pytest.fixture(scope="session")
def _session_mlflow_server(tmp_path_factory):
    pytest.importorskip("mlflow")
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("shared_mlflow_server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def shared_mlflow_server(_session_mlflow_server):
    """One ``mlflow server`` for every test that only needs a healthy one (starting one takes
    10-40 s here); under pytest-xdist each worker has its own. Tests keep to their own
    experiment and run names. A test that stops, freezes or restarts a server starts its own
    (``tests.mlflow_server.MlflowServer``): this one must be running when the test ends."""
    yield _session_mlflow_server
    if not _session_mlflow_server.running:
        _session_mlflow_server.start()  # for the tests after this one
        pytest.fail("this test stopped the shared MLflow server: give it its own MlflowServer")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20221019)


@pytest.fixture
def goodhart_scores(rng):
    """(proxy, true) for 64 prompts x 32 samples where proxy = true + heavy-tailed error."""
    true = rng.normal(size=(64, 32))
    proxy = true + rng.standard_t(df=2, size=(64, 32))
    return proxy, true


@pytest.fixture(autouse=True)
def _work_in_a_temporary_folder(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so nothing (./mlruns, ./bon_runs, ./wandb)
    is left in the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def cli_folder(tmp_path, monkeypatch):
    """For command-line tests: no bon_tracker settings from the environment (folder, config
    file, backend, grid, alerts) and a spool of the test's own, in its own working folder."""
    monkeypatch.chdir(tmp_path)
    settings = ("BON_TRACKER_DIR", "BON_TRACKER_CONFIG", "BON_TRACKER_BACKEND", "BON_TRACKER_NS", "BON_TRACKER_ALERTS")
    for name in settings:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BON_TRACKER_SPOOL_DIR", str(tmp_path / "spool"))
    return tmp_path


@pytest.fixture(autouse=True)
def _isolate_tracking_services():
    """Undo process-wide state that trackers keep between tests: the environment
    (``mlflow.set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``), MLflow's global
    tracking URI and active runs, and a W&B run left open."""
    environment = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(environment)
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        tracking_utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if tracking_utils is not None and hasattr(tracking_utils, "_tracking_uri"):
            tracking_utils._tracking_uri = None  # private, but the only way back to "not set"
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.run.finish()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI, a test skipped because an optional package failed to import is a failure:
    CI installs every extra, so a missing one is a broken install, not a reason to skip."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") != "true" or not report.skipped or call.excinfo is None:
        return
    message = str(call.excinfo.value)
    if "could not import" in message or "No module named" in message:
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test skipped because an extra is not installed ({message}); install it"


# Under pytest-xdist (`--dist loadgroup`, scripts/test.sh) each group runs on one worker, one
# test at a time, beside the other worker's tests:
_XDIST_GROUP_OF_FILE = {
    # tmpfs mounts, frozen and restarted servers, bounds on how long training may wait
    "test_delivery_faults.py": "faults",
    "test_faults_tensorboard_trackio.py": "faults",
    "test_render_process.py": "faults",  # times how fast the chart process sees its parent die
    # one local Ray cluster at a time: each starts several processes on the same two cores
    "test_ray.py": "ray",
}


# Files whose tests start a server, a browser, a trainer, Ray or killed processes (10-100 s
# each): marked slow, so `pytest -m "not slow"` is the quick loop (README, Development).
_SLOW_FILES = {
    "test_delivery_faults.py",
    "test_faults_tensorboard_trackio.py",
    "test_ray.py",
    "test_report_browser.py",
    "test_ui_legible.py",
    "test_ui_readback.py",
    "test_integration_transformers.py",
    "test_integration_trl.py",
    "test_integration_lightning.py",
    "test_integration_alerts.py",
    "test_alerts_end_to_end.py",
    "test_lab.py",
    "test_distributed.py",
}


def pytest_collection_modifyitems(config, items):
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if item.path.name in _SLOW_FILES:
            item.add_marker(pytest.mark.slow)
        group = _XDIST_GROUP_OF_FILE.get(item.path.name)
        if xdist and group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
