"""The curve legible where each UI first shows it (issue 19), read from the real UIs in
headless Chromium: an MLflow server, TensorBoard, the trackio dashboard, the local report
and the compare page, each showing the demo's simulated run (true reward peaks, then falls;
alerts fire at steps 300 and 400).

Each test opens the page a user lands on (the link bon_tracker prints or documents) and
asserts what makes it legible: the compact chart is the image shown in the small card (and
shown whole), or the full chart is rendered at least 600 px wide; the Description / Text
holds the Goodhart sentence with its interval and the alert sentences; n reads in ascending
order; the documented trackio and TensorBoard links load with smoothing 0.

One server per UI for the module; ``scripts/screenshots.py`` uses the same helpers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bon_tracker.reports.charts import COMPACT_TRUE_FRACTION
from tests.browser import chromium_page, missing_browser
from tests.mlflow_server import MlflowServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6  # eval steps 0, 100, ..., 500 of the demo's simulated run
PROMPTS, SAMPLES = 256, 64


def demo_scores(seed: int = 0, steps: int = STEPS, hack_speed: float = 1.0):
    """``(step, proxy, true, policy_kl)`` of ``examples/demo.py``'s simulated RL run; a
    smaller ``hack_speed`` exploits the proxy later."""
    spec = importlib.util.spec_from_file_location("bon_demo", ROOT / "examples" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    rng = np.random.default_rng(seed)
    for i in range(steps):
        proxy, true, policy_kl = demo.sample_scores(rng, hack_speed * i / (steps - 1), PROMPTS, SAMPLES)
        yield 100 * i, proxy, true, policy_kl


def log_demo(tracker, **scores_options):
    """Log the demo run through ``tracker`` and finish it once every step is delivered (a busy
    machine can take longer than the default timeout); returns its records."""
    for step, proxy, true, policy_kl in demo_scores(**scores_options):
        tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
    tracker.finish(timeout=600)
    if tracker.wal_path is not None and tracker.wal_path.exists():
        raise RuntimeError(f"the demo run was not delivered in 10 minutes: {tracker.wal_path}")
    return list(tracker.history)


@contextlib.contextmanager
def serve(command: list[str], url: str, env: dict[str, str] | None = None, timeout: float = 90.0) -> Iterator[str]:
    """Run a UI server in its own process group until ``url`` answers; stop exactly that group."""
    process = subprocess.Popen(
        command,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[2:4]} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def serve_tensorboard(log_root: Path) -> contextlib.AbstractContextManager[str]:
    """``tensorboard --logdir log_root`` on a free port of 127.0.0.1."""
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_root), "--port", str(port)]
    return serve([*command, "--host", "127.0.0.1"], f"http://127.0.0.1:{port}")


def serve_trackio(project: str, trackio_dir: str) -> contextlib.AbstractContextManager[str]:
    """``trackio show --project project`` on a free port (``BROWSER=true``: it opens no browser)."""
    port = free_port()
    env = {"GRADIO_SERVER_PORT": str(port), "TRACKIO_DIR": trackio_dir, "BROWSER": "true"}
    command = [sys.executable, "-m", "trackio.cli", "show", "--project", project]
    return serve(command, f"http://127.0.0.1:{port}", env=env)


@pytest.fixture(scope="module")
def page():
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    with chromium_page(1400, 1050) as browser_page:
        yield browser_page


def _sentences(records) -> tuple[str, list[str]]:
    """The Goodhart sentence of the latest step and every alert's sentence, as the UIs must show them."""
    from bon_tracker.reports.charts import goodhart_text

    messages = [alert.message for record in records for alert in record.onsets]
    assert messages, "the demo run should raise alerts"
    assert "95 % interval" in goodhart_text(records[-1])
    return goodhart_text(records[-1]), messages


IMAGE_STATE = """selector => Array.from(document.querySelectorAll(selector)).map(img => {
    const r = img.getBoundingClientRect();
    let clip = img.parentElement;  // the nearest ancestor that clips what overflows it
    while (clip && !['auto', 'hidden', 'scroll'].includes(getComputedStyle(clip).overflowY)) clip = clip.parentElement;
    const c = clip ? clip.getBoundingClientRect() : {top: -1e9, bottom: 1e9};
    return {src: img.src, width: img.naturalWidth, height: img.naturalHeight, shown: r.width,
            top: r.top, bottom: r.bottom, clipTop: c.top, clipBottom: c.bottom};
})"""

