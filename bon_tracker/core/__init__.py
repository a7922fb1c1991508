"""Pure numerical core: estimators, KL, fits. Imports numpy and scipy only."""

from bon_tracker.core.accumulator import (
    CurveAccumulator,
    CurveStats,
    curve_stats_compute,
    curve_stats_update,
    empty_curve_stats,
    merge_curve_stats,
)
from bon_tracker.core.agreement import TopAgreement, topq_agreement
from bon_tracker.core.alerts import Alert, AlertCleared, AlertMonitor, AlertRules, EvalSummary
from bon_tracker.core.curve import BonCurve, CurveParts, bon_curve, bon_curve_parts, curve_stats, default_ns
from bon_tracker.core.estimators import bon_estimate, mc_bon_estimate
from bon_tracker.core.fit import FunctionalFit, OveroptimizationFit, fit_overoptimization, fit_rl_overoptimization
from bon_tracker.core.frontier import FrontierPoint, best_at_budgets
from bon_tracker.core.hedge import HedgedOptimum, bon_derivative, curve_argmax, derivative_root
from bon_tracker.core.kl import kl_bon, kl_bon_discrete, kl_bon_empirical
from bon_tracker.core.poisson import bop_rank_weights, kl_bop, poisson_n_coefficients
from bon_tracker.core.prediction import CurvePrediction, predict_curve
from bon_tracker.core.selection import (
    ENSEMBLE_RULES,
    SelectionInput,
    aggregate_members,
    check_members,
    rule_scores,
    selection_input,
)
from bon_tracker.core.selection_stats import (
    FamilyCurve,
    RuleStatistics,
    SelectionStatistics,
    compute_selection_statistics,
)
from bon_tracker.core.soft_bon import SoftBonEstimates, soft_bon_estimates
from bon_tracker.core.uncertainty import BootstrapDraws, GoodhartInterval, goodhart_interval, kl_to_n
from bon_tracker.core.weights import bon_weights
from bon_tracker.core.win_rate import BonWinRate, bon_win_rate

__all__ = [
    "ENSEMBLE_RULES",
    "Alert",
    "AlertCleared",
    "AlertMonitor",
    "AlertRules",
    "BonCurve",
    "BonWinRate",
    "BootstrapDraws",
    "CurveAccumulator",
    "CurveParts",
    "CurvePrediction",
    "CurveStats",
    "EvalSummary",
    "FamilyCurve",
    "FrontierPoint",
    "FunctionalFit",
    "GoodhartInterval",
    "HedgedOptimum",
    "OveroptimizationFit",
    "RuleStatistics",
    "SelectionInput",
    "SelectionStatistics",
    "SoftBonEstimates",
    "TopAgreement",
    "aggregate_members",
    "best_at_budgets",
    "bon_curve",
    "bon_curve_parts",
    "bon_derivative",
    "bon_estimate",
    "bon_weights",
    "bon_win_rate",
    "bop_rank_weights",
    "check_members",
    "compute_selection_statistics",
    "curve_argmax",
    "curve_stats",
    "curve_stats_compute",
    "curve_stats_update",
    "default_ns",
    "derivative_root",
    "empty_curve_stats",
    "fit_overoptimization",
    "fit_rl_overoptimization",
    "goodhart_interval",
    "kl_bon",
    "kl_bon_discrete",
    "kl_bon_empirical",
    "kl_bop",
    "kl_to_n",
    "mc_bon_estimate",
    "merge_curve_stats",
    "poisson_n_coefficients",
    "predict_curve",
    "rule_scores",
    "selection_input",
    "soft_bon_estimates",
    "topq_agreement",
]
