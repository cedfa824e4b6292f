"""Aranyani's model: an ensemble of soft oblique decision trees (``src/fdt.py``, ``src/forest.py``).

One tree of depth h has N = 2^h − 1 internal nodes and L = 2^h leaves, numbered as a heap
(root 1, children 2i and 2i + 1). Node i decides n_i(x) = σ(w_iᵀx + b_i), the probability of
going to its left child. A leaf's probability is the product over its ancestors of n_i (the
path goes left at i) or 1 − n_i (it goes right). Each leaf ℓ holds class logits θ_ℓ; the tree
predicts p(y|x) = Σ_ℓ P(ℓ|x) softmax(θ_ℓ), and the forest averages the trees' p(y|x).

Initialization as the official code: W, B ~ N(0, 1), θ ~ U[0, 1).
"""

from __future__ import annotations

import torch
from torch import nn

PLUGIN = "aranyani"


def routing_matrix(depth: int) -> torch.Tensor:
    """R ∈ {−1, 0, 1}^{N×L}: R[i, ℓ] = 1 if leaf ℓ lies left of node i, −1 if right, 0 if i is
    not an ancestor of ℓ (the official ``construct_mask_matrix``)."""
    n, leaves = 2**depth - 1, 2**depth
    r = torch.zeros(n, leaves)
    for leaf in range(leaves):
        child = leaf + leaves  # heap index of the leaf
        while child > 1:
            parent = child // 2
            r[parent - 1, leaf] = 1.0 if child == 2 * parent else -1.0
            child = parent
    return r


class ObliqueForest(nn.Module):
    """T soft oblique trees of depth h over D features, C classes.

    Parameters (one tensor each, trees stacked first, the node axis last so that node i's
    parameters are the slice ``[..., i]``):

    - ``W``: ``[T, D, N]``, the oblique directions w_i;
    - ``B``: ``[T, N]``, the offsets b_i;
    - ``theta``: ``[T, L, C]``, the leaves' class logits.

    ``forward`` returns ``log p(y|x)`` ``[B, C]`` (clamped at 1e-7, the Keras epsilon), so that
    cross-entropy on it is −log p(y|x), the official ``SparseCategoricalCrossentropy`` on
    probabilities. :meth:`node_decisions` returns n ``[T, B, N]``.
    """

    def __init__(self, in_features: int, num_classes: int, depth: int = 3, trees: int = 3) -> None:
        super().__init__()
        if depth < 1 or trees < 1 or in_features < 1 or num_classes < 1:
            raise ValueError(
                f"{PLUGIN}: ObliqueForest needs depth, trees, in_features, num_classes >= 1, "
                f"got {depth}, {trees}, {in_features}, {num_classes}"
            )
        self.depth, self.trees = depth, trees
        n, leaves = 2**depth - 1, 2**depth
        self.W = nn.Parameter(torch.randn(trees, in_features, n))
        self.B = nn.Parameter(torch.randn(trees, n))
        self.theta = nn.Parameter(torch.rand(trees, leaves, num_classes))
        self.register_buffer("routing", routing_matrix(depth), persistent=False)

    def node_decisions(self, x: torch.Tensor) -> torch.Tensor:
        """n_i(x) = σ(w_iᵀx + b_i) for every tree and internal node: ``[T, B, N]``."""
        x = x.reshape(x.shape[0], -1)
        return torch.sigmoid(torch.einsum("bd,tdn->tbn", x, self.W) + self.B.unsqueeze(1))

    def leaf_probabilities(self, n: torch.Tensor) -> torch.Tensor:
        """P(ℓ|x) = Π_{i ∈ ancestors(ℓ)} (n_i if left else 1 − n_i): ``[T, B, L]`` from n ``[T, B, N]``."""
        r = self.routing  # [N, L]
        nn_ = n.unsqueeze(-1)  # [T, B, N, 1]
        factors = torch.where(r > 0, nn_, torch.where(r < 0, 1 - nn_, torch.ones_like(nn_)))
        return factors.prod(dim=2)

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """p(y|x) averaged over the trees: ``[B, C]``."""
        leaf = self.leaf_probabilities(self.node_decisions(x))  # [T, B, L]
        per_tree = torch.einsum("tbl,tlc->tbc", leaf, torch.softmax(self.theta, dim=-1))
        return per_tree.mean(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(x).clamp_min(1e-7).log()


def find_forest(module: nn.Module) -> ObliqueForest:
    """The :class:`ObliqueForest` inside ``module`` (itself, or its first submodule of that type)."""
    for m in module.modules():
        if isinstance(m, ObliqueForest):
            return m
    raise ValueError(
        f"{PLUGIN}: the model has no soft oblique decision forest; the fairness gradient is defined on "
        "the decisions of its internal nodes. Use `model: {name: oblique-forest}`."
    )


__all__ = ["ObliqueForest", "find_forest", "routing_matrix"]
