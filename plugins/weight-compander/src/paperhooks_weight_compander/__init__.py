"""paperhooks plugin ``weight-compander``: w = a·arctan(v/b), bounded effective weights pushed away from zero."""

from paperhooks_weight_compander.functional import (
    Compander,
    CompanderAdam,
    compand,
    compand_slope,
    decay_term,
    expand,
)
from paperhooks_weight_compander.plugin import WeightCompander, WeightCompanderConfig

__all__ = [
    "Compander",
    "CompanderAdam",
    "WeightCompander",
    "WeightCompanderConfig",
    "compand",
    "compand_slope",
    "decay_term",
    "expand",
]
