"""What the tracker computes beside the curve at each eval, and how it reports alerts.

On the training thread, right after ``bon_curve`` (rank 0 only):

* :func:`eval_statistics`: the Goodhart point's interval (resampling prompts), the top-q
  rank agreement (dense input only) and the fitted law's predictions beyond the measured n;
* :class:`AlertReporter`: feeds :class:`~bon_tracker.core.alerts.AlertMonitor` one summary
  per eval, words each onset as one sentence a researcher reads at a glance, and reports it
  (a ``logger.warning``, ``tracker.alerts``, the user's ``on_alert``). The 0/1 states and the
  events go into the record, from which the delivery worker raises the service's own alert.

The mathematics is :mod:`bon_tracker.core`; this module only chooses what to compute and words it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from bon_tracker.core import (
    Alert,
    AlertCleared,
    AlertMonitor,
    AlertRules,
    BonCurve,
    BootstrapDraws,
    EvalSummary,
    GoodhartInterval,
    TopAgreement,
    bon_curve_parts,
    goodhart_interval,
    kl_to_n,
    predict_curve,
    topq_agreement,
)
from bon_tracker.core.alerts import RULES, describe_n

logger = logging.getLogger("bon_tracker")

RESAMPLES = 1000  # bootstrap resamples of the interval and the predictions (calibrated at 1000)
MIN_RESAMPLES = 200
MAX_RESAMPLED = 2_000_000  # resamples x prompts: above it, fewer resamples (cost grows as B x P)
MAX_AGREEMENT_PROMPTS = 2048  # agreement averages an evenly spaced subset past this many prompts (its cost ~ P N log N)
MAX_PREDICTED_N = 1 << 20  # predictions stop here (about 13 nats), however far n* lies
STATE_VERSION = 1

AlertCallback = Callable[[Alert], Any]


def resamples_for(n_prompts: int) -> int:
    """Bootstrap resamples at ``n_prompts``: 1000, fewer past 2,000 prompts (at least 200).

    >>> resamples_for(64), resamples_for(1000), resamples_for(10_000)
    (1000, 1000, 200)
    """
    return int(max(MIN_RESAMPLES, min(RESAMPLES, MAX_RESAMPLED // max(int(n_prompts), 1))))


def prediction_ns(curve: BonCurve, interval: GoodhartInterval | None) -> list[int]:
    """Where to predict: 2N and 4N; when the Goodhart point is significant (its interval is
    bounded) and lies beyond, powers of 4 up to it and n* itself, at most ``MAX_PREDICTED_N``.

    >>> from bon_tracker.core import bon_curve
    >>> prediction_ns(bon_curve(np.eye(8), np.eye(8)), None)
    [16, 32]
    """
    N = int(curve.n.max())
    targets = {2 * N, 4 * N}
    significant = interval is not None and math.isfinite(interval.n_high)
    if significant and interval.n > 4 * N:
        n_star = min(float(interval.n), MAX_PREDICTED_N)
        n = 16 * N
        while n < n_star:
            targets.add(n)
            n *= 4
        targets.add(round(n_star))
    return sorted(t for t in targets if t <= MAX_PREDICTED_N)


@dataclass(frozen=True)
class EvalStatistics:
    """What :func:`eval_statistics` found (None where it does not apply)."""

    interval: GoodhartInterval | None = None
    agreement: TopAgreement | None = None
    predictions: tuple[dict[str, Any], ...] | None = None


def eval_statistics(
    proxy: Any,
    true: Any,
    curve: BonCurve,
    per_prompt: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    draws: BootstrapDraws | None = None,
) -> EvalStatistics:
    """Interval, agreement and predictions for validated scores (a ``(P, N)`` array or ragged rows).

    ``per_prompt``: the per-prompt estimates of the true and the proxy score at ``curve.n``
    (:func:`~bon_tracker.core.bon_curve_parts` gives them from the curve's own sort); computed
    here when not given. ``draws``: bootstrap draws shared with other evals
    (:class:`~bon_tracker.core.BootstrapDraws`: the same numbers, drawn once).

    The interval and predictions need n = 1 and two more n that every prompt reaches, and two
    prompts; agreement needs dense input, and past ``MAX_AGREEMENT_PROMPTS`` prompts averages an
    evenly spaced subset of them (``TopAgreement.n_prompts`` says how many). What does not apply is None.
    """
    if per_prompt is None:
        parts = bon_curve_parts(proxy, true, curve.n)  # one sort for both matrices
        per_prompt = (parts.true, parts.proxy)
    interval, predictions = interval_and_predictions(curve, *per_prompt, draws=draws)
    agreement = None
    if isinstance(proxy, np.ndarray):
        rows = agreement_rows(proxy.shape[0])
        try:
            agreement = topq_agreement(proxy[rows], true[rows])
        except ValueError:  # fewer than 4 samples per prompt
            agreement = None
    return EvalStatistics(interval, agreement, predictions)


def interval_and_predictions(
    curve: BonCurve, true_pp: np.ndarray, proxy_pp: np.ndarray, *, draws: BootstrapDraws | None = None
) -> tuple[GoodhartInterval | None, tuple[dict[str, Any], ...] | None]:
    """The Goodhart interval and the fitted law's predictions from the per-prompt estimates at
    ``curve.n`` (``resamples_for`` the prompts); None for what does not apply (no n = 1 on the
    grid, too few n or prompts to fit)."""
    ns = curve.n
    # Row-major, as the resampling reads them (finite_curve_parts hands over views held by n).
    true_pp, proxy_pp = np.ascontiguousarray(true_pp), np.ascontiguousarray(proxy_pp)
    B = resamples_for(int(curve.n_prompts.max()))
    interval = None
    try:
        interval = goodhart_interval(true_pp, ns, kl=curve.kl, n_resamples=B, draws=draws)
        predicted = predict_curve(true_pp, proxy_pp, ns, prediction_ns(curve, interval), n_resamples=B, draws=draws)
        return interval, tuple(predicted.rows())
    except ValueError:
        return interval, None


def agreement_rows(n_prompts: int) -> slice | np.ndarray:
    """The prompts the agreement averages: all of them, or an evenly spaced ``MAX_AGREEMENT_PROMPTS``
    (its cost grows as P N log N; the SE, from the prompts used, says how sure it is).

    >>> agreement_rows(10), len(agreement_rows(10_000))
    (slice(None, None, None), 2048)
    """
    if n_prompts <= MAX_AGREEMENT_PROMPTS:
        return slice(None)
    return np.unique(np.linspace(0, n_prompts - 1, MAX_AGREEMENT_PROMPTS).round().astype(np.int64))


def alert_rules(alerts: AlertRules | Mapping[str, Any] | bool | None) -> AlertRules | None:
    """``BonTracker(alerts=...)``: None or True: the default rules; False: off; a mapping: settings."""
    if alerts is None or alerts is True:
        return AlertRules()
    if alerts is False:
        return None
    if isinstance(alerts, AlertRules):
        return alerts
    if isinstance(alerts, Mapping):
        return AlertRules.from_dict(alerts)
    raise TypeError(f"alerts must be None, False, an AlertRules or a mapping of settings, got {type(alerts).__name__}")


def check_stop_on_alert(stop_on_alert: bool | Sequence[str]) -> bool | frozenset[str]:
    """A trainer callback's ``stop_on_alert``: False, True (any rule) or rule names.

    >>> sorted(check_stop_on_alert(["goodhart_kl"]))
    ['goodhart_kl']
    """
    if isinstance(stop_on_alert, bool):
        return stop_on_alert
    if isinstance(stop_on_alert, str) or not isinstance(stop_on_alert, Sequence):
        raise TypeError(f"stop_on_alert must be true/false or a list of rule names, got {stop_on_alert!r:.60}")
    unknown = sorted(set(stop_on_alert) - set(RULES))
    if unknown:
        raise ValueError(f"stop_on_alert: unknown rule(s) {unknown}; known: {', '.join(RULES)}")
    return frozenset(stop_on_alert)


def alerts_that_stop(alerts: Sequence[Alert], stop_on_alert: bool | frozenset[str]) -> list[Alert]:
    """The onsets among ``alerts`` that ``stop_on_alert`` (from :func:`check_stop_on_alert`) stops training on."""
    if stop_on_alert is False:
        return []
    return [a for a in alerts if stop_on_alert is True or a.rule in stop_on_alert]


# ---- one sentence per alert ------------------------------------------------------------------


def _num(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else "unbounded"


def _n_star(n: float, kl: float, n_max: float) -> str:
    """n* in words (never "∞"): "n* = 1 (...)" when the true reward falls from the start,
    "n* ≈ 17.5", or "n* beyond n = 64" past the horizon (:func:`describe_n`)."""
    if n == 1.0 and kl == 0.0:
        return "n* = 1 (any selection on this proxy already lowers the true reward)"
    words = describe_n(n, n_max)
    return f"n* {words}" if words.startswith("beyond") or words == "unknown" else f"n* ≈ {words}"


def explain(
    alert: Alert,
    current: EvalSummary,
    earlier: EvalSummary | None,
    rules: AlertRules,
    reference: Mapping[str, float] | None,
) -> str:
    """One sentence saying what happened and what it means, from the numbers of the evals."""
    step = alert.step
    if alert.rule in ("policy_true_falls", "bon_true_falls"):
        n = 1 if alert.rule == "policy_true_falls" else (rules.bon_n or current.n[-1])
        now, then = current.at(n), earlier.at(n) if earlier is not None else None
        if now is None or then is None:
            return alert.message
        who = "the policy's true reward (n = 1)" if n == 1 else f"the true reward of best-of-{n}"
        return (
            f"At step {step} {who} fell by {_num(then[0] - now[0])} ({alert.value:.1f} SE) since step "
            f"{alert.reference_step} while the proxy rose by {_num(now[2] - then[2])}: more optimization "
            "is now hurting."
        )
    if alert.rule == "goodhart_kl":
        if alert.reference_step is None:
            return (
                f"At step {step} the policy's KL from its reference reached {_num(alert.value)} nats, the KL "
                f"budget of {_num(alert.threshold)} nats set for this run."
            )
        ref_n = reference.get("n", math.nan) if reference is not None else math.nan
        if math.isnan(ref_n):
            ref_n = float(kl_to_n(alert.threshold))
        n_max = reference.get("n_max", math.nan) if reference is not None else math.nan
        return (
            f"At step {step} the policy's KL from its reference ({_num(alert.value)} nats) reached the "
            f"Goodhart KL* = {_num(alert.threshold)} nats fitted on the best-of-n curve of step "
            f"{alert.reference_step} ({_n_star(ref_n, alert.threshold, n_max)}): past it, optimizing "
            "the proxy further is expected to lower the true reward."
        )
    if alert.rule == "headroom_shrinks" and reference is not None:
        now = _n_star(current.goodhart_n, current.goodhart_kl, float(max(current.n)))
        then = _n_star(reference["n"], reference["kl"], reference.get("n_max", math.nan))
        return (
            f"At step {step} the Goodhart point of best-of-n fell to {now} "
            f"(KL* {_num(current.goodhart_kl)} nats, interval up to {_num(current.goodhart_kl_high)}) from "
            f"{then} (KL* {_num(reference['kl'])} nats) at step {int(reference['step'])}: "
            "the proxy now stops tracking the true reward after far less selection."
        )
    return alert.message


# ---- the reporter -------------------------------------------------------------------------------


class AlertReporter:
    """The alert monitor of one tracker, its onsets so far, and how they are reported.

    Args:
        rules: the rules (:class:`AlertRules`).
        on_alert: called with each :class:`Alert` on the training thread, right after
            ``log_scores`` computed it; an exception in it is logged, never raised.
    """

    def __init__(self, rules: AlertRules, on_alert: AlertCallback | None = None):
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"on_alert must be a callable taking an Alert, got {type(on_alert).__name__}")
        self.rules = rules
        self.on_alert = on_alert
        self.monitor = AlertMonitor(rules)
        self.alerts: list[Alert] = []
        self._recent: list[EvalSummary] = []  # the last `window` summaries, for the sentences

    def update(
        self, step: int, curve: BonCurve, policy_kl: float | None, interval: GoodhartInterval | None
    ) -> tuple[list[Alert | AlertCleared], dict[str, int]]:
        """The events of this eval (onsets worded for people) and the 0/1 state of every enabled rule."""
        return self.update_summary(EvalSummary.from_curve(step, curve, policy_kl=policy_kl, interval=interval))

    def update_summary(self, summary: EvalSummary) -> tuple[list[Alert | AlertCleared], dict[str, int]]:
        """:meth:`update` from an eval's summary (e.g. one selection rule's curve under one true reward)."""
        events = self.monitor.update(summary)
        reference = self._reference()
        by_step = {s.step: s for s in self._recent}
        worded: list[Alert | AlertCleared] = []
        for event in events:
            if isinstance(event, Alert):
                earlier = by_step.get(event.reference_step) if event.reference_step is not None else None
                event = replace(event, message=explain(event, summary, earlier, self.rules, reference))
            worded.append(event)
        self._recent = [*self._recent, summary][-self.rules.window :]
        states = {key.rsplit("/", 1)[1]: int(value) for key, value in self.monitor.metrics().items()}
        return worded, states

    def report(self, events: Sequence[Alert | AlertCleared]) -> None:
        """Log each event, keep the onsets, call ``on_alert`` (training thread, after the record is logged)."""
        for event in events:
            if isinstance(event, AlertCleared):
                logger.info("bon_tracker: alert %s cleared at step %d (onset at step %d)", *_cleared(event))
                continue
            self.alerts.append(event)
            logger.warning("bon_tracker: alert %s: %s", event.rule, event.message)
            if self.on_alert is not None:
                try:
                    self.on_alert(event)
                except Exception:  # the user's callback never breaks training
                    logger.exception("bon_tracker: the on_alert callback raised on the %s alert", event.rule)

    def _reference(self) -> dict[str, float] | None:
        ref = self.monitor.state_dict()["reference"]
        return None if ref is None else {k: math.nan if v is None else float(v) for k, v in ref.items()}

    # ---- resume -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "monitor": self.monitor.state_dict(),
            "alerts": [a.to_dict() for a in self.alerts],
            "recent": [_plain(s.to_dict()) for s in self._recent],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown alert state version {state.get('version')!r}; expected {STATE_VERSION}")
        self.monitor.load_state_dict(state["monitor"])
        self.alerts = [Alert(**a) for a in state.get("alerts", [])]
        self._recent = [EvalSummary.from_dict(_unplain(s)) for s in state.get("recent", [])]


def _cleared(event: AlertCleared) -> tuple[str, int, int]:
    return event.rule, event.step, event.onset_step


def _plain(data: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats as strings, so the state is strict JSON."""
    return {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in data.items()}


def _unplain(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v) for k, v in data.items()}
