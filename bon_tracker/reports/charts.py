"""Charts that a reader takes in at a glance (matplotlib, rendered off-screen).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so no
global state or display is touched; backends save it as PNG (local, MLflow) or
log it as an image. matplotlib is an optional dependency: ``pip install 'bon-tracker[charts]'``.

Conventions shared by every chart:

* x is KL(best-of-n ‖ base) in nats (``sqrt_kl=True`` gives Gao et al.'s d = √KL);
* true and proxy reward each get their own panel (their scales differ by an order of
  magnitude in practice), stacked on a shared KL axis, the true reward on top;
* bands are ±1 standard error over prompts;
* the fitted curve is drawn dashed over the measured KL range and dotted where it is
  extrapolated, on a grey background past the largest n measured;
* the Goodhart point (the fitted peak of true reward) is a star labelled with its n and
  KL: filled within the measured range, hollow when extrapolated, and not drawn at all
  when it lies far beyond (:meth:`EvalRecord.goodhart_status` ``"beyond"``): a note
  says so instead; its 95 % interval from resampling prompts is a green band on the KL
  axis (and a vertical bar on n* over training);
* predicted values (the fitted law beyond the measured n, :attr:`EvalRecord.predictions`)
  are hollow markers on a dotted line with their interval, "predicted" in the legend;
* top-q rank agreement of proxy and true is its own panel over training, ±1 SE.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bon_tracker.core import fit_rl_overoptimization
from bon_tracker.core.fit import GOODHART_HORIZON
from bon_tracker.optional import require
from bon_tracker.record import evenly_spaced

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from bon_tracker.record import EvalRecord

TRUE_COLOR = "#1f77b4"
PROXY_COLOR = "#d62728"
GOODHART_COLOR = "#2ca02c"
RL_COLOR = "#9467bd"
BAND_ALPHA = 0.28
EXTRAPOLATED_SHADE = "#f0f0f0"
MAX_STEP_LABELS = 12  # the RL chart labels at most this many of its points with their step

# One colour per n in the trend chart, and per run in comparisons: distinct hues, never shades.
RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _figure(width: float = 7.5, height: float = 4.8) -> Figure:
    require("matplotlib", "charts")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _x(kl: np.ndarray, sqrt_kl: bool) -> np.ndarray:
    kl = np.asarray(kl, dtype=np.float64)
    return np.sqrt(np.clip(kl, 0.0, None)) if sqrt_kl else kl


def _kl_label(sqrt_kl: bool, of: str = "best-of-n") -> str:
    return f"√KL({of} ‖ base)  [√nats]" if sqrt_kl else f"KL({of} ‖ base)  [nats]"


def _placeholder(ax: Axes, text: str) -> None:
    """A grey note in the middle of an empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")


def _note(ax: Axes, text: str) -> None:
    """A small boxed note in the lower right corner of a panel (wrapped to fit it)."""
    import textwrap

    ax.text(
        0.99,
        0.03,
        textwrap.fill(text, 80),
        ha="right",
        va="bottom",
        transform=ax.transAxes,
        fontsize=7.5,
        color="#444",
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#bbb", "alpha": 0.9},
    )


def _plain(value: float) -> str:
    """A tick label in plain numbers: 8, 20, 150, 2,000, 0.5 — never 2×10¹."""
    if not math.isfinite(value):
        return ""
    if abs(value) >= 1:
        return f"{value:,.0f}" if abs(value - round(value)) < 1e-9 * max(1.0, abs(value)) else f"{value:,.1f}"
    return f"{value:.2g}"


def _reward_labels(proxy_name: str | None, true_name: str | None) -> tuple[str, str]:
    """Labels of the (proxy, true) reward: the user's names, if any, with their role."""
    proxy = "proxy reward" if proxy_name in (None, "proxy") else f"{proxy_name} (proxy)"
    true = "true reward" if true_name in (None, "true") else f"{true_name} (true)"
    return proxy, true


def _names(records: Sequence[EvalRecord], proxy_name: str | None, true_name: str | None) -> tuple[str, str]:
    last = records[-1] if records else None
    return _reward_labels(
        proxy_name or (last.proxy_name if last else None), true_name or (last.true_name if last else None)
    )


def _reward_axes(fig: Figure, rows: int = 2, height_ratios: Sequence[float] | None = None) -> list[Axes]:
    axes = fig.subplots(rows, 1, sharex=True, height_ratios=height_ratios)
    return list(np.atleast_1d(axes))


