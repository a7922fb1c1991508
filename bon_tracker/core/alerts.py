"""Alerts: what Goodhart looks like while it happens (core decides, the tracker reports).

A pure state machine. The tracker builds one :class:`EvalSummary` per eval (plain
numbers: the best-of-n curve's means and standard errors, the policy's KL, the Goodhart
point and its interval) and calls :meth:`AlertMonitor.update`, which returns the events
of that eval: an :class:`Alert` at the onset of a condition (once per onset, not at every
eval) and an :class:`AlertCleared` when it ends. The state is JSON-able, so a resumed run
continues where it left off.

The rules (each on by default; thresholds in :class:`AlertRules`):

1. ``policy_true_falls``: the policy's true reward (n = 1) fell while its proxy rose, against
   some eval of the last ``window``: ``(true_j - true_t) / sqrt(se_j^2 + se_t^2) >= fall_z``
   and ``(proxy_t - proxy_j) / sqrt(...) >= rise_z`` for the same earlier eval j.
2. ``bon_true_falls``: the same at the deployment n (``bon_n``; default the largest n).
3. ``goodhart_kl``: the policy's KL reached the Goodhart KL fitted on the reference eval's
   best-of-n curve (Gao et al. 2022 compare RL and best-of-n on one KL axis), used only when
   that fit is measured: its KL* interval bounded and its upper end at most
   ``goodhart_kl_spread`` times the estimate; or the user's ``kl_budget``.
4. ``headroom_shrinks``: the headroom left to the current policy is all but gone. The
   current eval's best-of-n curve peaks by ``n = headroom_n`` at 95 % (the upper end of its
   n* interval is at most ``headroom_n``: more selection no longer raises true reward), the
   current KL* interval lies entirely below the reference's (the Goodhart point fell
   significantly), and the point estimate fell to at most ``headroom_ratio`` of the
   reference's. As the policy nears its own true peak, n* of its best-of-n curve falls to
   1, so this rule sees the peak coming; a run whose Goodhart point shrinks but stays far
   (n* of tens or more: true still rising) does not trigger it. ``n* = 1`` (``KL* = 0``: the
   true reward falls from the start, any selection on the proxy lowers it) is the smallest
   headroom there is, never a missing value; a reference that is itself at ``n* = 1`` has
   no headroom left to shrink.

Messages never print an n* as a number past ``GOODHART_HORIZON`` times the largest n of
its eval (an extrapolation of the fit): they say "beyond n = 64" (:func:`describe_n`).

Example:
    >>> monitor = AlertMonitor(AlertRules(fall_z=2.0, window=2))
    >>> def summary(step, true, proxy):
    ...     return EvalSummary(step, n=(1,), true_mean=(true,), true_se=(0.1,),
    ...                        proxy_mean=(proxy,), proxy_se=(0.1,))
    >>> monitor.update(summary(0, 1.0, 0.0)), monitor.update(summary(1, 1.2, 0.5))
    ([], [])
    >>> [event.rule for event in monitor.update(summary(2, 0.8, 1.0))]
    ['policy_true_falls', 'bon_true_falls']
    >>> monitor.update(summary(3, 0.7, 1.2))  # still falling: no second onset
    []
    >>> [event.kind for event in monitor.update(summary(4, 1.3, 1.3))]
    ['clear', 'clear']
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from bon_tracker.core.fit import goodhart_horizon
from bon_tracker.core.validation import as_float

RULES = ("policy_true_falls", "bon_true_falls", "goodhart_kl", "headroom_shrinks")
STATE_VERSION = 1
# The alert section of the metric names: bon_tracker.record.METRIC_SECTIONS["alert"] (core imports no record).
ALERT_SECTION = "7_alert"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class AlertRules:
    """Thresholds of the alert rules. Every rule is on by default.

    The defaults are calibrated in ``benchmarks/bench_alerts.py`` on the documented family of
    simulated runs (:mod:`bon_tracker.core.simulation`); see ``docs/alerts.md`` for the
    measured detection delays and false-alarm rates.

    Attributes:
        policy_true_falls: rule 1 on/off (true falls while proxy rises, n = 1).
        bon_true_falls: rule 2 on/off (the same at ``bon_n``).
        goodhart_kl: rule 3 on/off (policy KL reaches the Goodhart KL or ``kl_budget``).
        headroom_shrinks: rule 4 on/off (the Goodhart point n* falls significantly).
        window: rules 1-2 compare the current eval with each of the last ``window`` evals.
        fall_z: rules 1-2: how many standard errors true must have fallen.
        rise_z: rules 1-2: how many standard errors proxy must have risen (0: any rise).
        bon_n: rule 2's deployment n; None: the largest n of the grid.
        kl_budget: rule 3 also fires when the policy KL reaches this many nats; None: off.
        reference_step: the eval whose Goodhart point rules 3-4 compare with; None: the
            first eval that has one.
        goodhart_kl_spread: rule 3 uses the reference's Goodhart KL only when the upper end
            of its interval is at most this many times the estimate (a peak measured within
            a factor, not merely "bounded"); inf: any bounded interval.
        headroom_n: rule 4: the upper end of the current n* interval must be at most this n
            (KL*_high <= log n - (n - 1)/n nats); inf: no such condition.
        headroom_ratio: rule 4: the current KL* must be at most this fraction of the
            reference's, with the intervals apart.
        clear_after: an active alert clears after this many consecutive evals without
            its condition.
    """

    policy_true_falls: bool = True
    bon_true_falls: bool = True
    goodhart_kl: bool = True
    headroom_shrinks: bool = True
    window: int = 3
    fall_z: float = 3.0
    rise_z: float = 0.0
    bon_n: int | None = None
    kl_budget: float | None = None
    reference_step: int | None = None
    goodhart_kl_spread: float = 10.0
    headroom_n: float = 3.0
    headroom_ratio: float = 0.25
    clear_after: int = 1

    def __post_init__(self) -> None:
        for name in ("fall_z", "rise_z", "goodhart_kl_spread", "headroom_n", "headroom_ratio", "kl_budget"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                as_float(value, f"AlertRules.{name}")  # 10**400: a ValueError naming the setting, not an OverflowError
        for name in RULES:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AlertRules.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("window", "clear_after"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AlertRules.{name} must be an integer >= 1, got {value!r}")
        for name in ("fall_z", "rise_z"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"AlertRules.{name} must be a finite number >= 0, got {value!r}")
        if not _is_number(self.goodhart_kl_spread) or not self.goodhart_kl_spread > 1:
            raise ValueError(
                f"AlertRules.goodhart_kl_spread must be a number > 1 (or inf), got {self.goodhart_kl_spread!r}"
            )
        if not _is_number(self.headroom_n) or not self.headroom_n >= 1:
            raise ValueError(f"AlertRules.headroom_n must be a number >= 1 (or inf), got {self.headroom_n!r}")
        if not _is_number(self.headroom_ratio) or not 0 < self.headroom_ratio <= 1:
            raise ValueError(f"AlertRules.headroom_ratio must be in (0, 1], got {self.headroom_ratio!r}")
        bad_n = not isinstance(self.bon_n, int) or isinstance(self.bon_n, bool) or self.bon_n < 1
        if self.bon_n is not None and bad_n:
            raise ValueError(f"AlertRules.bon_n must be an integer >= 1 or None, got {self.bon_n!r}")
        if self.kl_budget is not None and (not _is_number(self.kl_budget) or not self.kl_budget > 0):
            raise ValueError(f"AlertRules.kl_budget must be a number > 0 (nats) or None, got {self.kl_budget!r}")
        if self.reference_step is not None and (
            not isinstance(self.reference_step, int) or isinstance(self.reference_step, bool)
        ):
            raise ValueError(f"AlertRules.reference_step must be an integer or None, got {self.reference_step!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> AlertRules:
        """Rules from a plain mapping (YAML, env), unknown keys rejected.

        Integers given as floats (``3.0``) and numbers given as strings (``"3"``, from
        environment variables) are converted; booleans accept ``true/false/1/0/yes/no/on/off``.

        Example:
            >>> AlertRules.from_dict({"fall_z": "2.5", "headroom_shrinks": "off"}).fall_z
            2.5
            >>> AlertRules.from_dict({"fall": 2})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            ValueError: unknown alert setting 'fall'; known: bon_n, bon_true_falls, clear_after, fall_z, ...
        """
        if config is None:
            return cls()
        if not isinstance(config, Mapping):
            raise TypeError(f"alert settings must be a mapping, got {type(config).__name__}")
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in config.items():
            if key not in known:
                raise ValueError(f"unknown alert setting {key!r}; known: {', '.join(sorted(known))}")
            kwargs[key] = _coerce(key, value, cls.__dataclass_fields__[key].default)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Plain values; ``AlertRules.from_dict(rules.to_dict()) == rules``."""
        return asdict(self)


