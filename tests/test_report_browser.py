"""The local HTML report as a reader sees it: opened from disk in a real headless
Chromium (tests/browser.py), every chart image decoded and shown, the Goodhart summary
on the page with the fitted values."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from bon_tracker import bon_curve
from bon_tracker.record import EvalRecord
from tests.browser import chromium_page, missing_browser

STEPS = (0, 100, 200, 300)


@pytest.fixture(scope="module")
def browser_page():
    reason = missing_browser()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    with chromium_page() as page:
        yield page


def _records() -> list[EvalRecord]:
    """A policy drifting towards a proxy exploit: true reward of best-of-n peaks, then falls."""
    rng = np.random.default_rng(7)
    records = []
    for i, step in enumerate(STEPS):
        quality = rng.normal(size=(128, 32))
        exploit = np.abs(0.6 * i + 0.5 * rng.normal(size=(128, 32)))
        proxy = quality + exploit + 0.7 * rng.standard_t(2, size=(128, 32))
        records.append(EvalRecord.build(step, bon_curve(proxy, quality - 0.3 * exploit**2), policy_kl=0.4 * i))
    return records


def _page_state(page) -> dict:
    return page.evaluate(
        """() => ({
            images: Array.from(document.images).map(img => ({
                alt: img.alt, complete: img.complete, width: img.naturalWidth, height: img.naturalHeight,
                shown: img.getBoundingClientRect().width,
            })),
            summary: document.querySelector('#goodhart-summary')?.innerText ?? null,
            title: document.title,
            curveRows: document.querySelectorAll('#curve-table tr').length,
            stepRows: document.querySelectorAll('#steps-table tr').length,
        })"""
    )


def _open(page, report) -> dict:
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    page.wait_for_function("Array.from(document.images).every(img => img.complete)", timeout=15_000)
    state = _page_state(page)
    state["errors"] = errors
    return state


def test_report_opens_in_chromium_with_every_image_and_the_goodhart_summary(browser_page, tmp_path):
    from bon_tracker.reports.compare import write_run_report

    records = _records()
    last = records[-1]
    assert last.goodhart is not None, "the simulated run should have a Goodhart point"
    report = write_run_report(records, tmp_path / "run", title="browser-test")
    state = _open(browser_page, report)

    assert state["errors"] == []
    assert "browser-test" in state["title"]
    alts = [img["alt"] for img in state["images"]]
    assert alts == [
        f"best-of-n curve at step {last.step}",
        "reward against training step",
        "curves over training",
        "RL versus best-of-n",
    ]
    for img in state["images"]:  # decoded (a broken data URI has naturalWidth 0) and laid out
        assert img["complete"] and img["width"] >= 400 and img["height"] >= 300 and img["shown"] > 300, img
    summary = state["summary"]
    assert summary is not None and summary.startswith("Goodhart point") and f"step {last.step}" in summary
    assert f"n* ≈ {last.goodhart.n:.3g}" in summary and f"KL* = {last.goodhart.kl:.3g} nats" in summary
    assert state["curveRows"] == 1 + len(last.curve.n) and state["stepRows"] == 1 + len(STEPS)


def test_report_says_beyond_the_measured_range_for_an_absurd_fit(browser_page, tmp_path):
    from bon_tracker.reports.compare import write_run_report

    records = _records()
    g = next(r.goodhart for r in records if r.goodhart is not None)
    absurd = dataclasses.replace(g, n=7e235, kl=543.0, within_range=False)
    records = [*records[:-1], dataclasses.replace(records[-1], goodhart=absurd)]
    report = write_run_report(records, tmp_path / "run")  # must not crash (it did: OverflowError)
    state = _open(browser_page, report)
    assert state["errors"] == []
    assert len(state["images"]) == 4 and all(img["width"] > 0 for img in state["images"])
    # An absurd extrapolation is said as such, never printed as a number (issue: "n* ≈ 4.3e7").
    assert "beyond the measured range" in state["summary"] and "beyond n = " in state["summary"]
    assert "7e+235" not in state["summary"] and "∞" not in state["summary"]
