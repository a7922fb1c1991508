"""Every chart renders to a valid, legible PNG: right size, not blank, labelled."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")
import matplotlib.image as mpimg

from bon_tracker import bon_curve
from bon_tracker.core import kl_to_n
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


def band_heights_px(ax) -> np.ndarray:
    """Pixel heights of the ±1 SE bands (fill_between polygons) drawn on ``ax``."""
    ax.figure.canvas.draw()
    heights = []
    for collection in ax.collections:
        for path in collection.get_paths():
            y = ax.transData.transform(path.vertices)[:, 1]
            heights.append(y.max() - y.min())
    return np.array(heights)


def with_goodhart(record: EvalRecord, **changes) -> EvalRecord:
    return dataclasses.replace(record, goodhart=dataclasses.replace(record.goodhart, **changes))


@pytest.mark.parametrize("sqrt_kl", [False, True])
def test_curve_chart(history, sqrt_kl):
    record = next(r for r in history if r.goodhart is not None and r.goodhart.within_range)
    fig = charts.curve_chart(record, sqrt_kl=sqrt_kl)
    assert_legible(fig)
    ax_true, ax_proxy = fig.axes[:2]
    assert ax_true.get_shared_x_axes().joined(ax_true, ax_proxy)  # one KL axis, two reward scales
    assert ("√KL" in ax_proxy.get_xlabel()) == sqrt_kl and "nats" in ax_proxy.get_xlabel()
    assert "true reward" in ax_true.get_ylabel() and "proxy reward" in ax_proxy.get_ylabel()
    assert f"step {record.step}" in fig.get_suptitle()
    texts = legend_texts(fig)
    assert "Goodhart point" in texts and any(t.startswith("fit d(α−βd)") for t in texts)
    g = record.goodhart
    (label,) = [t.get_text() for t in ax_true.texts if "n* ≈" in t.get_text()]
    assert f"KL* = {g.kl:.2f} nats" in label


def test_curve_chart_gives_each_reward_a_readable_scale(rng):
    """Proxy spanning ~0-12 and true ~0-0.8 (the issue's case): each panel's y range fits
    its own curve, and the SE bands are visible (several pixels) at the default size."""
    true = 0.3 * rng.normal(size=(256, 64)) + 0.3
    proxy = 10 * true + 3 * rng.standard_t(df=2, size=(256, 64))
    record = record_at(0, proxy, true)
    fig = charts.curve_chart(record)
    ax_true, ax_proxy = fig.axes[:2]
    c = record.curve
    for ax, mean in ((ax_true, c.true_mean), (ax_proxy, c.proxy_mean)):
        low, high = ax.get_ylim()
        assert (mean.max() - mean.min()) / (high - low) > 0.5  # the curve fills its panel
    assert np.median(band_heights_px(ax_true)) >= 3
    assert band_heights_px(ax_proxy).max() >= 3


def test_curve_chart_marks_the_extrapolated_fit(history):
    record = next(r for r in history if r.goodhart is not None)
    kl = float(record.curve.kl.max()) * 1.3  # past the largest n (32), within 4 x 32: drawn, hollow
    extrapolated = with_goodhart(record, kl=kl, n=float(kl_to_n(kl)), within_range=False)
    assert extrapolated.goodhart_status() == "extrapolated"
    fig = charts.curve_chart(extrapolated)
    texts = legend_texts(fig)
    assert "fit, extrapolated" in texts and "Goodhart point (extrapolated)" in texts
    ax_true = fig.axes[0]
    assert ax_true.get_xlim()[1] >= extrapolated.goodhart.kl  # the star is on the chart


@pytest.mark.parametrize("n_star, kl_star", [(7e235, 543.0), (math.inf, 800.0)])
def test_charts_survive_an_absurd_goodhart_point(history, n_star, kl_star):
    """A fit whose peak is astronomically far: no crash, not plotted, said in words."""
    absurd = [with_goodhart(r, n=n_star, kl=kl_star, within_range=False) if r.goodhart else r for r in history]
    assert any(r.goodhart_status() == "beyond" for r in absurd)
    last = next(r for r in reversed(absurd) if r.goodhart_status() == "beyond")
    fig = charts.curve_chart(last)
    assert_legible(fig)
    assert fig.axes[0].get_xlim()[1] < 10  # the axis was not stretched to the fitted KL
    assert any("beyond the measured range" in t.get_text() for t in fig.axes[0].texts)
    for fig in (
        charts.trend_chart(absurd),
        charts.runs_trend_chart({"a": absurd, "b": history}),
        charts.compare_chart({"a": last, "b": history[-1]}),
    ):
        assert_legible(fig)
    fig = charts.trend_chart(absurd)
    assert "beyond the measured range" in legend_texts(fig) or any("beyond" in t.get_text() for t in fig.axes[2].texts)
    assert fig.axes[2].get_ylim()[1] < 1e6


@pytest.mark.parametrize("sqrt_kl", [False, True])
def test_overlay_chart(history, sqrt_kl):
    fig = charts.overlay_chart(history, sqrt_kl=sqrt_kl, true_name="gold")
    assert_legible(fig)
    assert fig.axes[0].get_ylabel() == "gold (true)" and fig.axes[1].get_ylabel() == "proxy reward"
    assert any(ax.get_label() == "<colorbar>" and "training step" in ax.get_ylabel() for ax in fig.axes)


def test_trend_chart(history):
    fig = charts.trend_chart(history)
    assert_legible(fig)
    ax_true, ax_proxy, ax_n = fig.axes[:3]
    assert ax_n.get_xlabel() == "training step" and "n*" in ax_n.get_ylabel()
    assert "true reward" in ax_true.get_ylabel() and "proxy reward" in ax_proxy.get_ylabel()
    labels = [t.get_text() for t in ax_true.get_legend().get_texts()]
    assert labels == ["n = 1", "n = 8", "n = 32"]
    colours = {line.get_color() for line in ax_true.lines if line.get_label().startswith("n = ")}
    assert len(colours) == 3  # one hue per n, not shades of one
    assert len(band_heights_px(ax_true)) == 3 and len(band_heights_px(ax_proxy)) == 3


def test_goodhart_axis_reads_in_plain_numbers(history):
    """n* between 9 and 20: tick labels such as 10, 12, 15, never 2×10¹ or 9×10⁰."""
    narrow = [with_goodhart(r, n=9.0 + 2 * i, within_range=True) if r.goodhart else r for i, r in enumerate(history)]
    fig = charts.trend_chart(narrow)
    fig.canvas.draw()
    ax_n = fig.axes[2]
    labels = [t.get_text() for t in ax_n.get_yticklabels() if t.get_text()]
    assert labels and all(label.replace(",", "").replace(".", "").isdigit() for label in labels), labels
    wide = [with_goodhart(r, n=3.0 * 10**i, within_range=True) if r.goodhart else r for i, r in enumerate(history)]
    fig = charts.trend_chart(wide)
    fig.canvas.draw()
    labels = [t.get_text() for t in fig.axes[2].get_yticklabels() if t.get_text()]
    assert fig.axes[2].get_yscale() == "log"
    assert labels and all(label.replace(",", "").isdigit() for label in labels), labels


def test_rl_chart(history):
    fig = charts.rl_chart(history)
    assert_legible(fig)
    ax = fig.axes[0]
    assert any("RL fit" in t for t in legend_texts(fig))
    assert ax.get_xlabel().startswith("KL(") and "√" not in ax.get_xlabel() + ax.get_title()
    steps = {t.get_text() for t in ax.texts}
    assert {str(r.step) for r in history if r.policy is not None} <= steps


def test_compare_chart(history, rng):
    other = [record_at(r.step, rng.normal(size=(40, 32)) * 2, rng.normal(size=(40, 32))) for r in history]
    fig = charts.compare_chart({"run A": history[-1], "run B": other[-1]}, proxy_name="RM")
    assert_legible(fig)
    texts = legend_texts(fig)
    assert texts[0].startswith("run A (step 300)") and "run B (step 300)" in texts
    ax_true, ax_proxy = fig.axes[:2]
    assert "nats" in ax_proxy.get_xlabel() and "true reward" in ax_true.get_ylabel() and "2 runs" in fig.get_suptitle()
    assert "RM (proxy)" in ax_proxy.get_ylabel()


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
    top, middle, bottom = fig.axes[:3]
    assert "n=16" in top.get_ylabel() and "gold" in top.get_ylabel() and "proxy" in middle.get_ylabel()
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


def test_compact_chart_shows_the_true_reward_with_n_star_and_its_interval_on_top(rng, tmp_path):
    from PIL import Image

    from bon_tracker import BonTracker

    with BonTracker("local", root=tmp_path, charts=False) as tracker:  # the tracker fits the interval
        for i, step in enumerate((0, 100)):
            true = rng.normal(size=(128, 32))
            tracker.log_scores(step, true + (1.0 + i) * rng.standard_t(df=2, size=true.shape), true)
    record = tracker.history[-1]
    g, i = record.goodhart, record.interval
    assert record.goodhart_status() == "measured" and i is not None
    fig = charts.compact_chart(record)
    assert_legible(fig)
    ax, ax_proxy = fig.axes
    assert ax.get_legend() is None and ax.get_xscale() == "log"
    # the proxy reward on its own axis, below
    assert ax_proxy.lines[0].get_ydata().tolist() == record.curve.proxy_mean.tolist()
    line = ax.lines[0]  # the true reward against n, nothing else on the y axis
    assert line.get_xdata().tolist() == record.curve.n.tolist()
    assert line.get_ydata().tolist() == record.curve.true_mean.tolist() and line.get_linewidth() >= 3
    (star,) = [ln for ln in ax.lines if ln.get_marker() == "*"]
    base = float(record.curve.true_mean[0])
    assert star.get_xdata()[0] == pytest.approx(g.n) and star.get_ydata()[0] == pytest.approx(base + g.peak_gain)
    (band,) = [p for p in ax.patches if p.get_width() > 0]  # n*'s interval on the n axis
    assert (band.get_x(), band.get_x() + band.get_width()) == pytest.approx((i.n_low, i.n_high))
    title = ax.get_title(loc="left")
    assert title.startswith(f"step {record.step}: n* ≈ {charts._plain(g.n)} (") and "–" in title
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    with Image.open(buffer) as png:  # square, as MLflow's card box is
        assert png.size[0] >= 600 and png.size[0] == png.size[1]
    # the title, the true reward and its n axis above the part of the image MLflow's card cuts off
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    assert 1 - ax.get_tightbbox(renderer).y0 / fig.bbox.height <= charts.COMPACT_TRUE_FRACTION


def test_compact_chart_counts_active_alerts_and_says_beyond(history):
    record = dataclasses.replace(history[-1], alert_states={"bon_true_falls": 1, "goodhart_kl": 1, "x": 0})
    far = with_goodhart(record, n=4.3e7, kl=17.0, within_range=False)
    fig = charts.compact_chart(far)
    ax, _ = fig.axes
    assert [t.get_text() for t in ax.texts] == ["2 alerts"]
    assert fig.get_supxlabel() == "active alerts: bon_true_falls, goodhart_kl"
    assert ax.get_title(loc="left") == f"step {far.step}: n* beyond {charts._plain(far.horizon_n)}"
    assert not [ln for ln in ax.lines if ln.get_marker() == "*"]  # never drawn at 4.3e7
