"""paperhooks plugin ``ctrl-u``: Zhang et al., ICLR 2025, uncertainty-aware loss weighting.

Importing the package also registers the dataset ``digits-ambiguous`` (:mod:`.data`): digits
whose most ambiguous training images carry wrong labels (label noise that depends on x).
"""

from paperhooks_ctrl_u import data
from paperhooks_ctrl_u.data import DigitsAmbiguousConfig, ambiguous_labels
from paperhooks_ctrl_u.functional import (
    U_MAX,
    check_finite,
    ctrl_u_objective,
    effective_sample_size,
    kl_uncertainty,
    l1_uncertainty,
    penalty_term,
    uncertainty_weights,
)
from paperhooks_ctrl_u.plugin import CtrlU, CtrlUConfig

__all__ = [
    "U_MAX",
    "CtrlU",
    "CtrlUConfig",
    "DigitsAmbiguousConfig",
    "ambiguous_labels",
    "check_finite",
    "ctrl_u_objective",
    "data",
    "effective_sample_size",
    "kl_uncertainty",
    "l1_uncertainty",
    "penalty_term",
    "uncertainty_weights",
]
