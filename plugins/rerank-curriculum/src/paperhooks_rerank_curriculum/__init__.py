"""paperhooks plugin ``rerank-curriculum``: MacAvaney et al., SIGIR 2020, difficulty curricula.

Installing the package registers (entry point ``paperhooks.tasks``) the dataset ``digits-difficulty`` (:mod:`.data`), the
built-in digits with the batch keys the paper's heuristics read.
"""

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


def __getattr__(name: str):  # noqa: ANN202
    """``data`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "data" or name in ("DigitsDifficultyConfig", "centroid_ranker"):
        import importlib

        module = importlib.import_module("paperhooks_rerank_curriculum.data")
        return module if name == "data" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
