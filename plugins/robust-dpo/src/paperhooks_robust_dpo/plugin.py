"""The ``robust-dpo`` plugin: :func:`.functional.robust_dpo_loss` in place of DPO's loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_robust_dpo import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "robust-dpo"

BIBTEX = """\
@inproceedings{chowdhury2024provably,
  title     = {Provably Robust {DPO}: Aligning Language Models with Noisy Feedback},
  author    = {Ray Chowdhury, Sayak and Kini, Anush and Natarajan, Nagarajan},
  booktitle = {Proceedings of the 41st International Conference on Machine Learning (ICML)},
  series    = {Proceedings of Machine Learning Research},
  volume    = {235},
  year      = {2024},
  eprint    = {2403.00409},
  archivePrefix = {arXiv},
  url       = {https://proceedings.mlr.press/v235/ray-chowdhury24a.html}
}"""


@dataclass(frozen=True)
class RobustDpoConfig:
    """Hyper-parameters. β is the recipe's ``objective.beta`` (shared with DPO).

    :ivar epsilon: ε, the label-flip rate the loss corrects for, in [0, 0.5). The paper
        assumes it known (set it to the data's flip rate or an estimate of it); 0 is DPO.
        TRL calls it ``label_smoothing`` (``loss_type="robust"``).
    """

    epsilon: float = 0.1

    def __post_init__(self) -> None:
        e = self.epsilon
        if (
            isinstance(e, bool)
            or not isinstance(e, int | float)
            or not math.isfinite(e)
            or not 0.0 <= e < 0.5
        ):
            raise ValueError(f"RobustDpoConfig.epsilon must be a number in [0, 0.5), got {e!r}")


class RobustDpo(Plugin):
    """rDPO: the de-biased DPO loss ℓ̂_ε of Chowdhury et al. (ICML 2024), replacing DPO.

    Per pair, ``ℓ̂_ε = [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)`` with
    ``h = log_ratio_margin(outputs)`` (sequence log-probabilities summed over the response
    tokens, reference from the core). The values are per pair, so the core's mean over the
    global batch (with any pair weights) is what one process computes on the global batch:
    no collective is needed here.
    """

    Config = RobustDpoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="Provably Robust DPO: Aligning Language Models with Noisy Feedback",
        authors=("Sayak Ray Chowdhury", "Anush Kini", "Nagarajan Natarajan"),
        year=2024,
        venue="ICML 2024",
        arxiv="2403.00409",
        bibtex=BIBTEX,
        code="none found",
        checked_against=(
            "TRL 1.16 DPOTrainer._compute_loss, loss_type='robust' with label_smoothing=ε (numerically); the same "
            "formula in TRL's code as copied in YSLIU627/Regularized-Preference-Optimization @ 088d921 "
            "(alignment-handbook/scripts/rpo_trainer.py, dpo_loss); "
            "the paper's loss as quoted in the paper notes (full text not reachable here)"
        ),
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: RobustDpoConfig

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``{"loss": ℓ̂_ε}`` per pair (replaces DPO's ``loss``)."""
        if "chosen_logps" not in outputs:
            raise ValueError(
                f"{NAME}: needs a preference task (outputs with chosen_logps/rejected_logps, e.g. "
                f"data synthetic-preferences); got outputs {sorted(outputs)}"
            )
        from paperhooks.preference import (
            log_ratio_margin,  # imports Lightning: not at plugin listing
        )

        h = log_ratio_margin(outputs)  # [B]
        return {"loss": F.robust_dpo_loss(h, module.objective.beta, self.config.epsilon)}