_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Map a config value onto the field's type; errors name the setting."""
    if isinstance(value, str):
        text = value.strip().lower()
        if isinstance(default, bool):
            if text in _TRUE_WORDS | _FALSE_WORDS:
                return text in _TRUE_WORDS
            raise ValueError(f"alert setting {key!r} must be true or false, got {value!r}")
        if text in ("none", "null", ""):
            return None
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"alert setting {key!r} must be a number, got {value!r}") from None
        value = number
    if isinstance(value, float) and key in ("window", "clear_after", "bon_n", "reference_step"):
        if not value.is_integer():
            raise ValueError(f"alert setting {key!r} must be an integer, got {value!r}")
        return int(value)
    return value


@dataclass(frozen=True)
class Alert:
    """The onset of an alert condition at one eval.

    Attributes:
        step: the eval step of the onset.
        rule: one of :data:`RULES`.
        message: one line for a person.
        value: the statistic that crossed (rules 1-2: a z-score; 3: the policy KL; 4: the upper
            end of the current KL* interval, nats).
        threshold: what it crossed (rule 4: the KL of best-of-``headroom_n``).
        reference_step: the eval compared with (rules 1-2: the earlier eval; 3-4: the
            reference eval), or None.
    """

    step: int
    rule: str
    message: str
    value: float
    threshold: float
    reference_step: int | None = None
    kind: Literal["onset"] = "onset"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AlertCleared:
    """An active alert's condition ended (after ``clear_after`` evals without it)."""

    step: int
    rule: str
    onset_step: int
    message: str
    kind: Literal["clear"] = "clear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


