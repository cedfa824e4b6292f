"""paperhooks plugin ``rerank-curriculum``: MacAvaney et al., SIGIR 2020, difficulty curricula.

Importing the package also registers the dataset ``digits-difficulty`` (:mod:`.data`), the
built-in digits with the batch keys the paper's heuristics read.
"""

from paperhooks_rerank_curriculum import data
from paperhooks_rerank_curriculum.data import DigitsDifficultyConfig, centroid_ranker
from paperhooks_rerank_curriculum.functional import (
    HEURISTICS,
    SMOOTH,
    check_finite,
    check_heuristic,
    curriculum_weight,
    pairwise_difficulty,
    pointwise_difficulty,
    reciprocal_rank,
)
from paperhooks_rerank_curriculum.plugin import BATCH_KEYS, RerankCurriculum, RerankCurriculumConfig

__all__ = [
    "BATCH_KEYS",
    "HEURISTICS",
    "SMOOTH",
    "DigitsDifficultyConfig",
    "RerankCurriculum",
    "RerankCurriculumConfig",
    "centroid_ranker",
    "check_finite",
    "check_heuristic",
    "curriculum_weight",
    "data",
    "pairwise_difficulty",
    "pointwise_difficulty",
    "reciprocal_rank",
]
