"""paperhooks plugin ``learngene-sws``: Learngene via Stage-wise Weight Sharing (Xia et al., IJCAI 2024).

Installing the package registers (entry point ``paperhooks.tasks``) the model the method needs: ``learngene-mlp``, a
residual MLP of variable depth with its blocks in ``blocks``.
"""

from paperhooks_learngene_sws.functional import (
    distillation_loss,
    expand,
    learngene_layers,
    spread,
    stage_of_block,
    stage_starts,
    tie_stages,
    untie,
)
from paperhooks_learngene_sws.plugin import LearngeneSws, LearngeneSwsConfig, load_run_model


def __getattr__(name: str):  # noqa: ANN202
    """``model`` and its names load on first use: importing them registers the plugin's tasks
    (also done through the ``paperhooks.tasks`` entry point) and imports Lightning, which
    listing plugins should not pay for."""
    if name == "model" or name in ("Block", "LearngeneMLP", "LearngeneMLPConfig"):
        import importlib

        module = importlib.import_module("paperhooks_learngene_sws.model")
        return module if name == "model" else getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Block",
    "LearngeneMLP",
    "LearngeneMLPConfig",
    "LearngeneSws",
    "LearngeneSwsConfig",
    "distillation_loss",
    "expand",
    "learngene_layers",
    "load_run_model",
    "model",
    "spread",
    "stage_of_block",
    "stage_starts",
    "tie_stages",
    "untie",
]
