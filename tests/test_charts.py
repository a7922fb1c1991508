"""Every chart renders to a valid, legible PNG: right size, not blank, labelled."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg

from bon_tracker import bon_curve
from bon_tracker.record import EvalRecord
from bon_tracker.reports import charts

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_pixels(fig) -> np.ndarray:
    """Render ``fig`` to PNG, check the file, and return its pixels (H, W, channels) in [0, 1]."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    assert data[:8] == PNG_SIGNATURE
    assert 10_000 < len(data) < 2_000_000
    buffer.seek(0)
    pixels = mpimg.imread(buffer, format="png")
    return pixels


def assert_legible(fig) -> None:
    pixels = png_pixels(fig)
    height, width = pixels.shape[:2]
    assert 400 <= width <= 2000 and 300 <= height <= 2000
    rgb = pixels[..., :3]
    ink = (rgb < 0.9).any(axis=-1)
    assert 0.01 < ink.mean() < 0.6  # something drawn, and not a solid block
    assert rgb.std() > 0.05
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.25
    assert colourful.mean() > 0.001  # coloured lines, not only grey axes
    for ax in fig.axes:
        if ax.get_label() == "<colorbar>":
            continue
        assert ax.get_xlabel() or ax.get_ylabel() or ax.get_title()


def record_at(step: int, proxy: np.ndarray, true: np.ndarray, policy_kl: float | None = None) -> EvalRecord:
    return EvalRecord.build(step, bon_curve(proxy, true), policy_kl=policy_kl)


@pytest.fixture
def history(rng) -> list[EvalRecord]:
    """Four eval steps of a policy drifting towards proxy errors (a Goodhart point appears)."""
    records = []
    for i, step in enumerate((0, 100, 200, 300)):
        true = rng.normal(size=(48, 32))
        proxy = true + (1.0 + i) * rng.standard_t(df=2, size=(48, 32))
        records.append(record_at(step, proxy, true, policy_kl=0.5 * i))
    return records


def titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


def legend_texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


@pytest.mark.parametrize("sqrt_kl", [False, True])
def test_curve_chart(history, sqrt_kl):
    record = next(r for r in history if r.goodhart is not None)
    fig = charts.curve_chart(record, sqrt_kl=sqrt_kl)
    assert_legible(fig)
    ax = fig.axes[0]
    assert ("√KL" in ax.get_xlabel()) == sqrt_kl and "nats" in ax.get_xlabel()
    assert any("Goodhart point" in t for t in legend_texts(fig))
    assert f"step {record.step}" in ax.get_title()


def test_curve_chart_uses_reward_names(history):
    fig = charts.curve_chart(history[0], proxy_name="reward model", true_name="gold RM")
    texts = legend_texts(fig)
    assert "reward model (proxy)" in texts and "gold RM (true)" in texts


def test_curve_chart_with_ties_and_no_goodhart_point(rng):
    true = rng.integers(0, 2, size=(30, 16)).astype(float)
    record = record_at(0, true, true)  # proxy = true: pass@n, monotone, no peak
    assert record.curve.has_ties
    assert_legible(charts.curve_chart(record))


@pytest.mark.parametrize("sqrt_kl", [False, True])
def test_overlay_chart(history, sqrt_kl):
    fig = charts.overlay_chart(history, sqrt_kl=sqrt_kl, true_name="gold")
    assert_legible(fig)
    assert "gold (true)" in legend_texts(fig)
    assert any(ax.get_label() == "<colorbar>" and "training step" in ax.get_ylabel() for ax in fig.axes)


def test_trend_chart(history):
    fig = charts.trend_chart(history)
    assert_legible(fig)
    assert fig.axes[1].get_xlabel() == "training step"
    assert any("true @ n=" in t for t in legend_texts(fig))


def test_rl_chart(history):
    fig = charts.rl_chart(history)
    assert_legible(fig)
    assert any("RL fit" in t for t in legend_texts(fig))


def test_compare_chart(history, rng):
    other = [record_at(r.step, rng.normal(size=(40, 32)) * 2, rng.normal(size=(40, 32))) for r in history]
    fig = charts.compare_chart({"run A": history[-1], "run B": other[-1]}, proxy_name="RM")
    assert_legible(fig)
    texts = legend_texts(fig)
    assert "run A (step 300)" in texts and "run B (step 300)" in texts and "RM (proxy)" in texts
    ax = fig.axes[0]
    assert "nats" in ax.get_xlabel() and "reward" in ax.get_ylabel() and "2 runs" in ax.get_title()


@pytest.mark.parametrize("sqrt_kl", [False, True])
def test_compare_chart_sequence_of_pairs_and_ties(history, rng, sqrt_kl):
    binary = rng.integers(0, 2, size=(30, 16)).astype(float)
    fig = charts.compare_chart(
        [("tied", record_at(0, binary, binary)), ("smooth", history[0])], sqrt_kl=sqrt_kl, show_proxy=False
    )
    assert_legible(fig)


def test_compare_chart_needs_a_run():
    with pytest.raises(ValueError, match="no runs"):
        charts.compare_chart({})


def test_runs_trend_chart(history, rng):
    other = [record_at(step, rng.normal(size=(40, 16)), rng.normal(size=(40, 16))) for step in (0, 150, 300)]
    runs = {"run A": history, "run B": other}
    assert charts.common_n(runs) == 16  # run B only has n up to 16
    fig = charts.runs_trend_chart(runs, show_proxy=True, true_name="gold")
    assert_legible(fig)
    top, bottom = fig.axes[:2]
    assert "n=16" in top.get_ylabel() and "gold" in top.get_ylabel()
    assert bottom.get_xlabel() == "training step" and "Goodhart" in bottom.get_ylabel()
    assert {"run A", "run B"} <= set(legend_texts(fig))


def test_runs_trend_chart_without_goodhart_points(rng):
    binary = [
        record_at(s, b, b)
        for s, b in ((0, rng.integers(0, 2, (20, 8)).astype(float)), (10, rng.integers(0, 2, (20, 8)).astype(float)))
    ]
    fig = charts.runs_trend_chart({"pass@n": binary}, n=4)
    assert_legible(fig)
    assert any("no Goodhart point" in t.get_text() for t in fig.axes[1].texts)
