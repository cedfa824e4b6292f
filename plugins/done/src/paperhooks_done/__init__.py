"""paperhooks plugin ``done``: Sow et al., ICLR 2024, KL-DRO instance weights for adversarial training."""

from paperhooks_done.functional import (
    check_finite,
    closed_form_weights,
    coefficient,
    effective_sample_size,
    log_mean_exp,
    update_log_u,
)
from paperhooks_done.plugin import DONE, DONEConfig

__all__ = [
    "DONE",
    "DONEConfig",
    "check_finite",
    "closed_form_weights",
    "coefficient",
    "effective_sample_size",
    "log_mean_exp",
    "update_log_u",
]
