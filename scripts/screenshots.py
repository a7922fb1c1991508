"""Make the README's screenshots from the real UIs, each showing the curve as a user first sees it.

    .venv/bin/python scripts/screenshots.py [--out docs/images]

What it does, with nothing outside this machine (all under a temporary folder):

1. logs two runs of the demo's simulated RL run (``examples/demo.py``): ``hacks-at-step-500``
   (the true reward peaks, then falls; alerts at steps 300 and 400) and ``hacks-later``;
2. MLflow: a real ``mlflow server`` (sqlite store, a free port, its own process group) and
   headless Chromium (Debian's ``chromium`` package, driven by Playwright for Python):
   ``mlflow_metrics.png`` (the run's Model metrics page, the compact chart in the
   ``bon/0_curve`` card), ``mlflow_description.png`` (the run's Description: the Goodhart
   point with its interval and the alert sentences) and ``mlflow_compare.png`` (the
   experiment's chart view, both runs overlaid);
3. TensorBoard (``tensorboard --logdir``, links with smoothing 0): ``tensorboard_time_series.png``
   and ``tensorboard_custom_scalars.png``;
4. trackio (``trackio show``, ``&smoothing=0``): ``trackio_metrics.png`` and ``trackio_media.png``;
5. the local HTML report (``report.png``, the top of the page), the curve chart of one step
   (``demo_curve.png``) and the compare page of both runs (``compare.png``).

The browser helpers and the servers are those of ``tests/test_ui_legible.py``, which asserts
what these pictures show.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

RUNS = (("hacks-at-step-500", 1.0), ("hacks-later", 0.6))  # (run name, how fast it exploits the proxy)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel; close it so the charts get the width."""
    import contextlib
    import re

    # The panel's markup changes between versions: a screenshot with it is still fine.
    with contextlib.suppress(Exception):
        page.get_by_role("button", name=re.compile("close", re.I)).last.click(timeout=3000)


def shoot_mlflow(work: Path, out: Path) -> list[Path]:
    import mlflow

    from bon_tracker import BonTracker
    from bon_tracker.backends.mlflow import mlflow_experiment_url, mlflow_run_url
    from tests.browser import chromium_page
    from tests.mlflow_server import MlflowServer
    from tests.test_ui_legible import log_demo

    server = MlflowServer(work / "mlflow")
    server.start()
    try:
        run_ids = []
        for name, speed in RUNS:
            tracker = BonTracker("mlflow", tracking_uri=server.url, experiment="goodhart-demo", run_name=name)
            log_demo(tracker, hack_speed=speed)
            run_ids.append(tracker.backend.run_id)
        experiment_id = mlflow.MlflowClient(server.url).get_run(run_ids[0]).info.experiment_id
        paths = [out / "mlflow_metrics.png", out / "mlflow_description.png", out / "mlflow_compare.png"]
        with chromium_page(1400, 1000) as page:
            page.goto(mlflow_run_url(server.url, experiment_id, run_ids[0]))
            page.wait_for_selector("text=bon/1_true", timeout=60_000)
            page.wait_for_selector("img[src*='bon~0_curve']", timeout=60_000)
            _close_assistant(page)
            page.wait_for_timeout(2000)  # chart animations
            page.screenshot(path=str(paths[0]))

            page.goto(mlflow_run_url(server.url, experiment_id, run_ids[0], "overview"))
            page.wait_for_selector("text=Description", timeout=60_000)
            _close_assistant(page)
            more = page.get_by_text("Show more")
            if more.count():
                more.first.click()
            page.wait_for_timeout(1000)
            description = page.get_by_text("Description", exact=True).first
            top = description.bounding_box()["y"] - 10
            page.screenshot(path=str(paths[1]), clip={"x": 180, "y": top, "width": 1000, "height": 330})

            page.goto(mlflow_experiment_url(server.url, experiment_id))
            page.wait_for_selector("text=bon/1_true", timeout=60_000)
            _close_assistant(page)
            page.wait_for_timeout(3000)
            page.screenshot(path=str(paths[2]))
        return paths
    finally:
        server.stop()


