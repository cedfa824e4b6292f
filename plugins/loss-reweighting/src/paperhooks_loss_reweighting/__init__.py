"""paperhooks plugin ``loss-reweighting``: Sow et al., ICLR 2025, loss-based sample weights."""

from paperhooks_loss_reweighting.functional import (
    STRATEGIES,
    effective_sample_size,
    extremes,
    linupper,
    normalize,
    quadratic,
    sample_weights,
    upper,
    weight_entropy,
)
from paperhooks_loss_reweighting.plugin import LossReweighting, LossReweightingConfig

__all__ = [
    "STRATEGIES",
    "LossReweighting",
    "LossReweightingConfig",
    "effective_sample_size",
    "extremes",
    "linupper",
    "normalize",
    "quadratic",
    "sample_weights",
    "upper",
    "weight_entropy",
]
