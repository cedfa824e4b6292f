"""paperhooks plugin ``pgd``: Madry et al., ICLR 2018, ℓ∞ PGD adversarial training."""

from paperhooks_pgd.functional import class_means, linf_pgd, project, uniform_start
from paperhooks_pgd.plugin import (
    PGD,
    PGDConfig,
    attack_mode,
    start_for_rank,
    task_losses,
)


def __getattr__(name: str):  # noqa: ANN202
    """``PGDRobustAccuracy`` loads on first use: it subclasses ``torchmetrics.Metric``, and
    importing torchmetrics (and torchvision with it) is what listing plugins should not pay for."""
    if name == "PGDRobustAccuracy":
        from paperhooks_pgd.robust_accuracy import PGDRobustAccuracy

        return PGDRobustAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
