"""What one eval step produces: the record every backend writes, and its metric names.

A record is plain data (JSON round-trips exactly), so the same record can be
written by any backend, spooled to disk when a service is down and replayed later.

Metric names (:func:`metric_key`; ``bon`` is the key prefix, n zero-padded)::

    bon/1_true/n0016          true reward of best-of-n, per n
    bon/2_proxy/n0016         proxy reward of best-of-n, per n
    bon/3_gap/n0016           proxy - true, per n
    bon/4_goodhart/n, /kl     the fitted Goodhart point (when the fit peaks; n = 1, kl = 0 when
                              the true reward falls from the start); left out when it lies
                              beyond GOODHART_HORIZON x the largest n (an extrapolation)
    bon/4_goodhart/n_low, /n_high, /kl_low, /kl_high, /gain, /gain_low, /gain_high
                              its 95 % interval from resampling prompts: each bound only while
                              its n lies within the same horizon (the gains: while the point's,
                              and for gain_high the interval's upper end, does)
    bon/5_policy/kl, /true, /proxy   the trained policy itself (when its KL is given)
    bon/6_kl/n0016            KL of best-of-n per n (only when the proxy has ties)
    bon/7_alert/<rule>        1 while the rule's alert is active, else 0 (every enabled rule)
    bon/8_agreement/top1, /top0_5, /top0_25, ...
                              Spearman rank agreement of proxy and true among each prompt's top
                              q of samples by proxy, mean over prompts (``.`` written ``_``: W&B
                              reads dots as nesting); text order is numeric order of q
    bon/context/<key>         the user's numeric extras

Sections are numbered so that the UIs, which sort by name, show the true reward first.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from bon_tracker.core import (
    Alert,
    AlertCleared,
    BonCurve,
    GoodhartInterval,
    OveroptimizationFit,
    TopAgreement,
    fit_overoptimization,
)
from bon_tracker.core.agreement import AGREEMENT_SECTION, agreement_label
from bon_tracker.core.fit import GOODHART_HORIZON, goodhart_horizon  # noqa: F401 (GOODHART_HORIZON: re-exported)
from bon_tracker.core.selection_stats import SelectionStatistics
from bon_tracker.core.validation import as_float
from bon_tracker.texts import HackStatistics

logger = logging.getLogger("bon_tracker")

TABLE_NAME = "bon_curves"
PREDICTIONS_TABLE = "bon_predictions"  # the fitted law beyond the measured n, every row marked predicted
PREDICTION_COLUMNS = (
    "step",
    "n",
    "kl",
    "predicted",
    "true_mean",
    "true_mean_low",
    "true_mean_high",
    "proxy_mean",
    "proxy_mean_low",
    "proxy_mean_high",
)
TABLE_COLUMNS = (
    "step",
    "n",
    "kl",
    "kl_bound",
    "true_mean",
    "true_se",
    "proxy_mean",
    "proxy_se",
    "gap",
    "n_prompts",
)


_PER_N_FIELDS = ("n", "kl", "kl_bound", "true_mean", "true_se", "proxy_mean", "proxy_se", "n_prompts")


# Metric sections, in the order the tracking UIs should show them. MLflow's metrics view
# and W&B's workspace sort panels by name, so each section is numbered: the true reward
# comes first, and ``n`` is zero-padded (:func:`n_label`) so that n = 2 sorts before 16.
METRIC_SECTIONS = {
    "true": "1_true",  # true reward of best-of-n, per n
    "proxy": "2_proxy",  # proxy reward of best-of-n, per n
    "gap": "3_gap",  # proxy − true, per n
    "goodhart": "4_goodhart",  # the fitted Goodhart point: n, kl
    "policy": "5_policy",  # the trained policy itself: kl, true, proxy
    "kl": "6_kl",  # KL of best-of-n per n: only when the proxy has ties
    "alert": "7_alert",  # alert states, 0/1 per enabled rule
    "agreement": AGREEMENT_SECTION,  # top-q rank agreement of proxy and true
}
MAX_SCALAR = 1e30  # gains past this (a fit that barely bends) are left out of the scalars
INTERVAL_FIELDS = ("n_low", "n_high", "kl_low", "kl_high", "gain", "gain_low", "gain_high")
# A Goodhart point past GOODHART_HORIZON (4) x the largest measured n is "beyond the measured range":
# said in words ("beyond n = 64"), never logged or drawn as a number (bon_tracker.core.fit).
N_DIGITS = 4  # n0001 ... n9999 sort numerically as text; a larger n keeps all its digits


def n_label(n: int) -> str:
    """The per-n part of a metric name: ``n`` zero-padded to four digits.

    >>> n_label(1), n_label(16), n_label(1024)
    ('n0001', 'n0016', 'n1024')
    """
    return f"n{int(n):0{N_DIGITS}d}"


def metric_key(kind: str, leaf: int | str, prefix: str = "bon") -> str:
    """The name of one scalar: ``{prefix}/{section}/{leaf}``, ``leaf`` an n (see
    :func:`n_label`) or a name. One scheme for every backend.

    >>> metric_key("true", 16), metric_key("goodhart", "kl", "rm")
    ('bon/1_true/n0016', 'rm/4_goodhart/kl')
    """
    if kind not in METRIC_SECTIONS:
        raise ValueError(f"unknown metric kind {kind!r}; expected one of {', '.join(METRIC_SECTIONS)}")
    name = n_label(leaf) if isinstance(leaf, int) and not isinstance(leaf, bool) else str(leaf)
    return f"{prefix}/{METRIC_SECTIONS[kind]}/{name}"


def curve_image_key(prefix: str = "bon") -> str:
    """The key of the per-step curve chart image (MLflow ``log_image``, W&B, TensorBoard):
    section ``{prefix}``, which the UIs list before ``{prefix}/1_true``.

    >>> curve_image_key()
    'bon/0_curve'
    """
    return f"{prefix}/0_curve"


def _plain_context(context: dict[str, Any]) -> dict[str, Any]:
    """Context values as plain JSON values: numpy scalars and 0-d tensors become Python
    numbers (``.item()``); strings, bools and None stay; anything else is dropped."""
    out: dict[str, Any] = {}
    for key, value in context.items():
        if hasattr(value, "item"):  # numpy scalars, one-element arrays and tensors
            with contextlib.suppress(ValueError, RuntimeError):  # several elements: dropped below
                value = value.item()
        if value is None or isinstance(value, (bool, int, float, str)):
            out[str(key)] = value
        else:
            logger.warning("bon_tracker: context value %r=%r is not a number or string; not logged", key, value)
    return out


def evenly_spaced(items: Sequence[Any], limit: int) -> list[Any]:
    """At most ``limit`` items, evenly spaced, always keeping the first and the last.

    Charts over many eval steps show a bounded number of curves, so a step's cost
    does not grow with the length of the run.

    >>> evenly_spaced(list(range(10)), 4)
    [0, 3, 6, 9]
    """
    if len(items) <= limit:
        return list(items)
    picks = np.unique(np.linspace(0, len(items) - 1, limit).round().astype(int))
    return [items[i] for i in picks]


@dataclass(frozen=True)
class GoodhartPoint:
    """Summary of the fitted best-of-n overoptimization curve at one step."""

    n: float  # the n at the fitted true-score peak (1 when the true reward falls from the start)
    kl: float  # its KL, nats (0 when the true reward falls from the start)
    peak_gain: float  # fitted true-score gain over n = 1 at the peak
    within_range: bool  # the peak lies inside the measured KL range
    true_alpha: float
    true_beta: float
    true_r2: float
    falls_from_start: bool = False  # n* = 1: any selection on this proxy already lowers the true reward

    @classmethod
    def from_fit(cls, fit: OveroptimizationFit) -> GoodhartPoint | None:
        if not fit.has_goodhart_point:
            return None
        return cls(
            n=fit.goodhart_n,
            kl=fit.goodhart_kl,
            peak_gain=fit.goodhart_gain,
            within_range=fit.peak_within_range,
            true_alpha=fit.true.alpha,
            true_beta=fit.true.beta,
            true_r2=fit.true.r2,
            falls_from_start=fit.falls_from_start,
        )


@dataclass(frozen=True)
class PolicyPoint:
    """The trained policy itself at an eval step: its KL to the reference policy and
    its own mean scores (n = 1). Points over training give Gao et al.'s RL curve."""

    kl: float
    true_mean: float
    proxy_mean: float


