"""Bone (Kang, arXiv 2409.15371): block adapters on a frozen weight, in pure torch.

Notation, for a frozen weight W of shape [out, in] and block size r (the paper's "rank")::

    plain Bone   b: [r, out], zero at init.  The input is cut into in/r chunks x_j of size r
                 (zero-padded when r does not divide in) and y = W x + Σ_j bᵀ x_j, i.e.

                     W' = W + [bᵀ bᵀ … bᵀ]        (bᵀ tiled along the input dimension,
                                                   the last tile cut to in mod r columns)

    BAT          B: [out/r, r, r], zero at init, one r×r block B_i per block-row i.  With
    (weight-     W_ij the r×r block of W at block-row i, block-column j:
    guided)
                     W'_ij = W_ij + W_ij B_i + B_i                   (merge)
                     W_ij  = (W'_ij − B_i)(I + B_i)⁻¹                 (unmerge)

Both are zero at init, so the adapted layer starts as the pretrained one. The trainable count
is r·out for either variant. Checked against HF PEFT ``src/peft/tuners/bone/layer.py``
(``get_delta_weight``, ``get_delta_weight_bone``, ``forward``) and its successor
``peft.tuners.miss`` (peft ≥ 0.15 renamed Bone to MiSS; ``init_weights=True`` is plain Bone,
``"bat"`` is BAT), and the official ``JL-er/Bone`` ``llama/boneLinear.py`` ("Bone-col").
"""

from __future__ import annotations

import math

import torch
from torch import nn

VARIANTS = ("bone", "bat")


def _tile(b: torch.Tensor, in_features: int) -> torch.Tensor:
    """[bᵀ bᵀ … bᵀ] cut to ``in_features`` columns: shape [out, in]; column j·r + k is b[k]."""
    r = b.shape[0]
    return b.repeat(math.ceil(in_features / r), 1)[:in_features].T


def bone_delta(b: torch.Tensor, in_features: int) -> torch.Tensor:
    """ΔW of plain Bone: b [r, out] tiled along the input dimension, shape [out, in]."""
    return _tile(b, in_features)


def bone_forward(x: torch.Tensor, weight: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y = W x + Σ_j bᵀ x_j without forming W' (PEFT's forward; no bias)."""
    r = b.shape[0]
    pad = (-x.shape[-1]) % r
    xp = nn.functional.pad(x, (0, pad)) if pad else x
    return x @ weight.T + xp.reshape(*x.shape[:-1], -1, r).sum(dim=-2) @ b


def _blocks(w: torch.Tensor, r: int) -> torch.Tensor:
    """[out, in] → [out/r, in/r, r, r]: entry [i, j] is the block W_ij."""
    out, inp = w.shape
    return w.reshape(out // r, r, inp // r, r).permute(0, 2, 1, 3)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    i, j, r, _ = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(i * r, j * r)


def bat_delta(weight: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """ΔW of BAT: ΔW_ij = W_ij B_i + B_i, shape [out, in]; B is [out/r, r, r]."""
    Bi = B[:, None]  # [out/r, 1, r, r]: the same B_i for every block-column j
    return _unblocks(_blocks(weight, B.shape[-1]) @ Bi + Bi)


def bat_unmerge(merged: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """W from W' = W + ΔW: W_ij = (W'_ij − B_i)(I + B_i)⁻¹ (needs I + B_i invertible)."""
    r = B.shape[-1]
    eye = torch.eye(r, dtype=B.dtype, device=B.device)
    Bi = B[:, None]
    # (W' − B)(I + B)⁻¹ = X solves X (I + B) = W' − B: a right solve, no explicit inverse
    return _unblocks(torch.linalg.solve(eye + Bi, _blocks(merged, r) - Bi, left=False))


def check_shape(variant: str, r: int, out_features: int, in_features: int, where: str = "") -> None:
    """Raise ``ValueError`` when r does not fit the layer: BAT needs r | out and r | in."""
    at = f" ({where}: weight [{out_features}, {in_features}])" if where else ""
    if r > in_features:
        raise ValueError(f"bone: r = {r} must be at most the layer's in_features{at}")
    if variant == "bat" and (out_features % r or in_features % r):
        raise ValueError(
            f"bone: variant bat needs r = {r} to divide out_features and in_features{at}"
        )


class BoneBlock(nn.Module):
    """The parametrization W ↦ W' = W + ΔW for ``torch.nn.utils.parametrize``.

    Holds the trainable block: ``block`` of shape [r, out] (``bone``) or [out/r, r, r]
    (``bat``), zero at init. W itself is the parametrization's input (the frozen
    ``original``).
    """

    def __init__(self, variant: str, r: int, out_features: int, in_features: int) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"bone: variant must be one of {VARIANTS}, got {variant!r}")
        check_shape(variant, r, out_features, in_features)
        self.variant, self.r, self.in_features = variant, r, in_features
        shape = (r, out_features) if variant == "bone" else (out_features // r, r, r)
        self.block = nn.Parameter(torch.zeros(shape))
        #: ‖ΔW‖/‖W‖ of the last forward with gradients (computed on whole tensors), for logging
        self.last_ratio: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.variant == "bone":
            delta = bone_delta(self.block, self.in_features).to(weight.dtype)
        else:
            delta = bat_delta(weight, self.block.to(weight.dtype))
        if torch.is_grad_enabled():
            with torch.no_grad():
                self.last_ratio = torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(
                    weight
                ).clamp_min(1e-12)
        return weight + delta

    def right_inverse(self, merged: torch.Tensor) -> torch.Tensor:
        """The base W that gives ``merged`` with the current block (unmerge)."""
        with torch.no_grad():
            if self.variant == "bone":
                return merged - bone_delta(self.block, self.in_features).to(merged.dtype)
            return bat_unmerge(merged, self.block.to(merged.dtype))

    def extra_repr(self) -> str:
        return f"variant={self.variant}, r={self.r}, block={tuple(self.block.shape)}"


__all__ = [
    "VARIANTS",
    "BoneBlock",
    "bat_delta",
    "bat_unmerge",
    "bone_delta",
    "bone_forward",
    "check_shape",
]
