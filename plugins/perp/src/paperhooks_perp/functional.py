"""PERP (Zimmer, Andoni, Spiegel & Pokutta, arXiv 2312.15230) as pure torch functions.

After pruning, PERP retrains a small, expressive subset of parameters instead of all of them:
the biases and the normalization parameters ("selective" retraining, ``SelectivePEFT`` of the
official code), optionally with one of two low-rank adapters that, unlike plain LoRA, merge
back into the pruned weight without destroying its sparsity.

Notation, for a pruned weight W of shape [out, in] (a Conv weight [out, in, k1, k2] is viewed
as [out, in·k1·k2]), its mask M = 1[W ≠ 0], rank r, LoRA factors B: [out, r], A: [r, in] and
scaling s = α/r::

    MaskLoRA     W' = W + s·((B A) ⊙ M)          A ~ kaiming_uniform(a=√5), B = 0  (W' = W at init)
    ScaleLoRA    W' = W ⊙ (B A)                  A = B = 1/√r · ones            (B A = 1: W' = W)

Either way W'_ij = 0 wherever W_ij = 0, in training and after the merge W ← W'. (The third
variant of the code, ``PruneLoRA`` — plain LoRA in training, its update masked only at the
merge — is not offered: in paperhooks the core's pruning mask acts on the effective weight in
every forward pass, which would turn it into MaskLoRA.)

Checked against ``ZIB-IOL/PERP`` @ 0d4554b: ``customLayers.py`` (``MaskLoRALayer.forward`` and
``set_effective_weights``: the update ``scaling·(B@A)`` masked by ``W != 0`` and added;
``ScaleLoRALayer._initialize``: A and B filled with ``1/sqrt(r)``, ``forward``:
``W * (B@A)``, no scaling), ``peft_methods.py`` (``SelectivePEFT``: everything frozen, then
biases, LayerNorm/RMSNorm parameters and the adapters trainable; PEFT's LoRA init for MaskLoRA)
and ``main.py`` (defaults ``lora_r=16``, ``lora_alpha=32``, ``lora_type='mask_lora'``,
``peft_use_bias=peft_use_ln=True``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

METHODS = ("mask_lora", "scale_lora", "none")

#: module types whose parameters are "normalization parameters" (PERP: LayerNorm and the
#: RMSNorms of Llama/Mistral; BatchNorm for its ResNet experiments)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (an instance of :data:`NORM_TYPES`; timm's
    ``LayerNorm2d`` and ``BatchNormAct2d`` are subclasses)."""
    return isinstance(module, NORM_TYPES)


def mask_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """MaskLoRA: W' = W + s·((B A) ⊙ 1[W ≠ 0]); W any shape [out, ...], B [out, r], A [r, ∏...]."""
    delta = (b @ a).view_as(w)
    return w + scaling * delta * (w != 0).to(delta.dtype)


def scale_lora(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ScaleLoRA: W' = W ⊙ (B A); zero wherever W is."""
    return w * (b @ a).view_as(w)


def lora_shapes(weight_shape: torch.Size, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(A shape, B shape)`` for a weight [out, ...]: A [r, fan_in], B [out, r]."""
    out = weight_shape[0]
    fan_in = math.prod(weight_shape[1:])
    return (r, fan_in), (out, r)


class MaskLoRA(nn.Module):
    """The parametrization W ↦ W + (α/r)·((B A) ⊙ 1[W ≠ 0]) with trainable ``lora_A``, ``lora_B``.

    Initialized as PEFT's LoRA (the official code keeps it): A by ``kaiming_uniform_(a=√5)``,
    B = 0, so the layer starts as the pruned one. ``generator`` draws A (the plugin seeds one
    per layer from the recipe's seed, so every rank draws the same A without touching the
    global random state). The mask is recomputed from the stored W in
    every forward pass (W is frozen, so it is the pruning mask of W).
    """

    def __init__(
        self,
        weight_shape: torch.Size,
        r: int,
        alpha: float,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        a_shape, b_shape = lora_shapes(weight_shape, r)
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(a_shape))
        self.lora_B = nn.Parameter(torch.zeros(b_shape))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return mask_lora(w, self.lora_A, self.lora_B, self.scaling)


class ScaleLoRA(nn.Module):
    """The parametrization W ↦ W ⊙ (B A), A = B = ones/√r at init (so B A = 1, W' = W)."""

    def __init__(self, weight_shape: torch.Size, r: int) -> None:
        super().__init__()
        a_shape, b_shape = lora_shapes(weight_shape, r)
        self.lora_A = nn.Parameter(torch.full(a_shape, 1 / math.sqrt(r)))
        self.lora_B = nn.Parameter(torch.full(b_shape, 1 / math.sqrt(r)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return scale_lora(w, self.lora_A, self.lora_B)


__all__ = [
    "METHODS",
    "NORM_TYPES",
    "MaskLoRA",
    "ScaleLoRA",
    "is_norm",
    "lora_shapes",
    "mask_lora",
    "scale_lora",
]
