"""paperhooks plugin ``kernel-balancing``: Li et al., ICLR 2024, kernel-balancing weights.

Installing the package registers (entry point ``paperhooks.tasks``) the task the method needs: dataset
``synthetic-recsys`` (ratings missing not at random) and model ``mf``.
"""

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


def __getattr__(name: str):  # noqa: ANN202
    """``tasks`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "tasks" or name in ("MFConfig", "RecsysInfo", "SyntheticRecsysConfig"):
        import importlib

        module = importlib.import_module("paperhooks_kernel_balancing.tasks")
        return module if name == "tasks" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
