"""paperhooks plugin ``srat``: Separable Reweighted Adversarial Training (arXiv 2107.13639), reconstructed."""

from paperhooks_srat.functional import (
    SCHEMES,
    batch_hard_triplet,
    class_weights,
    linearize,
    pairwise_distances,
    triplet_value_and_grad,
)
from paperhooks_srat.plugin import SRAT, TERM, SRATConfig

__all__ = [
    "SCHEMES",
    "SRAT",
    "TERM",
    "SRATConfig",
    "batch_hard_triplet",
    "class_weights",
    "linearize",
    "pairwise_distances",
    "triplet_value_and_grad",
]
