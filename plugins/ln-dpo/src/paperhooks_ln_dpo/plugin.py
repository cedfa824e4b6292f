"""The ``ln-dpo`` plugin: LN-DPO (:mod:`.functional`) as the preference loss, replacing DPO."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_ln_dpo.functional import ln_dpo_loss

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "ln-dpo"

BIBTEX = """\
@misc{ahrabian2024the,
  title     = {The Hitchhiker's Guide to Human Alignment with *PO},
  author    = {Kian Ahrabian and Xihui Lin and Barun Patra and Vishrav Chaudhary and Alon Benhaim and Jay Pujara and Xia Song},
  year      = {2024},
  note      = {arXiv 2024 (NAACL 2025 Findings)},
  eprint    = {2407.15229},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2407.15229},
}"""


@dataclass(frozen=True)
class LnDpoConfig:
    """Hyper-parameters of LN-DPO.

    :ivar beta: β of the LN-DPO loss; ``null`` (default) uses the recipe's ``objective.beta``,
        so LN-DPO and DPO compare at equal β. The paper sweeps β (its grid could not be read).
    """

    beta: float | None = None

    def __post_init__(self) -> None:
        b = self.beta
        if b is None:
            return
        if isinstance(b, bool) or not isinstance(b, int | float) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"LnDpoConfig.beta must be null or a finite number > 0, got {b!r}")


class LnDpo(Plugin):
    """LN-DPO: DPO with each response's log-ratio divided by its token count.

    Replaces the core's DPO loss (``replaces_task_loss``) with
    ``−log σ(β (ℓ_w/|y_w| − ℓ_l/|y_l|))`` per pair (:func:`.functional.ln_dpo_loss`), where ℓ
    are the log-ratios of :meth:`PreferenceModule.outputs` and |y| the response-mask counts.
    Everything is per pair (each pair's own lengths), so N processes compute what 1 process
    computes on the global batch; the core averages (and weights) the pairs globally.
    """

    Config = LnDpoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="The Hitchhiker's Guide to Human Alignment with *PO",
        authors=(
            "Kian Ahrabian",
            "Xihui Lin",
            "Barun Patra",
            "Vishrav Chaudhary",
            "Alon Benhaim",
            "Jay Pujara",
            "Xia Song",
        ),
        year=2024,
        venue="arXiv 2024 (NAACL 2025 Findings)",
        arxiv="2407.15229",
        bibtex=BIBTEX,
        code="none found",
        checked_against=(
            "the paper's abstract only (arXiv v1 and NAACL 2025 Findings; its method section, equation and "
            "β grid could not be read in two searches, and there is no official code); TRL DPOTrainer "
            "loss_type 'sigmoid_norm' (trl 1.16, _compute_loss) numerically on the same log-probabilities; "
            "hand-derived values"
        ),
        verified=False,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: LnDpoConfig

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """The LN-DPO loss per pair, as ``loss`` (it replaces DPO)."""
        missing = [
            k for k in ("chosen_logps", "chosen_mask", "ref_chosen_logps") if k not in outputs
        ]
        if missing:
            raise ValueError(
                f"ln-dpo needs a preference task (data synthetic-preferences or tabular-preferences); "
                f"the module's outputs lack {missing}"
            )
        beta = self.config.beta if self.config.beta is not None else module.objective.beta
        loss = ln_dpo_loss(
            outputs["chosen_logps"],
            outputs["rejected_logps"],
            outputs["ref_chosen_logps"],
            outputs["ref_rejected_logps"],
            outputs["chosen_mask"].sum(1),
            outputs["rejected_mask"].sum(1),
            beta,
        )
        return {"loss": loss}
