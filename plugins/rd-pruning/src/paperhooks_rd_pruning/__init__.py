"""paperhooks plugin ``rd-pruning``: layer-adaptive sparsity by joint rate-distortion optimization (Xu et al., ICCV 2023)."""

from paperhooks_rd_pruning.functional import (
    brute_force_allocation,
    distortion,
    dp_allocation,
    grid_pruned_counts,
    interpolate,
    keep_top,
)
from paperhooks_rd_pruning.plugin import RdPruning, RdPruningConfig

__all__ = [
    "RdPruning",
    "RdPruningConfig",
    "brute_force_allocation",
    "distortion",
    "dp_allocation",
    "grid_pruned_counts",
    "interpolate",
    "keep_top",
]
