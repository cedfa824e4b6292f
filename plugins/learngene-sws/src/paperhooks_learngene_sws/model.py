"""The model the method needs: a residual MLP of variable depth (registered as ``learngene-mlp``).

It has the shape of the paper's ViT with the attention left out (digits are not token
sequences): a stem (the patch embedding's place), ``depth`` pre-norm residual blocks
``x + fc2(GELU(fc1(LayerNorm(x))))`` in ``blocks``, a final LayerNorm ``norm`` and a linear
``head``. Weights start as in the official ViT: truncated normal (std 0.02) for Linear weights,
zero biases, LayerNorm at (1, 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from paperhooks.tasks import DataInfo, check_field, register_model


@dataclass(frozen=True)
class LearngeneMLPConfig:
    """:ivar dim: width of the residual stream. :ivar depth: number of blocks.
    :ivar mlp_ratio: hidden width of a block's MLP is ``dim * mlp_ratio``."""

    dim: int = 64
    depth: int = 6
    mlp_ratio: int = 2

    def __post_init__(self) -> None:
        check_field(isinstance(self.dim, int) and self.dim >= 1, "dim", "an int >= 1", self.dim)
        check_field(
            isinstance(self.depth, int) and self.depth >= 1, "depth", "an int >= 1", self.depth
        )
        check_field(
            isinstance(self.mlp_ratio, int) and self.mlp_ratio >= 1,
            "mlp_ratio",
            "an int >= 1",
            self.mlp_ratio,
        )


class Block(nn.Module):
    """x ↦ x + fc2(GELU(fc1(LayerNorm(x)))): the MLP half of a pre-norm transformer block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class LearngeneMLP(nn.Module):
    """stem → blocks → norm → head, over the flattened input."""

    def __init__(self, in_features: int, num_classes: int, config: LearngeneMLPConfig) -> None:
        super().__init__()
        d = config.dim
        self.stem = nn.Linear(in_features, d)
        self.blocks = nn.ModuleList(Block(d, d * config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self.apply(_init)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


@register_model("learngene-mlp", LearngeneMLPConfig)
def build_learngene_mlp(config: LearngeneMLPConfig, info: DataInfo) -> nn.Module:
    """Residual MLP of variable depth (stem, blocks, norm, head) for SWS's auxiliary and descendant models."""
    if info.task != "classification":
        raise ValueError("model learngene-mlp is a classifier; the data's task is regression")
    return LearngeneMLP(math.prod(info.input_shape), info.num_classes, config)


__all__ = ["Block", "LearngeneMLP", "LearngeneMLPConfig", "build_learngene_mlp"]
