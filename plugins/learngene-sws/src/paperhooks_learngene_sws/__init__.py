"""paperhooks plugin ``learngene-sws``: Learngene via Stage-wise Weight Sharing (Xia et al., IJCAI 2024).

Importing the package also registers the model the method needs: ``learngene-mlp``, a
residual MLP of variable depth with its blocks in ``blocks``.
"""

from paperhooks_learngene_sws import model
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
from paperhooks_learngene_sws.model import Block, LearngeneMLP, LearngeneMLPConfig
from paperhooks_learngene_sws.plugin import LearngeneSws, LearngeneSwsConfig, load_run_model

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
