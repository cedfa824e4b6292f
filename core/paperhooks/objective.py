"""The recipe's ``objective`` section, apart from :mod:`paperhooks.preference` so that
validating a recipe does not import Lightning (re-exported there)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from paperhooks.tasks.registry import check_field


@dataclass(frozen=True)
class PreferenceObjective:
    """The recipe's ``objective`` section (preference tasks only).

    :ivar beta: β, the KL-regularization strength of DPO (TRL's default 0.1).
    :ivar reference: ``model``, ``precomputed`` or ``none`` (see the module doc).
    :ivar eval_samples: prompts of the validation set to sample responses for at every
        validation (causal LM only): logs ``val/sample_reward`` (hidden reward) and
        ``val/sample_length``. 0: no sampling.
    """

    beta: float = 0.1
    reference: Literal["model", "precomputed", "none"] = "model"
    eval_samples: int = 0

    def __post_init__(self) -> None:
        check_field(self.beta > 0, "objective.beta", "> 0", self.beta)
        check_field(self.eval_samples >= 0, "objective.eval_samples", ">= 0", self.eval_samples)


__all__ = ["PreferenceObjective"]
