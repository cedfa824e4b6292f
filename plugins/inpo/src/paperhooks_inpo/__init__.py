"""paperhooks plugin ``inpo``: Iterative Nash Policy Optimization (Zhang et al., ICLR 2025)."""

from paperhooks_inpo.functional import (
    exploitability,
    inpo_loss,
    log_ratio_h,
    omd_step,
    on_policy_weights,
    win_rates,
)
from paperhooks_inpo.plugin import Inpo, InpoConfig

__all__ = [
    "Inpo",
    "InpoConfig",
    "exploitability",
    "inpo_loss",
    "log_ratio_h",
    "omd_step",
    "on_policy_weights",
    "win_rates",
]
