"""paperhooks plugin ``kernel-balancing``: Li et al., ICLR 2024, kernel-balancing weights.

Importing the package also registers the task the method needs: dataset
``synthetic-recsys`` (ratings missing not at random) and model ``mf``.
"""

from paperhooks_kernel_balancing import tasks
from paperhooks_kernel_balancing.features import all_pairs, fit_embeddings, pair_features
from paperhooks_kernel_balancing.functional import (
    KERNELS,
    balance_penalty,
    balancing_objective,
    effective_sample_size,
    entropy_term,
    exponential_kernel,
    fit_balancing_weights,
    gaussian_kernel,
    imbalance,
    kernel_means,
)
from paperhooks_kernel_balancing.plugin import KernelBalancing, KernelBalancingConfig
from paperhooks_kernel_balancing.tasks import MFConfig, RecsysInfo, SyntheticRecsysConfig

__all__ = [
    "KERNELS",
    "KernelBalancing",
    "KernelBalancingConfig",
    "MFConfig",
    "RecsysInfo",
    "SyntheticRecsysConfig",
    "all_pairs",
    "balance_penalty",
    "balancing_objective",
    "effective_sample_size",
    "entropy_term",
    "exponential_kernel",
    "fit_balancing_weights",
    "fit_embeddings",
    "gaussian_kernel",
    "imbalance",
    "kernel_means",
    "pair_features",
    "tasks",
]
