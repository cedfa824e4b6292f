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
from paperhooks_ranking_accuracy.plugin import (
    PairCountMetric,
    RankingAccuracy,
    RankingAccuracyConfig,
)

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
