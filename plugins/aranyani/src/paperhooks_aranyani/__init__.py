"""paperhooks plugin ``aranyani``: Chowdhury et al., ICLR 2024, fair online learning with
oblique decision forests (node-level demographic-parity gradients from running aggregates).

Installing the package registers (entry point ``paperhooks.tasks``) the task the method needs: model ``oblique-forest``
(the soft oblique decision forest) and dataset ``online-fair-stream``.
"""

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


def __getattr__(name: str):  # noqa: ANN202
    """``tasks`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "tasks" or name in ("FairStreamConfig", "ObliqueForestConfig", "sample_stream"):
        import importlib

        module = importlib.import_module("paperhooks_aranyani.tasks")
        return module if name == "tasks" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
