"""paperhooks plugin ``ranking-accuracy``: ranking accuracy and idealized ranking accuracy
(Chen et al., "Preference Learning Algorithms Do Not Learn Preference Rankings", NeurIPS 2024)."""

from paperhooks_ranking_accuracy.functional import (
    difficulty_threshold,
    idealized_correct,
    length_normalize,
    log_odds,
    ranking_correct,
    reference_misranking,
)
from paperhooks_ranking_accuracy.plugin import RankingAccuracy, RankingAccuracyConfig


def __getattr__(name: str):  # noqa: ANN202
    """``PairCountMetric`` loads on first use: it subclasses ``torchmetrics.Metric``, and
    importing torchmetrics (and torchvision with it) is what listing plugins should not pay for."""
    if name == "PairCountMetric":
        from paperhooks_ranking_accuracy.pair_count import PairCountMetric

        return PairCountMetric
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PairCountMetric",
    "RankingAccuracy",
    "RankingAccuracyConfig",
    "difficulty_threshold",
    "idealized_correct",
    "length_normalize",
    "log_odds",
    "ranking_correct",
    "reference_misranking",
]
