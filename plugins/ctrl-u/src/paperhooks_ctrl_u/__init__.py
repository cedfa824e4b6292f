"""paperhooks plugin ``ctrl-u``: Zhang et al., ICLR 2025, uncertainty-aware loss weighting.

Installing the package registers (entry point ``paperhooks.tasks``) the dataset ``digits-ambiguous`` (:mod:`.data`): digits
whose most ambiguous training images carry wrong labels (label noise that depends on x).
"""

from paperhooks_ctrl_u.functional import (
    U_MAX,
    check_finite,
    ctrl_u_objective,
    effective_sample_size,
    kl_uncertainty,
    l1_uncertainty,
    penalty_term,
    uncertainty_weights,
)
from paperhooks_ctrl_u.plugin import CtrlU, CtrlUConfig


def __getattr__(name: str):  # noqa: ANN202
    """``data`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "data" or name in ("DigitsAmbiguousConfig", "ambiguous_labels"):
        import importlib

        module = importlib.import_module("paperhooks_ctrl_u.data")
        return module if name == "data" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "U_MAX",
    "CtrlU",
    "CtrlUConfig",
    "DigitsAmbiguousConfig",
    "ambiguous_labels",
    "check_finite",
    "ctrl_u_objective",
    "data",
    "effective_sample_size",
    "kl_uncertainty",
    "l1_uncertainty",
    "penalty_term",
    "uncertainty_weights",
]
