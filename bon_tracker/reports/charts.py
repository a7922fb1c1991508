"""Charts that a reader takes in at a glance (matplotlib, rendered off-screen).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot, so no
global state or display is touched; backends save it as PNG (local, MLflow) or
log it as an image. matplotlib is an optional dependency: ``pip install 'bon-tracker[charts]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from bon_tracker.core import fit_rl_overoptimization
from bon_tracker.optional import require
from bon_tracker.record import evenly_spaced

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from bon_tracker.record import EvalRecord

TRUE_COLOR = "#1f77b4"
PROXY_COLOR = "#d62728"
GOODHART_COLOR = "#2ca02c"


def _figure(width: float = 7.5, height: float = 4.8) -> Figure:
    require("matplotlib", "charts")
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _x(kl: np.ndarray, sqrt_kl: bool) -> np.ndarray:
    return np.sqrt(np.clip(kl, 0.0, None)) if sqrt_kl else kl


def _kl_label(sqrt_kl: bool) -> str:
    return "√KL(best-of-n ‖ base)  [√nats]" if sqrt_kl else "KL(best-of-n ‖ base)  [nats]"


def _placeholder(ax, text: str) -> None:
    """A grey note in the middle of an empty panel."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")


def _reward_labels(proxy_name: str | None, true_name: str | None) -> tuple[str, str]:
    """Legend labels of the (proxy, true) reward: the user's names, if any, with their role."""
    proxy = "proxy reward" if proxy_name in (None, "proxy") else f"{proxy_name} (proxy)"
    true = "true reward" if true_name in (None, "true") else f"{true_name} (true)"
    return proxy, true


