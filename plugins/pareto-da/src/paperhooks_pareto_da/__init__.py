"""paperhooks plugin ``pareto-da``: Pareto Domain Adaptation (Lv et al., NeurIPS 2021).

Importing the package registers the toy task: dataset ``rotated-blobs`` and model ``da-mlp``.
"""

from paperhooks_pareto_da.functional import (
    class_domain_bce,
    domain_bce,
    entropy,
    grl_coefficient,
    log_refine,
    refine,
    reverse_gradient,
    tcm,
    tcm_terms,
)
from paperhooks_pareto_da.lp import pareto_alpha
from paperhooks_pareto_da.modules import Discriminators
from paperhooks_pareto_da.plugin import ParetoDA, ParetoDAConfig


def __getattr__(name: str):  # noqa: ANN202
    """``tasks`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "tasks" or name in ():
        import importlib

        module = importlib.import_module("paperhooks_pareto_da.tasks")
        return module if name == "tasks" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Discriminators",
    "ParetoDA",
    "ParetoDAConfig",
    "class_domain_bce",
    "domain_bce",
    "entropy",
    "grl_coefficient",
    "log_refine",
    "pareto_alpha",
    "refine",
    "reverse_gradient",
    "tasks",
    "tcm",
    "tcm_terms",
]