@dataclass(frozen=True)
class EvalRecord:
    """Everything logged for one eval step."""

    step: int
    curve: BonCurve
    goodhart: GoodhartPoint | None = None
    policy: PolicyPoint | None = None
    context: dict[str, Any] = field(default_factory=dict)  # user extras: scalars only
    key_prefix: str = "bon"
    timestamp: float = field(default_factory=time.time)
    proxy_name: str = "proxy"  # reward names, for chart labels
    true_name: str = "true"
    interval: GoodhartInterval | None = None  # the Goodhart point with intervals from resampling prompts
    agreement: TopAgreement | None = None  # top-q rank agreement (dense input only)
    predictions: tuple[dict[str, Any], ...] | None = None  # rows of the bon_predictions table
    alerts: tuple[Alert | AlertCleared, ...] = ()  # alert onsets and clears at this step
    alert_states: dict[str, int] | None = None  # rule -> 1 while active, 0 otherwise (enabled rules)
    selection: SelectionStatistics | None = None  # every selection rule's curves, optima, frontier
    hacks: HackStatistics | None = None  # the hack table and text features (texts were logged)

    @classmethod
    def build(
        cls,
        step: int,
        curve: BonCurve,
        *,
        policy_kl: float | None = None,
        context: dict[str, Any] | None = None,
        key_prefix: str = "bon",
        proxy_name: str = "proxy",
        true_name: str = "true",
        interval: GoodhartInterval | None = None,
        agreement: TopAgreement | None = None,
        predictions: Sequence[dict[str, Any]] | None = None,
        alerts: Sequence[Alert | AlertCleared] = (),
        alert_states: dict[str, int] | None = None,
        fit: bool = True,
    ) -> EvalRecord:
        """The record of one eval; ``fit=False`` leaves the Goodhart fit out (the tracker adds
        it off the training thread, with :meth:`fit_goodhart`)."""
        goodhart = cls.fit_goodhart(curve) if fit else None
        policy = None
        if policy_kl is not None:
            grid = curve.n.tolist()
            if 1 in grid:
                at_one = grid.index(1)
                kl = as_float(policy_kl, "policy_kl")  # 10**400: a ValueError naming it, not an OverflowError
                policy = PolicyPoint(kl, curve.true_mean.item(at_one), curve.proxy_mean.item(at_one))
        return cls(
            step=int(step),
            curve=curve,
            goodhart=goodhart,
            policy=policy,
            context=_plain_context(context) if context else {},
            key_prefix=key_prefix,
            proxy_name=proxy_name,
            true_name=true_name,
            interval=interval,
            agreement=agreement,
            predictions=None if predictions is None else tuple(dict(row) for row in predictions),
            alerts=alerts if type(alerts) is tuple else tuple(alerts),
            alert_states=None if alert_states is None else {str(k): int(v) for k, v in alert_states.items()},
        )

    @staticmethod
    def fit_goodhart(curve: BonCurve) -> GoodhartPoint | None:
        """Gao et al.'s law fitted to ``curve``; None without a Goodhart point or too few points."""
        # Ragged prompts: fit only the n that every prompt reaches, so that all points of
        # the fitted curve average the same prompts.
        full = curve.n_prompts == curve.n_prompts.max()
        fitted = curve if full.all() else replace(curve, **{k: getattr(curve, k)[full] for k in _PER_N_FIELDS})
        if len(fitted.n) < 3 or 1 not in fitted.n.tolist():
            return None
        try:
            return GoodhartPoint.from_fit(fit_overoptimization(fitted))
        except ValueError:  # too few points with KL > 0 to fit
            return None

    # ---- what appears in the tracking UI -------------------------------------------
    def scalars(self) -> dict[str, float]:
        """Scalars at this step, named by :func:`metric_key` (see :data:`METRIC_SECTIONS`):
        ``{prefix}/1_true/n0016``, ``{prefix}/2_proxy/n0016``, ``{prefix}/3_gap/n0016`` for
        every n of the grid; ``{prefix}/4_goodhart/n`` and ``/kl`` when the fit has a peak within
        :attr:`horizon_n` (``n = 1``, ``kl = 0`` when the true reward falls from the start);
        ``{prefix}/5_policy/kl``, ``/true``, ``/proxy`` when the policy's KL is known;
        ``{prefix}/6_kl/n0016`` only when the proxy has ties (otherwise KL is the formula
        ``log n − (n−1)/n``, a function of n alone, and it is in the curve table anyway);
        ``{prefix}/4_goodhart/n_low`` ... ``/gain_high``: the interval's bounds within the horizon;
        ``{prefix}/7_alert/{rule}`` (0/1) for every enabled rule; ``{prefix}/8_agreement/top0_25``
        ...; ``{prefix}/context/{key}`` for the user's numeric extras."""
        pre, c = self.key_prefix, self.curve
        out: dict[str, float] = {}
        for kind, values in (("true", c.true_mean), ("proxy", c.proxy_mean), ("gap", c.proxy_mean - c.true_mean)):
            for n, value in zip(c.n.tolist(), values.tolist()):
                out[metric_key(kind, n, pre)] = float(value)
        if self.goodhart is not None and self.goodhart_status() in ("measured", "extrapolated"):
            out[metric_key("goodhart", "n", pre)] = float(self.goodhart.n)
            out[metric_key("goodhart", "kl", pre)] = float(self.goodhart.kl)
        if self.policy is not None:
            out[metric_key("policy", "kl", pre)] = self.policy.kl
            out[metric_key("policy", "true", pre)] = self.policy.true_mean
            out[metric_key("policy", "proxy", pre)] = self.policy.proxy_mean
        if c.has_ties:
            for n, value in zip(c.n.tolist(), c.kl.tolist()):
                out[metric_key("kl", n, pre)] = float(value)
        if self.interval is not None:
            out.update(self._interval_scalars())
        for rule, state in (self.alert_states or {}).items():
            out[metric_key("alert", rule, pre)] = float(state)
        if self.agreement is not None:
            for q, mean in zip(self.agreement.q, self.agreement.mean):
                if math.isfinite(mean):
                    out[metric_key("agreement", agreement_label(q), pre)] = float(mean)
        for key, value in self.context.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[f"{pre}/context/{key}"] = float(value)
        return out

    @property
    def horizon_n(self) -> float:
        """The largest n* reported as a number: ``GOODHART_HORIZON`` times the largest n measured;
        with ties in the proxy the largest n itself (past the measured KL its n is not known)."""
        if not len(self.curve.n):
            return math.nan
        largest = int(self.curve.n.max())
        return float(largest) if self.curve.has_ties else goodhart_horizon(largest)

    def _interval_scalars(self) -> dict[str, float]:
        """The interval's bounds whose n lies within :attr:`horizon_n` (n_high = inf, "maybe no
        peak", or 4e7 from a fit that barely bends, is no metric value)."""
        i, pre, horizon = self.interval, self.key_prefix, self.horizon_n
        assert i is not None

        def within(n: float) -> bool:
            return math.isfinite(n) and n <= horizon

        keep = {
            "n_low": within(i.n_low),
            "kl_low": within(i.n_low),
            "n_high": within(i.n_high),
            "kl_high": within(i.n_high),
            "gain": within(i.n),
            "gain_low": within(i.n),
            "gain_high": within(i.n_high),
        }
        out = {}
        for name in INTERVAL_FIELDS:
            value = float(getattr(i, name))
            if keep[name] and math.isfinite(value) and abs(value) <= MAX_SCALAR:
                out[metric_key("goodhart", name, pre)] = value
        return out

    def run_params(self) -> dict[str, str]:
        """What describes the measurement, for a service's run parameters (MLflow params,
        W&B config): ``N``, ``P`` (prompts at n = 1), ``ns`` (the grid), the reward names."""
        c = self.curve
        ns = c.n.tolist()
        prompts = int(c.n_prompts[ns.index(1)] if 1 in ns else c.n_prompts.max())
        return {
            "N": str(c.N),
            "P": str(prompts),
            "ns": ",".join(str(n) for n in ns),
            "proxy_name": self.proxy_name,
            "true_name": self.true_name,
        }

    def goodhart_status(self) -> str:
        """Where the fitted Goodhart point lies, for charts and reports:

        * ``"none"``: no fitted peak (the true reward still rises with n);
        * ``"measured"``: the peak lies within the measured KL range (also ``n* = 1``, when the
          true reward falls from the start: ``goodhart.falls_from_start``);
        * ``"extrapolated"``: past the largest n, but within ``GOODHART_HORIZON`` times the
          largest n measured (:attr:`horizon_n`), close enough to draw;
        * ``"beyond"``: farther (a fit can put it at n ≈ 1e200): say "beyond n = <horizon>"
          instead of plotting or logging it.
        """
        g = self.goodhart
        if g is None:
            return "none"
        if g.within_range:
            return "measured"
        if math.isfinite(g.kl) and math.isfinite(g.n) and g.n <= self.horizon_n:
            return "extrapolated"
        return "beyond"

    def goodhart_resolved(self) -> bool | None:
        """Whether the interval of the Goodhart point pins it down; None without an interval.

        Not resolved (False) when the 95 % interval of n* starts within the measured range and
        either spans it (from the first n > 1 or below to the largest n or beyond) or runs past
        :attr:`horizon_n`: the data cannot tell whether the peak lies within the measured range
        at all. A point past the horizon, or a curve without a peak, needs no interval to say so.
        """
        i = self.interval
        if i is None or not len(self.curve.n):
            return None
        ns = sorted(int(n) for n in self.curve.n.tolist())
        largest = ns[-1]
        second = next((n for n in ns if n > 1), largest)
        starts_within = i.n_low <= largest
        spans = i.n_low <= second and i.n_high >= largest
        runs_past = not i.n_high <= self.horizon_n
        return not (starts_within and (spans or runs_past))

    def table_rows(self) -> list[dict[str, float | int]]:
        """Rows of the ``bon_curves`` table for this step (columns ``TABLE_COLUMNS``)."""
        return [{"step": self.step, **row, "gap": row["proxy_mean"] - row["true_mean"]} for row in self.curve.rows()]

    def prediction_rows(self) -> list[dict[str, Any]]:
        """Rows of the ``bon_predictions`` table (columns ``PREDICTION_COLUMNS``): true and proxy
        predicted by the fitted law at n beyond the measured grid, with intervals; every row has
        ``predicted=True`` (values at measured n are in ``bon_curves``). Empty without predictions."""
        return [{"step": self.step, **row} for row in (self.predictions or ()) if row.get("predicted")]

    @property
    def onsets(self) -> list[Alert]:
        """The alerts that started at this step."""
        return [event for event in self.alerts if isinstance(event, Alert)]

    # ---- spooling --------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "curve": self.curve.to_dict(),
            "goodhart": None if self.goodhart is None else vars(self.goodhart),
            "policy": None if self.policy is None else vars(self.policy),
            "context": self.context,
            "key_prefix": self.key_prefix,
            "timestamp": self.timestamp,
            "proxy_name": self.proxy_name,
            "true_name": self.true_name,
            "interval": None if self.interval is None else self.interval.to_dict(),
            "agreement": None if self.agreement is None else self.agreement.to_dict(),
            "predictions": None if self.predictions is None else [dict(row) for row in self.predictions],
            "alerts": [event.to_dict() for event in self.alerts],
            "alert_states": None if self.alert_states is None else dict(self.alert_states),
            "selection": None if self.selection is None else self.selection.to_dict(),
            "hacks": None if self.hacks is None else self.hacks.to_dict(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EvalRecord:
        return cls(
            step=int(data["step"]),
            curve=BonCurve.from_dict(data["curve"]),
            goodhart=None if data.get("goodhart") is None else GoodhartPoint(**data["goodhart"]),
            policy=None if data.get("policy") is None else PolicyPoint(**data["policy"]),
            context=dict(data.get("context") or {}),
            key_prefix=data.get("key_prefix", "bon"),
            timestamp=float(data.get("timestamp", 0.0)),
            proxy_name=data.get("proxy_name", "proxy"),
            true_name=data.get("true_name", "true"),
            # written by bon_tracker with alerts (older records lack them: None / empty)
            interval=None if data.get("interval") is None else GoodhartInterval(**data["interval"]),
            agreement=None
            if data.get("agreement") is None
            else TopAgreement(**{k: tuple(v) for k, v in data["agreement"].items()}),
            predictions=None if data.get("predictions") is None else tuple(dict(r) for r in data["predictions"]),
            alerts=tuple(_alert_event(e) for e in data.get("alerts") or ()),
            alert_states=None if data.get("alert_states") is None else dict(data["alert_states"]),
            selection=None if data.get("selection") is None else SelectionStatistics.from_dict(data["selection"]),
            hacks=None if data.get("hacks") is None else HackStatistics.from_dict(data["hacks"]),
        )


def _alert_event(data: dict[str, Any]) -> Alert | AlertCleared:
    return AlertCleared(**data) if data.get("kind") == "clear" else Alert(**data)
