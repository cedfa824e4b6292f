"""paperhooks plugin ``d-pruner``: D-Pruner (Zhang et al., 2024), dual-importance pruning criterion."""

from paperhooks_d_pruner.functional import (
    dual_importance_increment,
    general_importance,
    hessian_update,
    refined_gradient,
)
from paperhooks_d_pruner.plugin import DPruner, DPrunerConfig

__all__ = [
    "DPruner",
    "DPrunerConfig",
    "dual_importance_increment",
    "general_importance",
    "hessian_update",
    "refined_gradient",
]
