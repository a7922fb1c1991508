"""Pure numerical core: estimators, KL, fits. Imports numpy and scipy only."""

from bon_tracker.core.curve import BonCurve, bon_curve, default_ns
from bon_tracker.core.estimators import bon_estimate, mc_bon_estimate
from bon_tracker.core.fit import FunctionalFit, OveroptimizationFit, fit_overoptimization, fit_rl_overoptimization
from bon_tracker.core.kl import kl_bon, kl_bon_discrete
from bon_tracker.core.weights import bon_weights
from bon_tracker.core.win_rate import BonWinRate, bon_win_rate

__all__ = [
    "BonCurve",
    "BonWinRate",
    "FunctionalFit",
    "OveroptimizationFit",
    "bon_curve",
    "bon_estimate",
    "bon_weights",
    "bon_win_rate",
    "default_ns",
    "fit_overoptimization",
    "fit_rl_overoptimization",
    "kl_bon",
    "kl_bon_discrete",
    "mc_bon_estimate",
]
