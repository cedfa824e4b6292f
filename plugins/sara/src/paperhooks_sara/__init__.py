"""paperhooks plugin ``sara``: SaRA progressive sparse low-rank fine-tuning (Hu et al., ICLR 2025)."""

from paperhooks_sara.functional import (
    SparseUpdate,
    ineffective,
    lr_rule,
    nuclear_norm,
    quantile_threshold,
)
from paperhooks_sara.plugin import Sara, SaraConfig

__all__ = [
    "Sara",
    "SaraConfig",
    "SparseUpdate",
    "ineffective",
    "lr_rule",
    "nuclear_norm",
    "quantile_threshold",
]