AlertEvent = Alert | AlertCleared


@dataclass(frozen=True)
class EvalSummary:
    """What the alert rules read from one eval: plain numbers.

    Per-n fields have one entry per n of ``n`` (the curve's grid). The Goodhart fields are
    the fitted point and its interval on this eval's best-of-n curve (inf: no peak, NaN:
    not fitted); :meth:`from_curve` fills them from a :class:`GoodhartInterval`.
    """

    step: int
    n: tuple[int, ...]
    true_mean: tuple[float, ...]
    true_se: tuple[float, ...]
    proxy_mean: tuple[float, ...]
    proxy_se: tuple[float, ...]
    policy_kl: float | None = None
    goodhart_kl: float = math.nan
    goodhart_kl_low: float = math.nan
    goodhart_kl_high: float = math.nan
    goodhart_n: float = math.nan
    goodhart_n_low: float = math.nan
    goodhart_n_high: float = math.nan

    def __post_init__(self) -> None:
        G = len(self.n)
        for name in ("true_mean", "true_se", "proxy_mean", "proxy_se"):
            if len(getattr(self, name)) != G:
                raise ValueError(f"EvalSummary.{name} needs one value per n ({G}), got {len(getattr(self, name))}")
        if G == 0:
            raise ValueError("EvalSummary needs at least one n")

    @classmethod
    def from_curve(cls, step: int, curve: Any, *, policy_kl: float | None = None, interval: Any = None) -> EvalSummary:
        """From a :class:`BonCurve`, the policy KL and a :class:`GoodhartInterval` (or None)."""
        extra: dict[str, float] = {}
        if interval is not None:
            for key in ("kl", "kl_low", "kl_high", "n", "n_low", "n_high"):
                extra[f"goodhart_{key}"] = float(getattr(interval, key))
        return cls(
            step=int(step),
            n=tuple(int(v) for v in curve.n),
            true_mean=tuple(float(v) for v in curve.true_mean),
            true_se=tuple(float(v) for v in curve.true_se),
            proxy_mean=tuple(float(v) for v in curve.proxy_mean),
            proxy_se=tuple(float(v) for v in curve.proxy_se),
            policy_kl=None if policy_kl is None else as_float(policy_kl, "policy_kl"),
            **extra,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalSummary:
        kwargs = dict(data)
        for key in ("n", "true_mean", "true_se", "proxy_mean", "proxy_se"):
            kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("n", "true_mean", "true_se", "proxy_mean", "proxy_se"):
            out[key] = list(out[key])
        return out

    def at(self, n: int | None) -> tuple[float, float, float, float] | None:
        """``(true, true_se, proxy, proxy_se)`` at n (None: the largest n); None if n is not on the grid."""
        index = len(self.n) - 1 if n is None else (self.n.index(n) if n in self.n else None)
        if index is None:
            return None
        return self.true_mean[index], self.true_se[index], self.proxy_mean[index], self.proxy_se[index]


def describe_n(n: float, n_max: float = math.nan) -> str:
    """An n* in words for messages: ``"1"`` (the true reward falls from the start), a number,
    or ``"beyond n = <horizon>"`` past :func:`~bon_tracker.core.fit.goodhart_horizon` of the
    largest measured n ``n_max`` (never "inf" or "∞"); ``"unknown"`` for NaN.

    >>> describe_n(1.0), describe_n(17.53, 32), describe_n(4.3e7, 16), describe_n(math.inf)
    ('1', '17.5', 'beyond n = 64', 'beyond the measured range')
    """
    if math.isnan(n):
        return "unknown"
    horizon = goodhart_horizon(n_max) if math.isfinite(n_max) else math.inf
    if math.isinf(n) or n > horizon:
        return f"beyond n = {horizon:.0f}" if math.isfinite(horizon) else "beyond the measured range"
    return f"{n:.3g}"


def _kl_of_n(n: float) -> float:
    """KL of best-of-n for a continuous proxy, ``log n - (n - 1)/n`` (inf for inf)."""
    return math.inf if math.isinf(n) else math.log(n) - (n - 1.0) / n


def _fall_statistic(history: Sequence[Sequence[float]], current: Sequence[float], rise_z: float):
    """Largest z of a true fall against an earlier eval where proxy rose by >= rise_z SEs.

    history/current rows: ``(step, true, true_se, proxy, proxy_se)``. Returns ``(z, step)``.
    """
    best_z, best_step = -math.inf, None
    _, t1, s1, p1, q1 = current
    for step, t0, s0, p0, q0 in history:
        true_sd = math.sqrt(s0 * s0 + s1 * s1)
        proxy_sd = math.sqrt(q0 * q0 + q1 * q1)
        if not (true_sd > 0 and math.isfinite(true_sd)):
            continue
        rise = (p1 - p0) / proxy_sd if proxy_sd > 0 else (math.inf if p1 > p0 else -math.inf)
        if rise < rise_z or not rise > 0:
            continue
        z = (t0 - t1) / true_sd
        if z > best_z:
            best_z, best_step = z, int(step)
    return best_z, best_step


@dataclass
class AlertMonitor:
    """The alert state machine: feed one :class:`EvalSummary` per eval, in step order.

    Pure (no I/O, no clock): the same summaries give the same events. ``state_dict`` /
    ``load_state_dict`` round-trip through JSON.
    """

    rules: AlertRules = field(default_factory=AlertRules)

    def __post_init__(self) -> None:
        self._history: dict[str, list[list[float]]] = {"policy": [], "bon": []}
        self._reference: dict[str, float] | None = None
        self._active: dict[str, dict[str, Any]] = {}
        self._last_step: int | None = None

    # ---- the state machine -------------------------------------------------------------
    def update(self, summary: EvalSummary | Mapping[str, Any]) -> list[AlertEvent]:
        """Read one eval's summary; return the onsets and clears at this eval.

        Raises:
            ValueError: when the step does not increase (a resumed run replaying old
                evals should skip steps up to :attr:`last_step`).
        """
        if not isinstance(summary, EvalSummary):
            summary = EvalSummary.from_dict(summary)
        if self._last_step is not None and summary.step <= self._last_step:
            raise ValueError(
                f"AlertMonitor got step {summary.step} after step {self._last_step}; "
                "feed evals in increasing step order (after a resume, skip steps <= monitor.last_step)"
            )
        self._last_step = int(summary.step)
        conditions = self._conditions(summary)
        events: list[AlertEvent] = []
        for rule in RULES:
            found = conditions.get(rule)
            active = self._active.get(rule)
            if found is not None and active is None:
                alert = Alert(summary.step, rule, *found)
                self._active[rule] = {"onset_step": summary.step, "quiet": 0, "message": alert.message}
                events.append(alert)
            elif found is not None and active is not None:
                active["quiet"] = 0
            elif found is None and active is not None:
                active["quiet"] += 1
                if active["quiet"] >= self.rules.clear_after:
                    del self._active[rule]
                    events.append(
                        AlertCleared(
                            summary.step,
                            rule,
                            int(active["onset_step"]),
                            f"{rule} cleared at step {summary.step} (onset at step {active['onset_step']})",
                        )
                    )
        return events

    def _conditions(self, s: EvalSummary) -> dict[str, tuple[str, float, float, int | None]]:
        r = self.rules
        out: dict[str, tuple[str, float, float, int | None]] = {}
        # rules 1-2: true falls while proxy rises, against the last `window` evals
        for rule, key, n in (("policy_true_falls", "policy", 1), ("bon_true_falls", "bon", r.bon_n)):
            point = s.at(n)
            if point is None:
                continue
            current = [float(s.step), *point]
            history = self._history[key]
            if getattr(r, rule) and history:
                z, ref = _fall_statistic(history, current, r.rise_z)
                if z >= r.fall_z:
                    where = "the policy (n = 1)" if key == "policy" else f"best-of-{n or s.n[-1]}"
                    message = (
                        f"true reward of {where} fell {z:.1f} SE since step {ref} while the proxy rose "
                        f"(true {history[[h[0] for h in history].index(ref)][1]:.4g} -> {point[0]:.4g})"
                    )
                    out[rule] = (message, z, r.fall_z, ref)
            if all(math.isfinite(v) for v in point):
                history.append(current)
                del history[: -r.window]
        # the reference Goodhart point (rules 3-4)
        if (
            self._reference is None
            and not math.isnan(s.goodhart_kl)
            and (r.reference_step is None or s.step >= r.reference_step)
        ):
            self._reference = {
                "step": float(s.step),
                "kl": s.goodhart_kl,
                "kl_low": s.goodhart_kl_low,
                "kl_high": s.goodhart_kl_high,
                "n": s.goodhart_n,
                "n_max": float(max(s.n)),
            }
        ref = self._reference
        if r.goodhart_kl and s.policy_kl is not None and math.isfinite(s.policy_kl):
            # the reference's Goodhart KL is used only when measured: bounded, and within a factor
            measured = ref is not None and math.isfinite(ref["kl_high"])
            measured = measured and ref["kl_high"] <= r.goodhart_kl_spread * ref["kl"]
            if measured and s.policy_kl >= ref["kl"]:
                out["goodhart_kl"] = (
                    f"policy KL {s.policy_kl:.3g} nats reached the Goodhart KL {ref['kl']:.3g} fitted at step "
                    f"{int(ref['step'])} (best-of-n peak n* {_n_phrase(ref)}): past it, true reward falls",
                    s.policy_kl,
                    ref["kl"],
                    int(ref["step"]),
                )
            elif r.kl_budget is not None and s.policy_kl >= r.kl_budget:
                out["goodhart_kl"] = (
                    f"policy KL {s.policy_kl:.3g} nats reached the KL budget {r.kl_budget:.3g}",
                    s.policy_kl,
                    float(r.kl_budget),
                    None,
                )
        if r.headroom_shrinks and ref is not None and s.step > ref["step"] and math.isfinite(s.goodhart_kl_high):
            ratio = s.goodhart_kl / ref["kl"] if 0 < ref["kl"] < math.inf else (0.0 if ref["kl"] > 0 else math.inf)
            floor = _kl_of_n(r.headroom_n)
            if s.goodhart_kl_high < ref["kl_low"] and s.goodhart_kl_high <= floor and ratio <= r.headroom_ratio:
                now = {"n": s.goodhart_n, "kl": s.goodhart_kl, "n_max": float(max(s.n))}
                out["headroom_shrinks"] = (
                    f"headroom all but gone: best-of-n now peaks by n = {r.headroom_n:.3g} (n* {_n_phrase(now)}, "
                    f"KL* {s.goodhart_kl:.3g} nats, interval up to {s.goodhart_kl_high:.3g}), down from "
                    f"KL* {ref['kl']:.3g} (n* {_n_phrase(ref)}, interval from {ref['kl_low']:.3g}) at step "
                    f"{int(ref['step'])}: the policy is at or near its true peak",
                    s.goodhart_kl_high,
                    floor,
                    int(ref["step"]),
                )
        return out

    # ---- what the tracker reports ------------------------------------------------------
    @property
    def active(self) -> dict[str, int]:
        """Active alerts: rule -> onset step."""
        return {rule: int(state["onset_step"]) for rule, state in self._active.items()}

    @property
    def last_step(self) -> int | None:
        """The step of the last summary read (None before the first)."""
        return self._last_step

    def metrics(self, prefix: str = "bon") -> dict[str, float]:
        """``{prefix}/7_alert/{rule}``: 1.0 while the rule's alert is active, else 0.0, for every
        enabled rule; the tracker's metric names (``bon_tracker.record.metric_key("alert", rule)``)."""
        enabled = [rule for rule in RULES if getattr(self.rules, rule)]
        return {f"{prefix}/{ALERT_SECTION}/{rule}": 1.0 if rule in self._active else 0.0 for rule in enabled}

    # ---- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state (infinities as the strings ``"inf"``/``"-inf"``, NaN as None)."""
        return {
            "version": STATE_VERSION,
            "rules": self.rules.to_dict(),
            "history": {k: [[_encode(v) for v in row] for row in rows] for k, rows in self._history.items()},
            "reference": None if self._reference is None else {k: _encode(v) for k, v in self._reference.items()},
            "active": {rule: dict(state) for rule, state in self._active.items()},
            "last_step": self._last_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The rules stay those of this monitor."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unknown AlertMonitor state version {state.get('version')!r}; expected {STATE_VERSION}")
        self._history = {k: [[_decode(v) for v in row] for row in rows] for k, rows in state["history"].items()}
        self._reference = None if state["reference"] is None else {k: _decode(v) for k, v in state["reference"].items()}
        self._active = {rule: dict(value) for rule, value in state["active"].items()}
        self._last_step = state["last_step"]


def _n_phrase(point: Mapping[str, float]) -> str:
    """``"= 1: ..."`` / ``"= 17.5"`` / ``"beyond n = 64"`` for a point ``{"n", "kl", "n_max"}``."""
    n, n_max = float(point["n"]), float(point.get("n_max", math.nan))
    if n == 1.0 and point.get("kl", math.nan) == 0.0:
        return "= 1: any selection on this proxy already lowers the true reward"
    words = describe_n(n, n_max)
    return words if words.startswith("beyond") else f"= {words}"


def _encode(value: float) -> float | str | None:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _decode(value: float | str | None) -> float:
    return math.nan if value is None else float(value)
