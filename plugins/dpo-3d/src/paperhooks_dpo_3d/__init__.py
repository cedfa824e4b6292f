"""paperhooks plugin ``dpo-3d``: the regularized DPO variants of "3D-Properties" (Flex-DPO, SFT-DPO)."""

from paperhooks_dpo_3d.functional import chosen_nll, flex_dpo_loss
from paperhooks_dpo_3d.plugin import Dpo3d, Dpo3dConfig

__all__ = [
    "Dpo3d",
    "Dpo3dConfig",
    "chosen_nll",
    "flex_dpo_loss",
]
