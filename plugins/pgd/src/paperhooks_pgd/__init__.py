"""paperhooks plugin ``pgd``: Madry et al., ICLR 2018, ℓ∞ PGD adversarial training."""

from paperhooks_pgd.functional import class_means, linf_pgd, project, uniform_start
from paperhooks_pgd.plugin import (
    PGD,
    PGDConfig,
    PGDRobustAccuracy,
    attack_mode,
    start_for_rank,
    task_losses,
)

__all__ = [
    "PGD",
    "PGDConfig",
    "PGDRobustAccuracy",
    "attack_mode",
    "class_means",
    "linf_pgd",
    "project",
    "start_for_rank",
    "task_losses",
    "uniform_start",
]
