"""paperhooks plugin ``sparse-po``: SparsePO (Christopoulou et al., Findings of EMNLP 2025),
DPO with token-level reward and KL masks, learned from the reference model's hidden states or
derived from its activations."""

from paperhooks_sparse_po.functional import (
    MaskNet,
    derived_mask,
    shift_to_tokens,
    sparse_po_loss,
    token_kl_terms,
)
from paperhooks_sparse_po.plugin import SparsePo, SparsePoConfig

__all__ = [
    "MaskNet",
    "SparsePo",
    "SparsePoConfig",
    "derived_mask",
    "shift_to_tokens",
    "sparse_po_loss",
    "token_kl_terms",
]