def _side_legend(ax: Axes, **options: Any) -> None:
    """The legend right of the panel, outside the data: it can never cover a point, a band or
    an interval (a legend placed "best" inside covered the predicted points' intervals)."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **options)


def _band(ax: Axes, x: np.ndarray, mean: np.ndarray, se: np.ndarray, color: str, label: str, **line: Any) -> None:
    """A mean line with markers and its ±1 SE band (edged, so that a narrow band still shows)."""
    ax.plot(x, mean, line.pop("fmt", "o-"), color=color, label=label, markersize=line.pop("markersize", 4), **line)
    finite = np.isfinite(se)
    if finite.any():
        lo, hi = np.where(finite, mean - se, mean), np.where(finite, mean + se, mean)
        ax.fill_between(x, lo, hi, color=color, alpha=BAND_ALPHA, linewidth=0)
        for edge in (lo, hi):
            ax.plot(x, edge, "-", color=color, linewidth=0.6, alpha=0.6)


def _n_ticks(ax: Axes, x: np.ndarray, ns: Sequence[int]) -> None:
    """n on a top axis at its KL; labels thinned where they would overlap."""
    top = ax.secondary_xaxis("top")
    span = float(np.nanmax(x) - np.nanmin(x)) if len(x) > 1 else 1.0
    ticks, labels, last = [], [], -math.inf
    for xi, n in sorted(zip(x.tolist(), [int(v) for v in ns])):
        if xi - last >= 0.035 * span or not ticks:
            ticks.append(xi)
            labels.append(str(n))
            last = xi
    top.set_xticks(ticks, labels, fontsize=7)
    top.set_xlabel("n (samples per best-of-n draw)", fontsize=8)


def _base_true(record: EvalRecord) -> float | None:
    ns = record.curve.n.tolist()
    return float(record.curve.true_mean[ns.index(1)]) if 1 in ns else None


FALLS_TEXT = "n* = 1: any selection on this proxy already lowers the true reward"
NOT_RESOLVED = "not resolved"


def n_text(n: float, horizon: float) -> str:
    """An n* (or a bound of its interval) in words: a plain number, or "beyond n = <horizon>"
    past the horizon (never "∞", never 4.3e+07).

    >>> n_text(17.53, 128), n_text(4.3e7, 128), n_text(math.inf, 128)
    ('17.5', 'beyond n = 128', 'beyond n = 128')
    """
    if not n <= horizon:  # also inf and NaN
        return f"beyond n = {_plain(horizon)}"
    return _plain(n) if n >= 1 else f"{n:.3g}"


def interval_text(record: EvalRecord) -> str:
    """The 95 % interval of n* (resampling prompts) in words; "" without an interval.

    >>> from bon_tracker.core import bon_curve
    >>> from bon_tracker.record import EvalRecord
    >>> interval_text(EvalRecord.build(0, bon_curve(np.eye(4), np.eye(4))))
    ''
    """
    i = record.interval
    if i is None:
        return ""
    horizon = record.horizon_n
    low, high = n_text(i.n_low, horizon), n_text(i.n_high, horizon)
    span = f"n* {low}" if low == high else f"n* from {low} to {high}"
    kl = f"KL* {i.kl_low:.3g} to {i.kl_high:.3g} nats" if math.isfinite(i.kl_high) else f"KL* from {i.kl_low:.3g} nats"
    return f"{100 * i.level:g} % interval from resampling {i.n_prompts} prompts: {span} ({kl})"


def goodhart_text(record: EvalRecord) -> str:
    """One line on the record's Goodhart point, with its interval when known, as the CLI,
    charts and reports word it. ``n* = 1`` when the fitted true reward falls from the start
    (:data:`FALLS_TEXT`); "beyond n = <horizon>" past ``GOODHART_HORIZON`` times the largest
    n; "not resolved" when the interval spans the measured range
    (:meth:`EvalRecord.goodhart_resolved`)."""
    g, status = record.goodhart, record.goodhart_status()
    interval = interval_text(record)
    resolved = record.goodhart_resolved()
    if int(record.curve.n.max()) <= 1:
        return "N = 1 sample per prompt: no curve beyond n = 1, so no Goodhart point (sample more completions)"
    if g is None or status == "none":
        return "no Goodhart point: the fitted true reward still rises with n" + (f" ({interval})" if interval else "")
    if g.falls_from_start:
        text = f"{FALLS_TEXT} (the fitted true reward falls from n = 1 to n = {int(record.curve.n.max())})"
        if interval:
            text += f"; {interval}" + (f": {NOT_RESOLVED}" if resolved is False else "")
        return text
    if status == "beyond":
        return (
            f"Goodhart point beyond the measured range (beyond n = {_plain(record.horizon_n)}, "
            f"{GOODHART_HORIZON} × the largest n measured): the fitted true reward still rises over the measured n; "
            "not drawn"
        )
    point = f"n* ≈ {_plain(g.n)}, KL* = {g.kl:.2f} nats"
    if resolved is False:
        return f"Goodhart point {point}: {NOT_RESOLVED} ({interval}, spanning the measured range)"
    where = (
        "within the measured range" if status == "measured" else f"extrapolated past n = {int(record.curve.n.max())}"
    )
    return f"Goodhart point {point} ({where})" + (f"; {interval}" if interval else "")


# ---- one eval step -------------------------------------------------------------------------------


def curve_chart(
    record: EvalRecord,
    *,
    sqrt_kl: bool = False,
    title: str | None = None,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """True (top) and proxy (bottom) reward of best-of-n against KL for one eval step.

    Each panel has its own y scale and ±1 SE bands. The top panel carries the fitted
    Gao et al. curve (dashed where measured, dotted where extrapolated), the Goodhart
    point labelled with its n and KL, and n on its top axis. ``proxy_name`` /
    ``true_name`` label the rewards (default: the record's own names).
    """
    c = record.curve
    fig = _figure(9.6, 6.2)  # the legends beside the panels, never over the data
    ax_true, ax_proxy = _reward_axes(fig, 2, (1.35, 1))
    proxy_label, true_label = _names([record], proxy_name, true_name)
    x = _x(c.kl, sqrt_kl)
    max_kl = float(np.nanmax(c.kl))
    _band(ax_true, x, c.true_mean, c.true_se, TRUE_COLOR, f"{true_label} (±1 SE)")
    _band(ax_proxy, x, c.proxy_mean, c.proxy_se, PROXY_COLOR, f"{proxy_label} (±1 SE)")

    g, status, base = record.goodhart, record.goodhart_status(), _base_true(record)
    if g is not None and base is not None and status in ("measured", "extrapolated"):
        end_kl = max_kl if status == "measured" else g.kl * 1.08
        d_measured = np.linspace(0.0, math.sqrt(max_kl), 120)
        ax_true.plot(
            _x(d_measured**2, sqrt_kl),
            base + d_measured * (g.true_alpha - g.true_beta * d_measured),
            "--",
            color="#0b3d66",
            linewidth=1.4,
            label=f"fit d(α−βd), R² = {g.true_r2:.2f}",
        )
        if end_kl > max_kl:
            d_extra = np.linspace(math.sqrt(max_kl), math.sqrt(end_kl), 60)
            ax_true.plot(
                _x(d_extra**2, sqrt_kl),
                base + d_extra * (g.true_alpha - g.true_beta * d_extra),
                ":",
                color="#0b3d66",
                linewidth=1.6,
                label="fit, extrapolated",
            )
            for ax in (ax_true, ax_proxy):
                ax.axvspan(
                    _x(np.array([max_kl]), sqrt_kl)[0],
                    _x(np.array([end_kl]), sqrt_kl)[0],
                    color=EXTRAPOLATED_SHADE,
                    zorder=0,
                )
        peak_x, peak_y = _x(np.array([g.kl]), sqrt_kl)[0], base + g.peak_gain
        ax_true.axvline(peak_x, color=GOODHART_COLOR, linestyle=":", linewidth=1.2)
        ax_proxy.axvline(peak_x, color=GOODHART_COLOR, linestyle=":", linewidth=1.2)
        ax_true.plot(
            [peak_x],
            [peak_y],
            "*",
            color=GOODHART_COLOR,
            markersize=15,
            markerfacecolor=GOODHART_COLOR if status == "measured" else "white",
            markeredgewidth=1.5,
            label="Goodhart point" + ("" if status == "measured" else " (extrapolated)"),
            zorder=5,
        )
        if g.falls_from_start or record.goodhart_resolved() is False:
            _note(ax_true, goodhart_text(record))
        if g.falls_from_start:
            label = "n* = 1: any selection on this proxy\nalready lowers the true reward"
        else:
            label = f"n* ≈ {_plain(g.n)}\nKL* = {g.kl:.2f} nats"
            if record.goodhart_resolved() is False:
                label += f"\n({NOT_RESOLVED})"
        ax_true.annotate(
            label,
            (peak_x, peak_y),
            xytext=(9, -6),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            color="#1b5e20",
            fontweight="bold",
        )
    else:
        _note(ax_true, goodhart_text(record))
    _interval_band((ax_true, ax_proxy), record, sqrt_kl, max_kl)
    _predicted_points(ax_true, ax_proxy, record, sqrt_kl, max_kl)

    ax_true.set_ylabel(f"{true_label}\nof best-of-n")
    ax_proxy.set_ylabel(f"{proxy_label}\nof best-of-n")
    ax_proxy.set_xlabel(_kl_label(sqrt_kl))
    for ax in (ax_true, ax_proxy):
        ax.grid(alpha=0.3)
        _side_legend(ax, fontsize=7.5)
    predicted = [r for r in record.prediction_rows() if r["kl"] <= PREDICTED_KL_LIMIT * max_kl]
    _n_ticks(
        ax_true,
        np.concatenate([x, _x(np.array([r["kl"] for r in predicted], dtype=float), sqrt_kl)]),
        c.n.tolist() + [int(r["n"]) for r in predicted],
    )
    ties = "; proxy has ties: exact KL" if c.has_ties else ""
    fig.suptitle(
        title or f"Best-of-n at step {record.step}  ({int(c.n_prompts.max())} prompts, N = {c.N}{ties})", fontsize=11
    )
    return fig


COMPACT_SIZE = (6.4, 6.4)  # inches at COMPACT_DPI: square, the true reward in its top part
COMPACT_DPI = 100
COMPACT_FONT = 22  # points: text still ~8 px tall in MLflow's 256-px card
# MLflow's card centres the image in a square box that its scroll area cuts off below (the
# run's params take the top), so at first sight only the image's top ~55-70 % shows: the true
# reward, its n axis and the title lie above this fraction of the height; the proxy reward and
# the alerts come below, for the full-size view.
COMPACT_TRUE_FRACTION = 0.5


def compact_chart(record: EvalRecord, *, true_name: str | None = None, proxy_name: str | None = None) -> Figure:
    """The chart for the size a tracking UI first shows an image at (MLflow's 256-px card,
    TensorBoard's ~400-px card, trackio's 182-px thumbnail): on top, the true reward of
    best-of-n against n, a thick line with its ±1 SE band, the Goodhart star and n*'s
    interval, a few large labels and no legend box, above :data:`COMPACT_TRUE_FRACTION` of
    the height (what MLflow's card shows first); below it, the proxy reward against n on its
    own axis, and the alerts active at this step. The full two-panel :func:`curve_chart`
    (against KL, with the fit and the predictions) is the artifact and full-size image
    beside it.

    The title says the step and n* with its interval (or why there is none); a red label in
    the n axis' row says how many alerts are active.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    c = record.curve
    fig = _figure(*COMPACT_SIZE)
    fig.set_dpi(COMPACT_DPI)
    ax, ax_proxy = fig.subplots(2, 1, height_ratios=(1.0, 1.2))
    n = c.n.astype(float)
    proxy_label, true_label = _names([record], proxy_name, true_name)
    for axis, mean, se, color, label in (
        (ax, c.true_mean, c.true_se, TRUE_COLOR, true_label),
        (ax_proxy, c.proxy_mean, c.proxy_se, PROXY_COLOR, proxy_label),
    ):
        axis.fill_between(n, mean - se, mean + se, color=color, alpha=0.3, linewidth=0)
        axis.plot(n, mean, "-o", color=color, linewidth=4 if axis is ax else 2.5, markersize=7 if axis is ax else 4)
        axis.set_xscale("log", base=2)
        ticks = evenly_spaced(sorted({int(v) for v in c.n.tolist()}), 5)
        axis.xaxis.set_major_locator(FixedLocator(ticks))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
        axis.yaxis.set_major_locator(MaxNLocator(3 if axis is ax_proxy else 4))
        axis.grid(alpha=0.35)
        axis.set_ylabel(label, fontsize=COMPACT_FONT - 5 if axis is ax else COMPACT_FONT - 8)
    ax.tick_params(labelsize=COMPACT_FONT - 4)
    ax_proxy.tick_params(labelsize=COMPACT_FONT - 9)
    ax.set_xlabel("n (best of n)", fontsize=COMPACT_FONT - 6, labelpad=1)
    g, status, base = record.goodhart, record.goodhart_status(), _base_true(record)
    i = record.interval
    if g is not None and status in ("measured", "extrapolated") and base is not None:
        if i is not None and math.isfinite(i.n_low):
            high = min(i.n_high, record.horizon_n) if math.isfinite(i.n_high) else record.horizon_n
            for axis in (ax, ax_proxy):
                axis.axvspan(max(i.n_low, 1.0), max(high, i.n_low), color=GOODHART_COLOR, alpha=0.18, linewidth=0)
        ax.plot(
            [max(g.n, 1.0)],
            [base + g.peak_gain],
            "*",
            color=GOODHART_COLOR,
            markersize=26,
            markerfacecolor=GOODHART_COLOR if status == "measured" else "white",
            markeredgewidth=2.5,
            zorder=5,
        )
    ax_proxy.set_xlim(ax.get_xlim())
    ax.set_title(f"step {record.step}: {_compact_headline(record)}", fontsize=COMPACT_FONT, loc="left")
    active = sorted(rule for rule, state in (record.alert_states or {}).items() if state)
    if active:  # how many, in the n axis' row; which ones in the text below and in the run's summary
        label = f"{len(active)} alert{'s' if len(active) > 1 else ''}"
        ax.text(1.0, -0.13, label, transform=ax.transAxes, ha="right", va="top", fontsize=COMPACT_FONT - 4)
        ax.texts[-1].set(color=PROXY_COLOR, fontweight="bold")
    import textwrap

    note = textwrap.fill(f"active alerts: {', '.join(active)}", 48) if active else "no alert active"
    # a figure-level label: the constrained layout keeps room for it below the proxy panel
    fig.supxlabel(note, x=0.02, ha="left", fontsize=COMPACT_FONT - 8, color=PROXY_COLOR if active else "#555")
    return fig


def _compact_headline(record: EvalRecord) -> str:
    """The few words of the compact chart's title: n* and its interval, or why there is none."""
    g, status = record.goodhart, record.goodhart_status()
    if int(record.curve.n.max()) <= 1:
        return "N = 1, no curve"
    if g is None or status == "none":
        return "still rising (no n*)"
    if status == "beyond":
        return f"n* beyond {_plain(record.horizon_n)}"
    if g.falls_from_start:
        return "falls from n = 1 (n* = 1)"
    i, horizon = record.interval, record.horizon_n
    text = f"n* ≈ {_plain(g.n)}"
    if i is not None and math.isfinite(i.n_low):
        high = _plain(i.n_high) if i.n_high <= horizon else f">{_plain(horizon)}"  # also inf
        text += f" ({_plain(max(i.n_low, 1.0))}–{high})"
    return text


PREDICTED_KL_LIMIT = 1.6  # predicted points are drawn up to this many times the largest measured KL


def _interval_band(axes: Sequence[Axes], record: EvalRecord, sqrt_kl: bool, max_kl: float) -> None:
    """KL*'s interval as a green band, clipped to what is drawn; nothing when it is degenerate."""
    i = record.interval
    if i is None or record.goodhart_status() not in ("measured", "extrapolated"):
        return
    low, high = i.kl_low, min(i.kl_high, PREDICTED_KL_LIMIT * max_kl)
    if not (math.isfinite(low) and high > low):
        return
    x0, x1 = _x(np.array([low, high]), sqrt_kl)
    open_end = "" if math.isfinite(i.kl_high) and i.kl_high <= high else ", open-ended"
    for k, ax in enumerate(axes):
        ax.axvspan(
            x0,
            x1,
            color=GOODHART_COLOR,
            alpha=0.12,
            linewidth=0,
            zorder=0,
            label=f"KL* {100 * i.level:g} % interval{open_end}" if k == 0 else None,
        )


def _predicted_points(ax_true: Axes, ax_proxy: Axes, record: EvalRecord, sqrt_kl: bool, max_kl: float) -> None:
    """The fitted law beyond the measured n: hollow markers, dotted, with interval bars."""
    rows = [r for r in record.prediction_rows() if r["kl"] <= PREDICTED_KL_LIMIT * max_kl]
    if not rows:
        return
    x = _x(np.array([r["kl"] for r in rows]), sqrt_kl)
    for ax, key, color in ((ax_true, "true_mean", TRUE_COLOR), (ax_proxy, "proxy_mean", PROXY_COLOR)):
        mean = np.array([r[key] for r in rows])
        err = np.abs(np.array([[r[key] - r[f"{key}_low"] for r in rows], [r[f"{key}_high"] - r[key] for r in rows]]))
        ax.errorbar(
            x,
            mean,
            yerr=err,
            fmt="o:",
            color=color,
            markerfacecolor="white",
            markersize=5,
            capsize=3,
            linewidth=1.2,
            label=f"predicted at n = {', '.join(str(r['n']) for r in rows)}\n(fit, 95 % interval)",
        )


def overlay_chart(
    records: Sequence[EvalRecord],
    *,
    sqrt_kl: bool = False,
    max_curves: int = 20,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """Best-of-n curves of every eval step, coloured by training step: true reward on
    top, proxy below, on a shared KL axis; at most ``max_curves`` steps, evenly spaced."""
    import matplotlib as mpl

    shown = evenly_spaced(list(records), max_curves)
    fig = _figure(7.5, 6.0)
    ax_true, ax_proxy = _reward_axes(fig, 2)
    steps = [r.step for r in shown]
    norm = mpl.colors.Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    cmap = mpl.colormaps["viridis"]
    for r in shown:
        x = _x(r.curve.kl, sqrt_kl)
        ax_true.plot(x, r.curve.true_mean, "o-", color=cmap(norm(r.step)), linewidth=1.5, markersize=2.5)
        ax_proxy.plot(x, r.curve.proxy_mean, "o-", color=cmap(norm(r.step)), linewidth=1.2, markersize=2.5)
    proxy_label, true_label = _names(records, proxy_name, true_name)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=[ax_true, ax_proxy], label="training step")
    ax_true.set_ylabel(true_label)
    ax_proxy.set_ylabel(proxy_label)
    ax_proxy.set_xlabel(_kl_label(sqrt_kl))
    ax_true.set_title(f"Best-of-n curves over training ({len(shown)} of {len(records)} eval steps)")
    for ax in (ax_true, ax_proxy):
        ax.grid(alpha=0.3)
    return fig


# ---- over training -------------------------------------------------------------------------------


def _at_n(record: EvalRecord, n: int, field: str) -> float:
    ns = record.curve.n.tolist()
    return float(getattr(record.curve, field)[ns.index(n)]) if n in ns else math.nan


def _goodhart_panel(ax: Axes, series: Sequence[tuple[str | None, str, Sequence[EvalRecord]]]) -> None:
    """n* against training step for one or several runs: filled stars within the measured
    range, hollow when extrapolated; a fit far beyond (``"beyond"``) is a triangle on the
    top edge. Plain-number ticks: log scale only when n* spans a factor of 10 or more."""
    drawn: list[float] = []
    beyond_steps: list[tuple[str, list[int]]] = []
    for _, color, records in series:
        steps = np.array([r.step for r in records])
        status = [r.goodhart_status() for r in records]
        gn = np.array([r.goodhart.n if s in ("measured", "extrapolated") else np.nan for r, s in zip(records, status)])
        measured = np.array([s == "measured" for s in status])
        extrapolated = np.array([s == "extrapolated" for s in status])
        if np.isfinite(gn).any():
            ax.plot(steps, gn, "-", color=color, linewidth=1.0, alpha=0.8)
            ax.plot(steps[measured], gn[measured], "*", color=color, markersize=9)
            ax.plot(steps[extrapolated], gn[extrapolated], "*", color=color, markersize=9, markerfacecolor="white")
            drawn.extend(gn[np.isfinite(gn)].tolist())
        beyond = [int(s) for s, st in zip(steps, status) if st == "beyond"]
        if beyond:
            beyond_steps.append((color, beyond))
    if not drawn and not beyond_steps:
        _placeholder(ax, "no Goodhart point fitted (true reward still rises with n)")
        return
    if drawn:
        low, high = min(drawn), max(drawn)
        if high / max(low, 1e-12) >= 10:
            from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
        else:
            from matplotlib.ticker import FuncFormatter, MaxNLocator

            ax.yaxis.set_major_locator(MaxNLocator(5))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
            pad = max(0.15 * (high - low), 0.5)
            ax.set_ylim(max(0.0, low - pad), high + pad)
    if not drawn:
        ax.set_yticks([])
        _placeholder(ax, "Goodhart point beyond the measured range at every step (▲)")
    for color, steps in beyond_steps:
        # axis-fraction y: on the top edge whatever the scale, never a number far off the chart
        ax.plot(steps, [0.96] * len(steps), "^", color=color, markersize=7, transform=ax.get_xaxis_transform())
    legend = []
    from matplotlib.lines import Line2D

    if drawn:
        legend.append(Line2D([], [], marker="*", linestyle="", color="grey", markersize=9, label="within measured n"))
        legend.append(
            Line2D(
                [],
                [],
                marker="*",
                linestyle="",
                color="grey",
                markerfacecolor="white",
                markersize=9,
                label="extrapolated",
            )
        )
    if beyond_steps:
        legend.append(
            Line2D([], [], marker="^", linestyle="", color="grey", markersize=7, label="beyond the measured range")
        )
    _side_legend(ax, handles=legend, fontsize=7)


def trend_chart(
    records: Sequence[EvalRecord],
    ns: Sequence[int] | None = None,
    *,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """Over training: true reward at a few n (top), proxy reward at the same n (middle),
    each with ±1 SE bands and one colour per n, and the Goodhart point's n* (bottom)."""
    records = sorted(records, key=lambda r: r.step)
    proxy_label, true_label = _names(records, proxy_name, true_name)
    agreement = any(r.agreement is not None for r in records)
    fig = _figure(9.2, 9.0 if agreement else 7.2)
    if agreement:
        ax_true, ax_proxy, ax_n, ax_agree = _reward_axes(fig, 4, (1.3, 1.0, 0.8, 0.8))
    else:
        ax_true, ax_proxy, ax_n = _reward_axes(fig, 3, (1.3, 1.0, 0.8))
    steps = np.array([r.step for r in records])
    grid = records[-1].curve.n.tolist()
    ns = list(ns) if ns is not None else sorted({1, grid[len(grid) // 2], grid[-1]})
    for i, n in enumerate(ns):
        color = RUN_COLORS[i % len(RUN_COLORS)]
        for ax, field in ((ax_true, "true"), (ax_proxy, "proxy")):
            mean = np.array([_at_n(r, n, f"{field}_mean") for r in records])
            se = np.array([_at_n(r, n, f"{field}_se") for r in records])
            _band(ax, steps, mean, se, color, f"n = {n}", markersize=3)
    ax_true.set_ylabel(f"{true_label}\n(±1 SE)")
    ax_proxy.set_ylabel(f"{proxy_label}\n(±1 SE)")
    ax_true.set_title("Best-of-n reward over training")
    _side_legend(ax_true, fontsize=7, title="best-of-n", title_fontsize=7)
    _goodhart_panel(ax_n, [(None, GOODHART_COLOR, records)])
    _n_interval_bars(ax_n, records)
    _alert_marks((ax_true, ax_proxy, ax_n), records)
    ax_n.set_ylabel("Goodhart point n*")
    axes = [ax_true, ax_proxy, ax_n]
    if agreement:
        agreement_panel(ax_agree, records)
        axes.append(ax_agree)
    axes[-1].set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig


def _n_interval_bars(ax: Axes, records: Sequence[EvalRecord], color: str = GOODHART_COLOR, offset: float = 0.0) -> None:
    """n*'s interval at each step where the point is drawn; an open end reaches the top edge.
    ``offset`` (in steps) moves one run's bars aside when several runs share the panel."""
    drawn = [
        (r, r.interval)
        for r in records
        if r.interval is not None and r.goodhart_status() in ("measured", "extrapolated")
    ]
    if not drawn:
        return
    top = ax.get_ylim()[1]
    highs = [i.n_high for _, i in drawn if math.isfinite(i.n_high)]
    if highs and ax.get_yscale() == "linear" and max(highs) <= 3 * top:
        top = max(top, 1.05 * max(highs))  # the bars fit, unless one is far off the scale
    for r, i in drawn:
        high = i.n_high if math.isfinite(i.n_high) and i.n_high <= top else top
        x = r.step + offset
        ax.plot([x, x], [max(i.n_low, 1.0), high], "-", color=color, alpha=0.45, linewidth=3)
    ax.set_ylim(top=top)


def _alert_marks(axes: Sequence[Axes], records: Sequence[EvalRecord]) -> None:
    """A red dashed line at each alert onset (the report says what each one means)."""
    steps = sorted({a.step for r in records for a in r.onsets})
    for k, step in enumerate(steps):
        for j, ax in enumerate(axes):
            ax.axvline(
                step,
                color=PROXY_COLOR,
                linestyle="--",
                linewidth=0.9,
                alpha=0.7,
                label="alert onset" if k == 0 and j == 0 else None,
            )
    if steps:
        _side_legend(axes[0], fontsize=7, title="best-of-n", title_fontsize=7)


def agreement_panel(ax: Axes, records: Sequence[EvalRecord]) -> None:
    """Top-q rank agreement (Spearman) of proxy and true over training: one line per q, ±1 SE."""
    with_data = [r for r in records if r.agreement is not None]
    if not with_data:
        _placeholder(ax, "no rank agreement (ragged input: prompts with different N)")
        return
    qs = sorted({q for r in with_data for q in r.agreement.q}, reverse=True)
    for i, q in enumerate(qs):
        points = [
            (r.step, r.agreement.mean[r.agreement.q.index(q)], r.agreement.se[r.agreement.q.index(q)])
            for r in with_data
            if q in r.agreement.q
        ]
        steps, mean, se = (np.array(v, dtype=float) for v in zip(*points))
        label = "all samples" if q == 1 else f"top {_fraction(q)}"
        _band(ax, steps, mean, se, RUN_COLORS[i % len(RUN_COLORS)], label, markersize=3)
    ax.set_ylabel("rank agreement\n(Spearman, ±1 SE)")
    _side_legend(ax, fontsize=7, title="by proxy,\nper prompt", title_fontsize=7)


def _fraction(q: float) -> str:
    """``0.25`` -> ``1/4``: how the top fractions read."""
    return f"1/{round(1 / q)}" if q > 0 and abs(1 / q - round(1 / q)) < 1e-9 else f"{q:g}"


def agreement_chart(records: Sequence[EvalRecord]) -> Figure:
    """Top-q rank agreement of proxy and true over training, on its own."""
    fig = _figure(9.2, 3.6)
    ax = fig.add_subplot()
    agreement_panel(ax, sorted(records, key=lambda r: r.step))
    ax.set_xlabel("training step")
    ax.set_title("Does the proxy still order the samples selection chooses between?")
    ax.grid(alpha=0.3)
    return fig


def rl_chart(records: Sequence[EvalRecord], *, sqrt_kl: bool = False) -> Figure:
    """Gao et al. 2022's view: the RL policy's true reward against its KL over training
    (each point labelled with its step), beside the best-of-n curve of the first eval
    step, with the RL-form fit; x is KL in nats, as in every other chart."""
    records = sorted(records, key=lambda r: r.step)
    fig = _figure()
    ax = fig.add_subplot()
    first = records[0].curve
    _band(
        ax,
        _x(first.kl, sqrt_kl),
        first.true_mean,
        first.true_se,
        TRUE_COLOR,
        f"best-of-n of the policy at step {records[0].step}",
    )
    points = [(r.step, r.policy) for r in records if r.policy is not None]
    if points:
        kl = np.clip([p.kl for _, p in points], 0.0, None)  # estimators of KL can dip below 0 early on
        true = np.array([p.true_mean for _, p in points])
        x = _x(kl, sqrt_kl)
        ax.plot(x, true, "D-", color=RL_COLOR, markersize=4, label="RL policy over training (labels: step)")
        labelled = set(evenly_spaced(list(range(len(points))), MAX_STEP_LABELS))
        for i, (step, _) in enumerate(points):
            if i in labelled:
                ax.annotate(
                    str(step), (x[i], true[i]), xytext=(4, 4), textcoords="offset points", fontsize=7, color=RL_COLOR
                )
        base = _base_true(records[0])
        base = float(true[0]) if base is None else base
        if np.count_nonzero(kl > 0) >= 2:
            try:
                fit = fit_rl_overoptimization(kl, true, baseline=base)
            except ValueError:
                fit = None
            if fit is not None and math.isfinite(fit.alpha) and math.isfinite(fit.beta):
                d = np.linspace(1e-6, math.sqrt(float(kl.max())) * 1.03, 200)
                ax.plot(
                    _x(d**2, sqrt_kl),
                    base + fit.predict(d),
                    ":",
                    color=RL_COLOR,
                    linewidth=1.5,
                    label=f"RL fit d(α−β log d), R² = {fit.r2:.2f}",
                )
    else:
        _note(ax, "no policy KL logged (log_scores(..., policy_kl=...)): no RL points")
    ax.set_xlabel(_kl_label(sqrt_kl, "policy or best-of-n"))
    ax.set_ylabel("true reward")
    ax.set_title("RL vs best-of-n: true reward against KL")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


# ---- several runs --------------------------------------------------------------------------------


def _run_color(i: int) -> str:
    return RUN_COLORS[i % len(RUN_COLORS)]


def _items(runs: Mapping[str, object] | Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    items = list(runs.items()) if isinstance(runs, Mapping) else [tuple(item) for item in runs]
    if not items:
        raise ValueError("no runs to chart")
    return items  # type: ignore[return-value]


def compare_chart(
    runs: Mapping[str, EvalRecord] | Sequence[tuple[str, EvalRecord]],
    *,
    sqrt_kl: bool = False,
    show_proxy: bool = True,
    proxy_name: str | None = None,
    true_name: str | None = None,
    title: str | None = None,
) -> Figure:
    """Best-of-n curves of several runs (one eval step each): true reward with ±1 SE
    bands on top, proxy reward below (``show_proxy``), one colour per run; each run's
    Goodhart point a star (hollow when extrapolated; left out, and said in the legend,
    when it lies beyond the measured range).

    Args:
        runs: ``{label: record}`` or ``[(label, record), ...]`` in legend order.
        sqrt_kl: x axis √KL (Gao et al.'s d) instead of KL.
        show_proxy: also draw each run's proxy curve, in its own panel.
        proxy_name, true_name: reward names for the labels.
        title: chart title (default: "Best-of-n curves of K runs").
    """
    items = _items(runs)
    fig = _figure(9.6, 6.4 if show_proxy else 5.2)
    axes = _reward_axes(fig, 2 if show_proxy else 1, (1.3, 1.0) if show_proxy else None)
    ax_true = axes[0]
    proxy_label, true_label = _reward_labels(proxy_name, true_name)
    for i, (label, record) in enumerate(items):
        c, color = record.curve, _run_color(i)
        x = _x(c.kl, sqrt_kl)
        status = record.goodhart_status()
        suffix = " — n* beyond the measured range" if status == "beyond" else ""
        _band(ax_true, x, c.true_mean, c.true_se, color, f"{label} (step {record.step}){suffix}", markersize=3.5)
        if show_proxy:
            _band(axes[1], x, c.proxy_mean, c.proxy_se, color, label, fmt="s--", markersize=3)
        g, base = record.goodhart, _base_true(record)
        if g is not None and base is not None and status in ("measured", "extrapolated"):
            ax_true.plot(
                _x(np.array([g.kl]), sqrt_kl),
                [base + g.peak_gain],
                "*",
                markersize=13,
                color=color,
                markerfacecolor=color if status == "measured" else "white",
                markeredgewidth=1.3,
            )
    ax_true.plot([], [], "*", color="grey", markersize=10, label="Goodhart point (hollow: extrapolated)")
    grids = [r.curve for _, r in items]
    if not any(c.has_ties for c in grids):  # KL is a function of n alone: mark n on top
        widest = max(grids, key=lambda c: len(c.n))
        _n_ticks(ax_true, _x(widest.kl, sqrt_kl), widest.n.tolist())
    axes[-1].set_xlabel(_kl_label(sqrt_kl))
    ax_true.set_ylabel(f"{true_label} of best-of-n\n(±1 SE)")
    if show_proxy:
        axes[1].set_ylabel(f"{proxy_label} of best-of-n\n(±1 SE)")
    fig.suptitle(title or f"Best-of-n curves of {len(items)} run{'s' if len(items) != 1 else ''}", fontsize=11)
    for ax in axes:
        ax.grid(alpha=0.3)
    _side_legend(ax_true, fontsize=8)
    return fig


def common_n(runs: Mapping[str, Sequence[EvalRecord]] | Sequence[tuple[str, Sequence[EvalRecord]]]) -> int | None:
    """The largest n measured at every eval step of every run (None if there is none)."""
    grids = [set(r.curve.n.tolist()) for _, records in _items(runs) for r in records]  # type: ignore[union-attr]
    shared = set.intersection(*grids) if grids else set()
    return max(shared) if shared else None


def runs_trend_chart(
    runs: Mapping[str, Sequence[EvalRecord]] | Sequence[tuple[str, Sequence[EvalRecord]]],
    *,
    n: int | None = None,
    show_proxy: bool = False,
    proxy_name: str | None = None,
    true_name: str | None = None,
    title: str | None = None,
) -> Figure:
    """Several runs over training: true reward at n with ±1 SE bands (top), proxy reward
    at n (middle, ``show_proxy``), and the Goodhart point's n* (bottom) against step.

    Args:
        runs: ``{label: records}`` (each run's eval records) in legend order.
        n: the n of the reward panels; default the largest n every step of every run has
            (:func:`common_n`), else each step's largest n.
        show_proxy: also draw proxy reward at n, in its own panel.
        proxy_name, true_name: reward names for the labels.
    """
    items = _items(runs)
    n = n if n is not None else common_n(items)  # type: ignore[arg-type]
    rows = 3 if show_proxy else 2
    fig = _figure(9.6, 7.2 if show_proxy else 6.2)
    axes = _reward_axes(fig, rows, (1.3, 1.0, 0.8) if show_proxy else (2, 1))
    ax_true, ax_n = axes[0], axes[-1]
    proxy_label, true_label = _reward_labels(proxy_name, true_name)
    series = []
    for i, (label, records) in enumerate(items):
        records = sorted(records, key=lambda r: r.step)  # type: ignore[attr-defined]
        color = _run_color(i)
        steps = np.array([r.step for r in records])
        panels = [(ax_true, "true")] + ([(axes[1], "proxy")] if show_proxy else [])
        for ax, field in panels:
            if n is not None:
                mean = np.array([_at_n(r, n, f"{field}_mean") for r in records])
                se = np.array([_at_n(r, n, f"{field}_se") for r in records])
            else:
                mean = np.array([float(getattr(r.curve, f"{field}_mean")[-1]) for r in records])
                se = np.array([float(getattr(r.curve, f"{field}_se")[-1]) for r in records])
            _band(ax, steps, mean, se, color, label, markersize=3.5)
        series.append((label, color, records))
    at = f"n={n}" if n is not None else "the largest n"
    ax_true.set_ylabel(f"{true_label} @ {at}\n(±1 SE)")
    ax_true.set_title(title or f"{true_label.capitalize()} of best-of-n at {at}, and the Goodhart point, over training")
    _side_legend(ax_true, fontsize=8)
    if show_proxy:
        axes[1].set_ylabel(f"{proxy_label} @ {at}\n(±1 SE)")
    _goodhart_panel(ax_n, series)
    steps = sorted({r.step for _, _, records in series for r in records})
    gap = min((b - a for a, b in itertools.pairwise(steps)), default=0)
    for k, (_, color, records) in enumerate(series):  # side by side, within a fifth of a step gap
        offset = (k - (len(series) - 1) / 2) * 0.2 * gap / max(len(series) - 1, 1)
        _n_interval_bars(ax_n, records, color, offset)
    ax_n.set_ylabel("Goodhart point n*\n(bars: 95 % interval)")
    ax_n.set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig
