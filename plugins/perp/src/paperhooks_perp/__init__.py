"""paperhooks plugin ``perp``: PERP (Zimmer et al., arXiv 2312.15230) — after pruning, retrain
only biases, normalization parameters and MaskLoRA / ScaleLoRA adapters that keep the zeros."""

from paperhooks_perp.functional import MaskLoRA, ScaleLoRA, is_norm, mask_lora, scale_lora
from paperhooks_perp.plugin import Perp, PerpConfig

__all__ = ["MaskLoRA", "Perp", "PerpConfig", "ScaleLoRA", "is_norm", "mask_lora", "scale_lora"]
