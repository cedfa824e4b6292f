"""paperhooks plugin ``stable-rps``: STABLE-RPS parameter sharing (Desai & Shrivastava, ICLR 2024)."""

from paperhooks_stable_rps.functional import (
    SharedWeight,
    grad_divisor,
    hash_coefficients,
    hashednet_index,
    project,
    randomfold_index,
    scale_grad,
    shared_weight,
    slot_statistics,
    universal_hash,
)
from paperhooks_stable_rps.plugin import StableRps, StableRpsConfig

__all__ = [
    "SharedWeight",
    "StableRps",
    "StableRpsConfig",
    "grad_divisor",
    "hash_coefficients",
    "hashednet_index",
    "project",
    "randomfold_index",
    "scale_grad",
    "shared_weight",
    "slot_statistics",
    "universal_hash",
]
