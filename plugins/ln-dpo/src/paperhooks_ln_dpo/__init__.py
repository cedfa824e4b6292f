"""paperhooks plugin ``ln-dpo``: length-normalized DPO (LN-DPO, Ahrabian et al. 2024)."""

from paperhooks_ln_dpo.functional import ln_dpo_loss, normalized_log_ratio_margin
from paperhooks_ln_dpo.plugin import LnDpo, LnDpoConfig

__all__ = [
    "LnDpo",
    "LnDpoConfig",
    "ln_dpo_loss",
    "normalized_log_ratio_margin",
]
