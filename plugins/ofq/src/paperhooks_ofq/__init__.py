"""paperhooks plugin ``ofq``: Oscillation-free Quantization (Liu et al., ICML 2023).

StatsQ weight fake-quantization with a straight-through estimator, confidence-guided
annealing (CGA) in the final phase, and the oscillation counter as a logged metric.
"""

from paperhooks_ofq.functional import (
    Oscillations,
    StatsQ,
    cga_keep_mask,
    pre_round,
    statsq,
    statsq_codes,
    statsq_scale,
    track_oscillations,
)
from paperhooks_ofq.plugin import Ofq, OfqConfig

__all__ = [
    "Ofq",
    "OfqConfig",
    "Oscillations",
    "StatsQ",
    "cga_keep_mask",
    "pre_round",
    "statsq",
    "statsq_codes",
    "statsq_scale",
    "track_oscillations",
]