LEAF_TEXTS = """pattern => Array.from(document.querySelectorAll('body *'))
    .filter(e => e.children.length === 0 && new RegExp(pattern).test(e.textContent.trim()))
    .map(e => e.textContent.trim())"""

INPUT_NEAR = """label => {
    const el = Array.from(document.querySelectorAll('body *'))
        .find(e => e.children.length === 0 && e.textContent.trim().startsWith(label));
    for (let p = el; p; p = p.parentElement) {
        const input = p.querySelector('input:not([type=checkbox])');
        if (input) return input.value;
    }
    return null;
}"""


def _ns(texts: list[str]) -> list[int]:
    """The n of chart titles such as ``n0004``, ``/n0004`` or ``n = 4: ...``."""
    return [int(t.split("n", 1)[1].split(":")[0].replace("=", "").strip()) for t in texts]


# ---- MLflow -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory):
    pytest.importorskip("mlflow")
    pytest.importorskip("matplotlib")
    from mlflow import MlflowClient

    from bon_tracker import BonTracker

    server = MlflowServer(tmp_path_factory.mktemp("legible_mlflow"))
    server.start()
    try:
        tracker = BonTracker("mlflow", tracking_uri=server.url, experiment="legible", run_name="demo")
        records = log_demo(tracker)
        run = MlflowClient(server.url).get_run(tracker.backend.run_id)
        yield server.url, run, records, tracker.backend.ui_url
    finally:
        server.stop()


def test_mlflow_shows_the_compact_chart_whole_and_n_ascending(page, mlflow_ui):
    url, run, records, ui_url = mlflow_ui
    assert ui_url.endswith("/model-metrics?workflowType=machine_learning")  # the link bon_tracker prints
    page.goto(ui_url)
    page.wait_for_selector("img[src*='bon~0_curve']", timeout=60_000)
    page.wait_for_timeout(1000)  # the card lays out after the image loads
    (image,) = page.evaluate(IMAGE_STATE, "img[src*='bon~0_curve']")
    # MLflow's card shows a ~256-px copy of the compact chart, centred in a square box that the
    # card's scroll area cuts off: the title, the true reward and its n axis are in what shows
    assert image["width"] == image["height"], image
    shown = (min(image["bottom"], image["clipBottom"]) - max(image["top"], image["clipTop"])) / (
        image["bottom"] - image["top"]
    )
    assert image["clipTop"] - 1 <= image["top"] and shown >= COMPACT_TRUE_FRACTION, image
    titles = page.evaluate(LEAF_TEXTS, r"^n\d{4}$")
    grid = records[-1].curve.n.tolist()
    assert _ns(titles[:3]) == grid[:3], titles  # the first section, bon/1_true: n = 1, 2, 4
    artifacts = {f.path for f in _list(url, run.info.run_id, "bon_tracker/charts/curve")}
    assert f"bon_tracker/charts/curve/step_{records[-1].step:09d}.png" in artifacts  # the full chart


def _list(url: str, run_id: str, path: str):
    from mlflow import MlflowClient

    return MlflowClient(url).list_artifacts(run_id, path)


def test_mlflow_description_holds_the_goodhart_point_and_every_alert(page, mlflow_ui):
    from bon_tracker.backends.mlflow import mlflow_run_url

    url, run, records, _ = mlflow_ui
    sentence, alerts = _sentences(records)
    page.goto(mlflow_run_url(url, run.info.experiment_id, run.info.run_id, "overview"))
    page.wait_for_selector("text=Description", timeout=60_000)
    more = page.get_by_text("Show more")
    if more.count():
        more.first.click()
    page.wait_for_timeout(500)
    text = page.evaluate("() => document.body.innerText")
    assert sentence in text  # n* with its 95 % interval, Markdown rendered
    for message in alerts:
        assert message in text, message
    assert f"{len(alerts)} alerts" in text.split(sentence)[0]  # the line shown before "Show more"


# ---- TensorBoard ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tensorboard_ui(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from bon_tracker import BonTracker

    root = tmp_path_factory.mktemp("legible_tb")
    records = log_demo(BonTracker("tensorboard", log_dir=root / "demo"))
    with serve_tensorboard(root) as url:
        yield url, records


