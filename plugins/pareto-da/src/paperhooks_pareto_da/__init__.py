"""paperhooks plugin ``pareto-da``: Pareto Domain Adaptation (Lv et al., NeurIPS 2021).

Importing the package registers the toy task: dataset ``rotated-blobs`` and model ``da-mlp``.
"""

from paperhooks_pareto_da import tasks as tasks
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
