"""Selection statistics at an eval: the tracker's entry points (the mathematics lives in core).

Two calls, on two threads:

* :func:`check_members` runs **on the training thread** inside ``log_scores``: it only
  validates and normalises the members (a few array checks, no sort), so a bad input fails
  where the user passed it, with the member and prompt named.
* :func:`selection_statistics` runs **off the training thread** (the statistics path, before
  delivery): every rule x true reward x family, optima, Gao's point and the frontier, as one
  JSON-able :class:`SelectionStatistics` for the eval record.

Alerts per rule: :func:`selection_alert_summaries` gives one
:class:`~bon_tracker.core.alerts.EvalSummary` per (rule, true reward), each from that
rule's best-of-n curve and Goodhart interval. Feed each to its own
:class:`~bon_tracker.core.alerts.AlertMonitor` (keyed by ``(rule, true)``), so that a user
who deploys ``worst`` of 5 members is alerted on that rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from bon_tracker.core.alerts import Alert, AlertCleared, AlertRules, EvalSummary
from bon_tracker.core.selection import DEFAULT_UWO_LAMBDA, Rows, selection_input
from bon_tracker.core.selection import check_members as _check_members
from bon_tracker.core.selection_stats import RuleStatistics, SelectionStatistics, compute_selection_statistics
from bon_tracker.core.soft_bon import DEFAULT_LAMBDAS
from bon_tracker.core.validation import NanPolicy
from bon_tracker.tracking.alerting import AlertReporter

__all__ = [
    "RuleStatistics",
    "SelectionStatistics",
    "alerts_by_true",
    "check_members",
    "selection_alert_summaries",
    "selection_statistics",
]


def check_members(proxy: object, *, nan_policy: NanPolicy = "raise") -> tuple[tuple[str, ...], Rows]:
    """Validate several proxy scores per sample (a mapping, a ``(K, P, N)`` array or a list of members).

    Same rules as :func:`bon_tracker.core.validation.paired_scores`: ragged prompts allowed,
    NaN by ``nan_policy``; errors name the member, the prompt and the sample that are wrong.

    Returns:
        ``(names, rows)``: ``(K, P, N)`` float64, or one ``(K, N_p)`` array per prompt.

    Example:
        >>> names, rows = check_members({"rm_a": [[0.1, 0.9]], "rm_b": [[0.3, 0.2]]})
        >>> names, rows.shape
        (('rm_a', 'rm_b'), (2, 1, 2))
    """
    return _check_members(proxy, nan_policy=nan_policy)


def selection_statistics(
    members: object,
    trues: object,
    *,
    rules: Sequence[str] | None = None,
    ns: object | None = None,
    lambdas: object = DEFAULT_LAMBDAS,
    mus: object | None = None,
    soft_n: int | None = None,
    uwo_lambda: float = DEFAULT_UWO_LAMBDA,
    n_subsets: int = 32,
    n_resamples: int = 500,
    seed: int = 0,
    nan_policy: NanPolicy = "raise",
    true_range: tuple[float, float] | None = None,
) -> SelectionStatistics:
    """Every selection rule's curves, optima and the reward-KL frontier of one eval. Off the training thread.

    Args:
        members: proxy scores per member: ``{name: (P, N)}``, ``(K, P, N)``, a list of members,
            or one ``(P, N)`` proxy (ragged prompts allowed).
        trues: true rewards in the same forms (``{name: (P, N)}`` for several).
        rules: which rules (ensemble rules ``mean``, ``worst``, ``uwo`` and member names);
            default every member alone and, with two members or more, the three ensemble rules.
        ns: the best-of-n grid; default powers of two up to N, plus N.
        lambdas: soft best-of-n standardised lambdas (0 = base, inf = best-of-n).
        mus: Best-of-Poisson grid (n = 1 + Poisson(mu)); default 0 and powers of two up to N.
        soft_n: candidates per soft pick; default a quarter of the smallest N, between 1 and 64.
        uwo_lambda: UWO's variance penalty (population variance over members).
        n_subsets: random candidate subsets per prompt for soft best-of-n.
        n_resamples: bootstrap resamples of prompts (shared by every interval).
        seed: fixes the subsets and resamples.
        nan_policy: ``"raise"`` or ``"omit"`` (a sample dropped where any member or true reward is non-finite).
        true_range: a known ``(min, max)`` of the true reward for Best-of-Poisson's truncation bound.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> true = rng.standard_normal((50, 16))
        >>> members = {f"rm{k}": true + rng.standard_normal((50, 16)) for k in range(3)}
        >>> stats = selection_statistics(members, {"gold": true}, n_resamples=50)
        >>> stats.rules
        ('rm0', 'rm1', 'rm2', 'mean', 'worst', 'uwo')
        >>> SelectionStatistics.from_json(stats.to_json()).to_json() == stats.to_json()
        True
    """
    inp = selection_input(members, trues, nan_policy=nan_policy)
    return compute_selection_statistics(
        inp,
        rules=rules,
        ns=ns,
        lambdas=lambdas,
        mus=mus,
        soft_n=soft_n,
        uwo_lambda=uwo_lambda,
        n_subsets=n_subsets,
        n_resamples=n_resamples,
        seed=seed,
        true_range=true_range,
    )


def selection_alert_summaries(
    stats: SelectionStatistics, step: int, *, policy_kl: float | None = None
) -> dict[tuple[str, str], EvalSummary]:
    """One :class:`EvalSummary` per ``(rule, true reward)``: that rule's best-of-n curve and Gao interval.

    Keep one :class:`~bon_tracker.core.alerts.AlertMonitor` per key and call
    ``monitors[key].update(summaries[key])`` at each eval (its state_dict per key for resume).

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(1)
        >>> t = rng.standard_normal((20, 8))
        >>> stats = selection_statistics({"a": t + rng.standard_normal((20, 8)), "b": t}, t, n_resamples=20)
        >>> sorted(selection_alert_summaries(stats, 0))[:2]
        [('a', 'true'), ('b', 'true')]
    """
    out = {}
    for s in stats.statistics:
        bon = s.curve("bon")
        extra = {
            f"goodhart_{k}": float(s.gao.get(k, float("nan")))
            for k in ("kl", "kl_low", "kl_high", "n", "n_low", "n_high")
        }
        out[(s.rule, s.true_name)] = EvalSummary(
            step=int(step),
            n=tuple(int(v) for v in bon.values),
            true_mean=bon.true_mean,
            true_se=bon.true_se,
            proxy_mean=bon.proxy_mean,
            proxy_se=bon.proxy_se,
            policy_kl=policy_kl,
            **extra,
        )
    return out


def alerts_by_true(
    stats: SelectionStatistics,
    step: int,
    deployed: str,
    rules: AlertRules,
    reporters: dict[str, AlertReporter],
    *,
    policy_kl: float | None = None,
) -> tuple[list[Alert | AlertCleared], dict[str, int]]:
    """The alert rules on the ``deployed`` rule's curve under each true reward after the first
    (the first is the record's own curve), one reporter per true reward kept in ``reporters``.
    Onsets are worded ``[true reward 'name'] ...``; states are named ``<true reward>/<rule>``."""
    if len(stats.true_names) < 2:
        return [], {}
    summaries = selection_alert_summaries(stats, step, policy_kl=policy_kl)
    events: list[Alert | AlertCleared] = []
    states: dict[str, int] = {}
    for name in stats.true_names[1:]:
        if (deployed, name) not in summaries:
            continue  # the deployed rule is not among the configured selection rules
        reporter = reporters.setdefault(name, AlertReporter(rules))
        found, found_states = reporter.update_summary(summaries[(deployed, name)])
        label = f"[true reward {name!r}] "
        events += [replace(e, message=label + e.message) if isinstance(e, Alert) else e for e in found]
        states.update({f"{name}/{rule}": value for rule, value in found_states.items()})
    return events, states