def test_tensorboard_time_series_link_has_smoothing_0_and_the_compact_chart(page, tensorboard_ui):
    from bon_tracker.backends.tensorboard import tensorboard_url

    url, records = tensorboard_ui
    page.goto(tensorboard_url(url))
    page.wait_for_selector("img[src*='imageData']", timeout=60_000)
    page.wait_for_timeout(1500)
    assert page.evaluate(INPUT_NEAR, "Smoothing") == "0"
    shown = {}
    for image in page.evaluate(IMAGE_STATE, "img[src*='imageData']"):
        _, _, tag, step, _ = _tensorboard_image_id(image["src"])
        shown[tag] = (step, image)
    step, compact = shown["bon/0_curve"]
    assert step == records[-1].step  # the latest step first
    assert compact["width"] == compact["height"], compact  # the compact chart in the card
    assert shown["bon/0_curve_full"][1]["width"] >= 1000  # the full chart beside it
    # Cards grouped by the tag up to its first "/": the SE bounds in a group of their own, after
    groups = page.evaluate("() => Array.from(document.querySelectorAll('.group-title')).map(e => e.textContent.trim())")
    assert groups == ["Pinned", "bon", "bon_se_bands"], groups
    tags = {key for r in records for key in r.scalars()}
    counts = page.evaluate(LEAF_TEXTS, r"^\d+ cards$")
    assert counts[0] == f"{len(tags) + 2} cards", counts  # every scalar and the two charts: no SE card
    titles = page.evaluate(LEAF_TEXTS, r"^/n\d{4}$")
    assert _ns(titles) == records[-1].curve.n.tolist()[: len(titles)] and len(titles) >= 3, titles


def _tensorboard_image_id(src: str) -> list:
    """``[experiment, run, tag, step, index]`` of a Time Series image URL (base64 JSON)."""
    import base64
    import json
    from urllib.parse import parse_qs, urlparse

    image_id = parse_qs(urlparse(src).query)["imageId"][0]
    return json.loads(base64.urlsafe_b64decode(image_id + "=" * (-len(image_id) % 4)))


def test_tensorboard_custom_scalars_n_ascending_true_and_proxy_apart(page, tensorboard_ui):
    from bon_tracker.backends.tensorboard import tensorboard_url

    url, records = tensorboard_ui
    page.goto(tensorboard_url(url, page="custom_scalars"))
    page.wait_for_selector("text=n* of the fitted true reward", timeout=60_000)
    page.wait_for_timeout(1000)
    # the legacy dashboard's own smoothing, inside its shadow DOM (Playwright's locators pierce it)
    assert page.locator("tf-custom-scalar-dashboard tf-smoothing-input input[type=number]").input_value() == "0"
    true = page.get_by_text(re.compile(r"^n = \d+: true reward")).all_inner_texts()
    proxy = page.get_by_text(re.compile(r"^n = \d+: proxy reward")).all_inner_texts()
    assert _ns(true) == records[-1].curve.n.tolist(), true  # ascending, one chart per n
    assert not set(true) & set(proxy)  # true and proxy never share a y axis


def test_tensorboard_text_holds_the_goodhart_interval_and_the_alerts(page, tensorboard_ui):
    url, records = tensorboard_ui
    sentence, alerts = _sentences(records)
    page.goto(f"{url}/#text")
    page.wait_for_selector("text=bon/goodhart_point", timeout=60_000)
    page.wait_for_timeout(1500)
    # the Text dashboard renders in shadow DOM, which Playwright's text locators pierce
    assert page.get_by_text(f"Step {records[-1].step}: {sentence}").count() == 1
    for message in alerts:
        assert page.get_by_text(message).count() == 1, message


# ---- trackio ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trackio_ui():
    pytest.importorskip("trackio")
    pytest.importorskip("matplotlib")
    from trackio.utils import TRACKIO_DIR  # fixed when trackio was first imported

    from bon_tracker import BonTracker

    project = f"legible-{os.getpid()}-{time.time_ns() % 10**9}"
    records = log_demo(BonTracker("trackio", project=project, run_name="demo"))
    with serve_trackio(project, str(TRACKIO_DIR)) as url:
        yield url, project, records


def test_trackio_link_has_smoothing_0_n_ascending_and_the_alerts(page, trackio_ui):
    from bon_tracker.backends.trackio import dashboard_url

    url, project, records = trackio_ui
    page.goto(dashboard_url(project, url))
    page.wait_for_selector("text=1_true", timeout=60_000)
    page.wait_for_selector("text=n0001", timeout=60_000)
    assert page.evaluate(INPUT_NEAR, "Smoothing") == "0"
    titles = page.evaluate(LEAF_TEXTS, r"^n\d{4}$")
    assert _ns(titles[:3]) == records[-1].curve.n.tolist()[:3], titles
    text = page.evaluate("() => document.body.innerText")
    for alert in (a for r in records for a in r.onsets):
        assert alert.rule in text, alert.rule  # the dashboard's alert panel


