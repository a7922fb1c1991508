"""bon_tracker: best-of-n curves for seeing Goodhart's law coming.

>>> import bon_tracker
>>> curve = bon_tracker.bon_curve([[0.2, 0.9, 0.4]], [[1.0, 0.0, 2.0]])
>>> curve.true_mean.round(4).tolist()
[1.0, 0.6667, 0.0]
"""

from bon_tracker.backends.base import Backend
from bon_tracker.core import (
    BonCurve,
    BonWinRate,
    FunctionalFit,
    OveroptimizationFit,
    bon_curve,
    bon_curve_parts,
    bon_estimate,
    bon_weights,
    bon_win_rate,
    default_ns,
    fit_overoptimization,
    fit_rl_overoptimization,
    kl_bon,
    kl_bon_discrete,
    mc_bon_estimate,
)
from bon_tracker.record import EvalRecord
from bon_tracker.tracking.tracker import BonTracker
from bon_tracker.version import __version__

__all__ = [
    "Backend",
    "BonCurve",
    "BonTracker",
    "BonWinRate",
    "EvalRecord",
    "FunctionalFit",
    "OveroptimizationFit",
    "__version__",
    "bon_curve",
    "bon_curve_parts",
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
