"""paperhooks plugin ``aranyani``: Chowdhury et al., ICLR 2024, fair online learning with
oblique decision forests (node-level demographic-parity gradients from running aggregates).

Importing the package also registers the task the method needs: model ``oblique-forest``
(the soft oblique decision forest) and dataset ``online-fair-stream``.
"""

from paperhooks_aranyani import tasks
from paperhooks_aranyani.forest import ObliqueForest, find_forest, routing_matrix
from paperhooks_aranyani.functional import (
    accumulate,
    correction,
    demographic_parity,
    fairness_gradient,
    group_gap,
    huber_derivative,
)
from paperhooks_aranyani.plugin import Aranyani, AranyaniConfig
from paperhooks_aranyani.tasks import FairStreamConfig, ObliqueForestConfig, sample_stream

__all__ = [
    "Aranyani",
    "AranyaniConfig",
    "FairStreamConfig",
    "ObliqueForest",
    "ObliqueForestConfig",
    "accumulate",
    "correction",
    "demographic_parity",
    "fairness_gradient",
    "find_forest",
    "group_gap",
    "huber_derivative",
    "routing_matrix",
    "sample_stream",
    "tasks",
]