def curve_chart(
    record: EvalRecord,
    *,
    sqrt_kl: bool = False,
    title: str | None = None,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """True and proxy score against KL for one eval step: ±1 SE bands, the fitted
    Gao et al. curves, the Goodhart point, and n marked on the top axis.
    ``proxy_name`` / ``true_name`` label the rewards (default "proxy" / "true")."""
    c = record.curve
    fig = _figure()
    ax = fig.add_subplot()
    x = _x(c.kl, sqrt_kl)
    proxy_label, true_label = _reward_labels(proxy_name or record.proxy_name, true_name or record.true_name)
    for mean, se, color, label in (
        (c.true_mean, c.true_se, TRUE_COLOR, true_label),
        (c.proxy_mean, c.proxy_se, PROXY_COLOR, proxy_label),
    ):
        ax.plot(x, mean, "o-", color=color, label=label, markersize=4)
        if np.isfinite(se).any():
            ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.18, linewidth=0)
    g = record.goodhart
    if g is not None:
        d = np.linspace(0.0, max(float(np.sqrt(c.kl.max())), np.sqrt(g.kl)) * 1.05, 200)
        base = float(c.true_mean[list(c.n).index(1)])
        ax.plot(
            _x(d**2, sqrt_kl),
            base + d * (g.true_alpha - g.true_beta * d),
            "--",
            color=TRUE_COLOR,
            alpha=0.7,
            label=f"true fit  d(α−βd), R²={g.true_r2:.2f}",
        )
        peak_x = _x(np.array([g.kl]), sqrt_kl)[0]
        ax.axvline(peak_x, color=GOODHART_COLOR, linestyle=":", linewidth=1.5)
        ax.plot(
            [peak_x],
            [base + g.peak_gain],
            "*",
            color=GOODHART_COLOR,
            markersize=14,
            label=f"Goodhart point: n≈{g.n:.3g}, KL={g.kl:.2f}" + ("" if g.within_range else " (extrapolated)"),
        )
    ax.set_xlabel(_kl_label(sqrt_kl))
    ax.set_ylabel("expected reward of best-of-n")
    ax.set_title(title or f"Best-of-n at step {record.step}  ({int(c.n_prompts[0])} prompts, N={c.N})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    top = ax.secondary_xaxis("top")
    top.set_xticks(x, [str(int(n)) for n in c.n], fontsize=7)
    top.set_xlabel("n (samples per best-of-n draw)")
    return fig


def overlay_chart(
    records: Sequence[EvalRecord],
    *,
    sqrt_kl: bool = False,
    max_curves: int = 20,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """Best-of-n curves of every eval step on one chart, coloured by training step
    (true solid, proxy dashed); at most ``max_curves`` steps, evenly spaced."""
    import matplotlib as mpl

    shown = evenly_spaced(list(records), max_curves)
    fig = _figure()
    ax = fig.add_subplot()
    steps = [r.step for r in shown]
    norm = mpl.colors.Normalize(vmin=min(steps), vmax=max(steps) if max(steps) > min(steps) else min(steps) + 1)
    cmap = mpl.colormaps["viridis"]
    for r in shown:
        x = _x(r.curve.kl, sqrt_kl)
        ax.plot(x, r.curve.true_mean, "-", color=cmap(norm(r.step)), linewidth=1.6)
        ax.plot(x, r.curve.proxy_mean, "--", color=cmap(norm(r.step)), linewidth=1.0, alpha=0.8)
    proxy_label, true_label = _reward_labels(proxy_name or records[-1].proxy_name, true_name or records[-1].true_name)
    ax.plot([], [], "-", color="grey", label=true_label)
    ax.plot([], [], "--", color="grey", label=proxy_label)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="training step")
    ax.set_xlabel(_kl_label(sqrt_kl))
    ax.set_ylabel("expected reward of best-of-n")
    ax.set_title(f"Best-of-n curves over training ({len(shown)} of {len(records)} eval steps)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def trend_chart(
    records: Sequence[EvalRecord],
    ns: Sequence[int] | None = None,
    *,
    proxy_name: str | None = None,
    true_name: str | None = None,
) -> Figure:
    """True@n and proxy@n against training step (top) and the Goodhart point's n (bottom)."""
    proxy_label, true_label = (
        label.replace(" reward", "")
        for label in _reward_labels(proxy_name or records[-1].proxy_name, true_name or records[-1].true_name)
    )
    fig = _figure(7.5, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    steps = np.array([r.step for r in records])
    grid = records[-1].curve.n.tolist()
    ns = list(ns) if ns is not None else sorted({1, grid[len(grid) // 2], grid[-1]})
    shades = np.linspace(0.35, 1.0, len(ns))
    for n, shade in zip(ns, shades):
        true = [r.curve.true_mean[r.curve.n.tolist().index(n)] if n in r.curve.n.tolist() else np.nan for r in records]
        proxy = [
            r.curve.proxy_mean[r.curve.n.tolist().index(n)] if n in r.curve.n.tolist() else np.nan for r in records
        ]
        top.plot(steps, true, "o-", color=TRUE_COLOR, alpha=shade, markersize=3, label=f"{true_label} @ n={n}")
        top.plot(steps, proxy, "s--", color=PROXY_COLOR, alpha=shade, markersize=3, label=f"{proxy_label} @ n={n}")
    top.set_ylabel("expected reward")
    top.set_title("Best-of-n reward over training")
    top.grid(alpha=0.3)
    top.legend(fontsize=7, ncol=2, loc="best")
    goodhart_n = [r.goodhart.n if r.goodhart is not None else np.nan for r in records]
    bottom.plot(steps, goodhart_n, "*-", color=GOODHART_COLOR, markersize=7)
    bottom.set_yscale("log")
    bottom.set_ylabel("Goodhart point n*")
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    if np.all(np.isnan(goodhart_n)):
        _placeholder(bottom, "no peak fitted yet (true reward still rising with n)")
    return fig


def rl_chart(records: Sequence[EvalRecord], *, sqrt_kl: bool = True) -> Figure:
    """Gao et al. 2022's view: the RL policy's true score against its KL over training,
    beside the best-of-n curve of the initial policy, with the RL-form fit."""
    fig = _figure()
    ax = fig.add_subplot()
    first = records[0].curve
    ax.plot(
        _x(first.kl, sqrt_kl),
        first.true_mean,
        "o-",
        color=TRUE_COLOR,
        markersize=4,
        label=f"best-of-n of the policy at step {records[0].step} (true)",
    )
    points = [(r.step, r.policy) for r in records if r.policy is not None]
    if points:
        kl = np.clip([p.kl for _, p in points], 0.0, None)  # estimators of KL can dip below 0 early on
        true = np.array([p.true_mean for _, p in points])
        ax.plot(_x(kl, sqrt_kl), true, "D-", color="#9467bd", markersize=4, label="RL policy over training (true)")
        base = float(first.true_mean[first.n.tolist().index(1)]) if 1 in first.n.tolist() else float(true[0])
        if np.count_nonzero(kl > 0) >= 2:
            fit = fit_rl_overoptimization(kl, true, baseline=base)
            d = np.linspace(1e-6, np.sqrt(kl.max()) * 1.05, 200)
            ax.plot(
                _x(d**2, sqrt_kl),
                base + fit.predict(d),
                ":",
                color="#9467bd",
                label=f"RL fit  d(α−β log d), R²={fit.r2:.2f}",
            )
    ax.set_xlabel(_kl_label(sqrt_kl).replace("best-of-n", "policy"))
    ax.set_ylabel("true reward")
    ax.set_title("RL vs best-of-n: true reward against KL")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


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
    """Best-of-n curves of several runs on one chart (one eval step each).

    One colour per run: true reward solid with a ±1 SE band, proxy reward dashed,
    the run's Goodhart point as a star (hollow when extrapolated past the largest n).
    The legend names each run with the step shown.

    Args:
        runs: ``{label: record}`` or ``[(label, record), ...]`` in legend order.
        sqrt_kl: x axis √KL (Gao et al.'s d) instead of KL.
        show_proxy: also draw each run's proxy curve.
        proxy_name, true_name: reward names for the labels.
        title: chart title (default: "Best-of-n curves of K runs").
    """
    items = _items(runs)
    fig = _figure(8.0, 5.2)
    ax = fig.add_subplot()
    proxy_label, true_label = _reward_labels(proxy_name, true_name)
    for i, (label, record) in enumerate(items):
        c, color = record.curve, _run_color(i)
        x = _x(c.kl, sqrt_kl)
        ax.plot(x, c.true_mean, "o-", color=color, markersize=3.5, linewidth=1.8, label=f"{label} (step {record.step})")
        if np.isfinite(c.true_se).any():
            ax.fill_between(x, c.true_mean - c.true_se, c.true_mean + c.true_se, color=color, alpha=0.15, linewidth=0)
        if show_proxy:
            ax.plot(x, c.proxy_mean, "--", color=color, linewidth=1.1, alpha=0.75)
        g = record.goodhart
        if g is not None and 1 in c.n.tolist():
            base = float(c.true_mean[c.n.tolist().index(1)])
            ax.plot(
                _x(np.array([g.kl]), sqrt_kl),
                [base + g.peak_gain],
                "*",
                markersize=13,
                color=color,
                markerfacecolor=color if g.within_range else "none",
                markeredgewidth=1.3,
            )
    ax.plot([], [], "-", color="grey", label=true_label + " (±1 SE)")
    if show_proxy:
        ax.plot([], [], "--", color="grey", label=proxy_label)
    ax.plot([], [], "*", color="grey", markersize=10, label="Goodhart point (hollow: extrapolated)")
    grids = [r.curve for _, r in items]
    if not any(c.has_ties for c in grids):  # KL is a function of n alone: mark n on top
        widest = max(grids, key=lambda c: len(c.n))
        top = ax.secondary_xaxis("top")
        top.set_xticks(_x(widest.kl, sqrt_kl), [str(int(n)) for n in widest.n], fontsize=7)
        top.set_xlabel("n (samples per best-of-n draw)")
    ax.set_xlabel(_kl_label(sqrt_kl))
    ax.set_ylabel("expected reward of best-of-n  [reward units]")
    ax.set_title(title or f"Best-of-n curves of {len(items)} run{'s' if len(items) != 1 else ''}")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def _value_at(record: EvalRecord, n: int, field: str) -> float:
    ns = record.curve.n.tolist()
    return float(getattr(record.curve, field)[ns.index(n)]) if n in ns else np.nan


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
    """Several runs over training: true reward at n (top) and the Goodhart point's n*
    (bottom, log scale; hollow markers where the peak is extrapolated) against step.

    Args:
        runs: ``{label: records}`` (each run's eval records) in legend order.
        n: the n of the top panel; default the largest n every step of every run has
            (:func:`common_n`), else each step's largest n.
        show_proxy: also draw proxy reward at n (dashed).
        proxy_name, true_name: reward names for the labels.
    """
    items = _items(runs)
    n = n if n is not None else common_n(items)  # type: ignore[arg-type]
    fig = _figure(8.0, 6.2)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    proxy_label, true_label = _reward_labels(proxy_name, true_name)
    any_goodhart = False
    for i, (label, records) in enumerate(items):
        records = sorted(records, key=lambda r: r.step)  # type: ignore[attr-defined]
        color = _run_color(i)
        steps = np.array([r.step for r in records])
        if n is not None:
            true = [_value_at(r, n, "true_mean") for r in records]
            proxy = [_value_at(r, n, "proxy_mean") for r in records]
        else:
            true = [float(r.curve.true_mean[-1]) for r in records]
            proxy = [float(r.curve.proxy_mean[-1]) for r in records]
        top.plot(steps, true, "o-", color=color, markersize=3.5, label=label)
        if show_proxy:
            top.plot(steps, proxy, "s--", color=color, markersize=2.5, alpha=0.7, linewidth=1.0)
        gn = np.array([r.goodhart.n if r.goodhart is not None else np.nan for r in records])
        within = np.array([r.goodhart is not None and r.goodhart.within_range for r in records])
        if np.isfinite(gn).any():
            any_goodhart = True
            bottom.plot(steps, gn, "-", color=color, linewidth=1.0, alpha=0.8)
            bottom.plot(steps[within], gn[within], "*", color=color, markersize=8)
            outside = ~within & np.isfinite(gn)
            bottom.plot(steps[outside], gn[outside], "*", color=color, markersize=8, markerfacecolor="none")
    at = f"n={n}" if n is not None else "the largest n"
    if show_proxy:
        top.plot([], [], "s--", color="grey", markersize=2.5, label=f"{proxy_label} (dashed)")
    top.set_ylabel(f"{true_label} @ {at}  [reward units]")
    top.set_title(title or f"{true_label.capitalize()} of best-of-n at {at}, and the Goodhart point, over training")
    top.grid(alpha=0.3)
    top.legend(loc="best", fontsize=8)
    bottom.set_ylabel("Goodhart point n*\n[samples, log scale]")
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    if any_goodhart:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, 100: readable n
        bottom.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(NullFormatter())
        bottom.plot([], [], "*", color="grey", markersize=8, label="fitted peak within the measured n")
        bottom.plot([], [], "*", color="grey", markersize=8, markerfacecolor="none", label="extrapolated past it")
        bottom.legend(loc="best", fontsize=7)
    else:
        _placeholder(bottom, "no Goodhart point fitted (true reward still rising with n)")
    return fig
