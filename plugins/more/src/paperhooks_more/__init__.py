"""paperhooks plugin ``more``: MORE, multi-objective reward learning (Zeng et al., arXiv 2312.07401).

Importing the package also registers the task the method needs: dataset
``diverse-preferences`` (preference pairs from datasets that partly disagree) and model
``reward-mlp`` (an MLP encoder with a linear reward head).
"""

from paperhooks_more import tasks
from paperhooks_more.functional import (
    ema,
    loss_coefficients,
    min_norm_lambda,
    normalized_gram,
    pair_losses,
    pair_probabilities,
    ranking_loss,
    scores_from_target,
    task_pair_counts,
    uniform_lambda,
)
from paperhooks_more.metric import PreferenceCalibrationError
from paperhooks_more.plugin import More, MoreConfig
from paperhooks_more.tasks import DiversePreferencesConfig, RewardMLP, RewardMLPConfig

__all__ = [
    "DiversePreferencesConfig",
    "More",
    "MoreConfig",
    "PreferenceCalibrationError",
    "RewardMLP",
    "RewardMLPConfig",
    "ema",
    "loss_coefficients",
    "min_norm_lambda",
    "normalized_gram",
    "pair_losses",
    "pair_probabilities",
    "ranking_loss",
    "scores_from_target",
    "task_pair_counts",
    "tasks",
    "uniform_lambda",
]
