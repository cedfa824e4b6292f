"""paperhooks plugin ``sparse-model-soups``: Sparse Model Soups (Zimmer et al., ICLR 2024) —
IMP phases by global magnitude with LLR retraining; the core's soup stages average the ingredients."""

from paperhooks_sparse_model_soups.functional import (
    llr_factor,
    per_phase_fraction,
    phase_sparsity,
    pruned_after_phase,
    pruned_counts,
)
from paperhooks_sparse_model_soups.plugin import SparseModelSoups, SparseModelSoupsConfig

__all__ = [
    "SparseModelSoups",
    "SparseModelSoupsConfig",
    "llr_factor",
    "per_phase_fraction",
    "phase_sparsity",
    "pruned_after_phase",
    "pruned_counts",
]