def test_trackio_media_shows_the_compact_chart_and_the_alert_sentences(page, trackio_ui):
    from bon_tracker.backends.trackio import dashboard_url

    url, project, records = trackio_ui
    _, alerts = _sentences(records)
    page.goto(dashboard_url(project, url))
    page.get_by_text("Media & Tables").first.click()
    page.wait_for_selector("text=bon/0_curve_full", timeout=60_000)
    page.wait_for_timeout(1500)
    cards = page.evaluate(  # each image card: its title, and its image's size
        """() => Array.from(document.querySelectorAll('body *'))
            .filter(e => e.children.length === 0 && /^bon\\/0_curve(_full)?$/.test(e.textContent.trim()))
            .map(e => { let p = e; while (p && !p.querySelector('img')) p = p.parentElement;
                        const img = p.querySelector('img');
                        return [e.textContent.trim(), img.naturalWidth, img.naturalHeight]; })"""
    )
    compact = [(w, h) for title, w, h in cards if title == "bon/0_curve"]
    assert len(compact) == len(records) and all(w == h for w, h in compact), cards
    page.get_by_text("Alerts & Reports").first.click()
    page.wait_for_timeout(2000)
    text = page.evaluate("() => document.body.innerText")
    for message in alerts:
        assert message in text, message


# ---- the local report and the compare page ----------------------------------------------------


def test_report_curve_is_wide_and_the_summary_has_every_alert(page, tmp_path):
    pytest.importorskip("matplotlib")
    from bon_tracker import BonTracker
    from bon_tracker.reports.compare import write_run_report

    records = log_demo(BonTracker("local", root=tmp_path / "runs", run_name="demo", charts=False))
    _, alerts = _sentences(records)
    page.goto(write_run_report(records, tmp_path / "report").as_uri())
    page.wait_for_function("Array.from(document.images).every(img => img.complete)", timeout=15_000)
    curve = page.evaluate(IMAGE_STATE, "img[alt^='best-of-n curve']")[0]
    assert curve["shown"] >= 600, curve
    summary = page.inner_text("#goodhart-summary")
    assert "95 % interval" in summary
    listed = page.inner_text("#alerts")
    for message in alerts:
        assert message in listed, message
    rows = page.evaluate(
        "() => Array.from(document.querySelectorAll('#curve-table tr td:first-child')).map(td => td.innerText)"
    )
    measured = [int(v) for v in rows if v.isdigit()]
    assert measured == sorted(measured) == records[-1].curve.n.tolist()


def test_compare_page_lists_every_runs_alerts_and_n_star_intervals_without_broken_names(page, tmp_path):
    pytest.importorskip("matplotlib")
    from bon_tracker import BonTracker
    from bon_tracker.reports.compare import RunRecords, write_comparison
    from bon_tracker.reports.html import _span

    runs = []
    for name, speed in (("hacks-at-step-500", 1.0), ("hacks-later-on-a-longer-name", 0.6)):
        records = log_demo(BonTracker("local", root=tmp_path / "runs", run_name=name, charts=False), hack_speed=speed)
        runs.append(RunRecords(name, "local", str(tmp_path / "runs" / name), tuple(records)))
    page.set_viewport_size({"width": 1000, "height": 900})
    try:
        page.goto(write_comparison(runs, tmp_path / "cmp").as_uri())
        page.wait_for_function("Array.from(document.images).every(img => img.complete)", timeout=15_000)
        text = page.evaluate("() => document.body.innerText")
        for run in runs:
            onsets = [a for r in run.records for a in r.onsets]
            assert f"{run.label}: {len(onsets)} alert" in text
            for alert in onsets:
                assert alert.message in text, alert.message
            assert _span(run.records[-1]) in text  # n*'s interval in the table
        lines = page.evaluate(  # line boxes of each run name's text
            """() => Array.from(document.querySelectorAll('#compare-table td:first-child')).map(td => {
                const range = document.createRange(); range.selectNodeContents(td);
                return range.getClientRects().length; })"""
        )
        assert lines == [1, 1]  # run names on one line, never broken mid-word
    finally:
        page.set_viewport_size({"width": 1400, "height": 1050})
