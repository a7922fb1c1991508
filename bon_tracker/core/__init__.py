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
from bon_tracker.core.curve import BonCurve, bon_curve, curve_stats, default_ns
from bon_tracker.core.estimators import bon_estimate, mc_bon_estimate
from bon_tracker.core.fit import FunctionalFit, OveroptimizationFit, fit_overoptimization, fit_rl_overoptimization
from bon_tracker.core.kl import kl_bon, kl_bon_discrete, kl_bon_empirical
from bon_tracker.core.prediction import CurvePrediction, predict_curve
from bon_tracker.core.uncertainty import GoodhartInterval, goodhart_interval, kl_to_n
from bon_tracker.core.weights import bon_weights
from bon_tracker.core.win_rate import BonWinRate, bon_win_rate

__all__ = [
    "Alert",
    "AlertCleared",
    "AlertMonitor",
    "AlertRules",
    "BonCurve",
    "BonWinRate",
    "CurveAccumulator",
    "CurvePrediction",
    "CurveStats",
    "EvalSummary",
    "FunctionalFit",
    "GoodhartInterval",
    "OveroptimizationFit",
    "TopAgreement",
    "bon_curve",
    "bon_estimate",
    "bon_weights",
    "bon_win_rate",
    "curve_stats",
    "curve_stats_compute",
    "curve_stats_update",
    "default_ns",
    "empty_curve_stats",
    "fit_overoptimization",
    "fit_rl_overoptimization",
    "goodhart_interval",
    "kl_bon",
    "kl_bon_discrete",
    "kl_bon_empirical",
    "kl_to_n",
    "mc_bon_estimate",
    "merge_curve_stats",
    "predict_curve",
    "topq_agreement",
]
