"""The ``rpo`` plugin: DPO (the core's loss) plus :func:`.functional.sft_term`, named ``sft``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_rpo import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "rpo"

BIBTEX = """\
@inproceedings{liu2024provably,
  title     = {Provably Mitigating Overoptimization in {RLHF}: Your {SFT} Loss is Implicitly an
               Adversarial Regularizer},
  author    = {Liu, Zhihan and Lu, Miao and Zhang, Shenao and Liu, Boyi and Guo, Hongyi and
               Yang, Yingxiang and Blanchet, Jose and Wang, Zhaoran},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  eprint    = {2405.16436},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2405.16436}
}"""


@dataclass(frozen=True)
class RpoConfig:
    """Hyper-parameters; β is the recipe's ``objective.beta`` (shared with DPO).

    :ivar eta: η, the weight of the SFT term. The official zephyr recipe's 0.005 (with
        β = 0.01, ``normalize: sum``); the OpenRLHF script uses 0.2 with ``normalize: mean``.
    :ivar normalize: ``sum``: η β (−log π_θ(y_w|x)), the log-probability summed over the
        response tokens (the paper's main text, the alignment-handbook code); ``mean``:
        η (−log π_θ(y_w|x) / |y_w|), per-response token mean, no β (the OpenRLHF code,
        Appendix F).
    """

    eta: float = 0.005
    normalize: Literal["sum", "mean"] = "sum"

    def __post_init__(self) -> None:
        e = self.eta
        if isinstance(e, bool) or not isinstance(e, int | float) or not math.isfinite(e) or e < 0:
            raise ValueError(f"RpoConfig.eta must be a finite number >= 0, got {e!r}")
        if self.normalize not in ("sum", "mean"):
            raise ValueError(f"RpoConfig.normalize must be 'sum' or 'mean', got {self.normalize!r}")


class Rpo(Plugin):
    """RPO (Algorithm 2 of Liu et al., NeurIPS 2024): the SFT loss of the chosen responses added
    to DPO as the objective ``sft``.

    The core keeps DPO's ``loss``; the term is per pair, so the core's mean over the global
    batch (with any pair weights) is what one process computes on the global batch. With
    ``normalize: mean`` each response's own token count normalizes it (per pair, as in the
    official OpenRLHF code), so no global token count is needed.
    """

    Config = RpoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    paper: ClassVar[Paper] = Paper(
        title="Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an Adversarial Regularizer",
        authors=("Zhihan Liu", "Miao Lu", "Shenao Zhang", "Boyi Liu", "Hongyi Guo", "Yingxiang Yang",
                 "Jose Blanchet", "Zhaoran Wang"),
        year=2024,
        venue="NeurIPS 2024",
        arxiv="2405.16436",
        bibtex=BIBTEX,
        code="https://github.com/YSLIU627/Regularized-Preference-Optimization",
        checked_against=(
            "YSLIU627/Regularized-Preference-Optimization @ 088d921: alignment-handbook/scripts/rpo_trainer.py "
            "(dpo_loss: losses -= policy_chosen_logps * beta * eta), recipes/zephyr-7b-beta/rpo/config_full.yaml "
            "(eta 0.005, beta 0.01), OpenRLHF/openrlhf/trainer/dpo_trainer.py (nll_loss_coef on the per-response "
            "token mean), OpenRLHF/train_rpo.sh (eta 0.2, beta 0.5); TRL 1.16 loss_type 'sft' (numerically)"
        ),
    )  # fmt: skip
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: RpoConfig

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``{"sft": η β (−log π_θ(y_w|x))}`` (or the ``mean`` form) per pair."""
        if "chosen_token_logps" not in outputs:
            raise ValueError(
                f"{NAME}: needs a preference task (outputs with chosen_token_logps/chosen_mask, e.g. "
                f"data synthetic-preferences); got outputs {sorted(outputs)}"
            )
        c = self.config
        return {
            "sft": F.sft_term(
                outputs["chosen_token_logps"],
                outputs["chosen_mask"],
                module.objective.beta,
                c.eta,
                c.normalize,
            )
        }
