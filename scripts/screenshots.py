"""Make the README's screenshots: the MLflow metrics view of a run and the local HTML report.

    .venv/bin/python scripts/screenshots.py [--out docs/images]

What it does, with nothing outside this machine:

1. starts a real ``mlflow server`` (sqlite store, a free port, its own process group, all
   under a temporary folder) and logs six eval steps of the demo's simulated run
   (``examples/demo.py``) through ``BonTracker("mlflow", ...)``;
2. opens the run's Model metrics page in headless Chromium (Debian's ``chromium``
   package, driven by Playwright for Python) in MLflow's training view
   (``?workflowType=machine_learning``) and saves ``mlflow_metrics.png``;
3. writes the same run's local HTML report and saves ``report.png`` (the top of the page)
   and ``demo_curve.png`` (the curve chart of one step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

STEPS = 6


def simulated_records(prompts: int = 256, samples: int = 64):
    """(step, proxy, true, policy_kl) of the demo's simulated RL run."""
    import numpy as np
    from demo import sample_scores

    rng = np.random.default_rng(0)
    for i in range(STEPS):
        proxy, true, policy_kl = sample_scores(rng, i / (STEPS - 1), prompts, samples)
        yield 100 * i, proxy, true, policy_kl


def log_mlflow_run(url: str):
    """Log the simulated run to the server at ``url``; returns (experiment id, run id, records)."""
    import mlflow

    from bon_tracker import BonTracker

    tracker = BonTracker("mlflow", tracking_uri=url, experiment="goodhart-demo", run_name="demo")
    for step, proxy, true, policy_kl in simulated_records():
        tracker.log_scores(step, proxy, true, policy_kl=policy_kl)
    tracker.finish()
    run_id = tracker.backend.run_id
    experiment_id = mlflow.MlflowClient(url).get_run(run_id).info.experiment_id
    return experiment_id, run_id, list(tracker.history)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens an "MLflow Assistant" side panel; close it so the charts get the width."""
    import contextlib
    import re

    # The panel's markup changes between versions: a screenshot with it is still fine.
    with contextlib.suppress(Exception):
        page.get_by_role("button", name=re.compile("close", re.I)).last.click(timeout=3000)


def shoot_mlflow(url: str, experiment_id: str, run_id: str, out: Path) -> Path:
    from bon_tracker.backends.mlflow import mlflow_run_url
    from tests.browser import chromium_page

    path = out / "mlflow_metrics.png"
    with chromium_page(1400, 1050) as page:
        page.goto(mlflow_run_url(url, experiment_id, run_id))
        # The React UI renders in stages: wait for the curve image chart and the first metric section.
        page.wait_for_selector("text=bon/1_true", timeout=60_000)
        page.wait_for_selector("img[src^='blob:'], img[src*='get-artifact'], img[src*='artifacts']", timeout=60_000)
        _close_assistant(page)
        page.wait_for_timeout(1500)  # chart animations
        page.screenshot(path=str(path))
    return path


def shoot_report(records, out: Path, work: Path) -> tuple[Path, Path]:
    from bon_tracker.reports import charts
    from bon_tracker.reports.compare import write_run_report
    from tests.browser import chromium_page

    report = write_run_report(records, work / "report", title="demo")
    path = out / "report.png"
    with chromium_page(1100, 1500) as page:
        page.goto(report.as_uri())
        page.wait_for_function("Array.from(document.images).every(img => img.complete && img.naturalWidth > 0)")
        page.screenshot(path=str(path))
    curve = out / "demo_curve.png"
    fig = charts.curve_chart(records[3])
    fig.savefig(curve)
    return path, curve


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNGs")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tests.browser import missing_browser
    from tests.mlflow_server import MlflowServer

    reason = missing_browser()
    if reason is not None:
        print(f"scripts/screenshots.py: {reason}", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bon_tracker_screenshots_") as tmp:
        work = Path(tmp)
        server = MlflowServer(work / "mlflow")
        server.start()
        try:
            experiment_id, run_id, records = log_mlflow_run(server.url)
            made = [shoot_mlflow(server.url, experiment_id, run_id, out)]
        finally:
            server.stop()
        made.extend(shoot_report(records, out, work))
    for path in made:
        print(f"wrote {path}")
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
