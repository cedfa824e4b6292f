"""paperhooks plugin ``robust-dpo``: rDPO (Chowdhury et al., ICML 2024), DPO de-biased for label flips at a known rate."""

from paperhooks_robust_dpo.functional import gradient_weight, robust_dpo_loss
from paperhooks_robust_dpo.plugin import RobustDpo, RobustDpoConfig

__all__ = ["RobustDpo", "RobustDpoConfig", "gradient_weight", "robust_dpo_loss"]