def shoot_tensorboard(work: Path, out: Path) -> list[Path]:
    from bon_tracker import BonTracker
    from bon_tracker.backends.tensorboard import tensorboard_url
    from tests.browser import chromium_page
    from tests.test_ui_legible import log_demo, serve_tensorboard

    for name, speed in RUNS:
        log_demo(BonTracker("tensorboard", log_dir=work / "tb" / name), hack_speed=speed)
    paths = [out / "tensorboard_time_series.png", out / "tensorboard_custom_scalars.png"]
    with serve_tensorboard(work / "tb") as url, chromium_page(1400, 1000) as page:
        page.goto(tensorboard_url(url))
        page.wait_for_selector("img[src*='imageData']", timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(paths[0]))
        page.goto(tensorboard_url(url, page="custom_scalars"))
        page.wait_for_selector("text=n* of the fitted true reward", timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(paths[1]))
    return paths


def shoot_trackio(work: Path, out: Path) -> list[Path]:
    from trackio.utils import TRACKIO_DIR

    from bon_tracker import BonTracker
    from bon_tracker.backends.trackio import dashboard_url
    from tests.browser import chromium_page
    from tests.test_ui_legible import log_demo, serve_trackio

    for name, speed in RUNS:
        log_demo(BonTracker("trackio", project="goodhart-demo", run_name=name), hack_speed=speed)
    paths = [out / "trackio_metrics.png", out / "trackio_media.png"]
    with serve_trackio("goodhart-demo", str(TRACKIO_DIR)) as url, chromium_page(1400, 1000) as page:
        page.goto(dashboard_url("goodhart-demo", url))
        page.wait_for_selector("text=n0001", timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(paths[0]))
        page.get_by_text("Media & Tables").first.click()
        page.wait_for_selector("text=bon/0_curve_full", timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(paths[1]))
    return paths


def shoot_reports(work: Path, out: Path) -> list[Path]:
    from bon_tracker import BonTracker
    from bon_tracker.reports import charts
    from bon_tracker.reports.compare import RunRecords, write_comparison, write_run_report
    from tests.browser import chromium_page
    from tests.test_ui_legible import log_demo

    runs = []
    for name, speed in RUNS:
        tracker = BonTracker("local", root=work / "local", run_name=name, charts=False)
        runs.append(RunRecords(name, "local", f"bon_runs/{name}", tuple(log_demo(tracker, hack_speed=speed))))
    records = list(runs[0].records)
    report = write_run_report(records, work / "report", title="demo")
    comparison = write_comparison(runs, work / "compare")
    paths = [out / "report.png", out / "compare.png", out / "demo_curve.png"]
    with chromium_page(1100, 1500) as page:
        for page_path, shot in ((report, paths[0]), (comparison, paths[1])):
            page.goto(page_path.as_uri())
            page.wait_for_function("Array.from(document.images).every(img => img.complete && img.naturalWidth > 0)")
            page.screenshot(path=str(shot))
    charts.curve_chart(records[-1]).savefig(paths[2])
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tests.browser import missing_browser

    reason = missing_browser()
    if reason is not None:
        print(f"scripts/screenshots.py: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    made: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="bon_tracker_screenshots_") as tmp:
        work = Path(tmp)
        os.environ["TRACKIO_DIR"] = str(work / "trackio")  # read once, when trackio is first imported
        os.environ["MPLBACKEND"] = "Agg"
        os.environ["BON_TRACKER_SPOOL_DIR"] = str(work / "spool")  # write-ahead logs with the rest
        os.chdir(work)  # nothing lands in the repository
        for shoot in (shoot_mlflow, shoot_tensorboard, shoot_trackio, shoot_reports):
            made.extend(shoot(work, out))
    for path in made:
        print(f"wrote {path}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
