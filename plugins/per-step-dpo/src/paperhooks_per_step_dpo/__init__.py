"""paperhooks plugin ``per-step-dpo``: per-step DPO (Setlur et al., NeurIPS 2024) with MC step advantages."""

from paperhooks_per_step_dpo.functional import (
    first_pit,
    per_step_dpo_loss,
    prefix_mask,
    prefix_rollouts,
    q_values,
    step_advantages,
)
from paperhooks_per_step_dpo.plugin import PerStepDpo, PerStepDpoConfig

__all__ = [
    "PerStepDpo",
    "PerStepDpoConfig",
    "first_pit",
    "per_step_dpo_loss",
    "prefix_mask",
    "prefix_rollouts",
    "q_values",
    "step_advantages",
]
