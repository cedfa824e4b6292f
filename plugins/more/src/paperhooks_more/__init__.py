"""paperhooks plugin ``more``: MORE, multi-objective reward learning (Zeng et al., arXiv 2312.07401).

Installing the package registers (entry point ``paperhooks.tasks``) the task the method needs: dataset
``diverse-preferences`` (preference pairs from datasets that partly disagree) and model
``reward-mlp`` (an MLP encoder with a linear reward head).
"""

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
from paperhooks_more.plugin import More, MoreConfig


def __getattr__(name: str):  # noqa: ANN202
    """``tasks`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for. ``PreferenceCalibrationError`` too: it subclasses a
    torchmetrics metric, and importing torchmetrics (and torchvision) is as slow."""
    if name == "PreferenceCalibrationError":
        from paperhooks_more.metric import PreferenceCalibrationError

        return PreferenceCalibrationError
    if name == "tasks" or name in ("DiversePreferencesConfig", "RewardMLP", "RewardMLPConfig"):
        import importlib

        module = importlib.import_module("paperhooks_more.tasks")
        return module if name == "tasks" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
