"""The ``febs`` plugin: the FEBS Dice term of :mod:`.functional` as an objective."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_febs import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

BIBTEX = """\
@inproceedings{tian2024fairseg,
  title     = {FairSeg: A Large-Scale Medical Image Segmentation Dataset for Fairness Learning Using
               Segment Anything Model with Fair Error-Bound Scaling},
  author    = {Tian, Yu and Shi, Min and Luo, Yan and Kouhana, Ava and Elze, Tobias and Wang, Mengyu},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2311.02189},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2311.02189}
}"""

PAPER = Paper(
    title=(
        "FairSeg: A Large-Scale Medical Image Segmentation Dataset for Fairness Learning Using "
        "Segment Anything Model with Fair Error-Bound Scaling"
    ),
    authors=("Yu Tian", "Min Shi", "Yan Luo", "Ava Kouhana", "Tobias Elze", "Mengyu Wang"),
    year=2024,
    venue="ICLR 2024",
    arxiv="2311.02189",
    bibtex=BIBTEX,
    code="https://github.com/Harvard-Ophthalmology-AI-Lab/FairSeg",
    checked_against=(
        "Harvard-Ophthalmology-AI-Lab/FairSeg @ 01b2be2: TransUNet/utils.py (febs_loss: per-group "
        "Dice summed over classes, w = tanh((min/L)^γ) on numpy, predictions scaled by w inside the "
        "Dice; equity_scaled_perf, equity_scaled_std_perf), TransUNet/trainer_febs.py (0.5 CE + "
        "0.5 FEBS, SGD momentum 0.9, wd 1e-4, poly lr 0.9), TransUNet/train_febs.py (gamma "
        "default 1.0), TransUNet/inference.py (ES-Dice over per-image Dice); the same formula in "
        "FairDiceLoss of the SAMed utils.py @ 18da659. The paper's method section could not be "
        "read (only its abstract and the ICLR reviews)."
    ),
)

TERM = "febs_dice"
"""Name of the objective the FEBS Dice term is added under (logged as ``train/febs_dice``)."""


@dataclass(frozen=True)
class FEBSConfig:
    """Hyper-parameters; defaults from the official ``train_febs.py`` / ``trainer_febs.py``.

    :ivar gamma: γ of w_a = tanh((min L / L_a)^γ) (``--gamma``, default 1.0; 0 scales every
        group by tanh 1, i.e. no fairness term).
    :ivar num_groups: G, the number of identity groups; ``batch["group"]`` holds 0…G−1
        (the official code: 3 for race and language, 2 otherwise).
    :ivar dice_weight: the FEBS Dice term's weight relative to the task's cross-entropy
        (the code's 0.5 CE + 0.5 FEBS is 1:1).
    :ivar smooth: s of the soft Dice (1e-5 in the code).
    :ivar absent_classes: how a group's loss treats classes none of its samples contain:
        ``skip`` (average over the classes present; equal to the code's weights when every
        class occurs in every group) or ``count`` (the code's sum over all classes).
    """

    gamma: float = 1.0
    num_groups: int = 2
    dice_weight: float = 1.0
    smooth: float = F.SMOOTH
    absent_classes: Literal["skip", "count"] = "skip"

    def __post_init__(self) -> None:
        for name, ok, allowed in (
            ("gamma", lambda v: v >= 0, ">= 0"),
            ("dice_weight", lambda v: v > 0, "> 0"),
            ("smooth", lambda v: v > 0, "> 0"),
        ):
            v = getattr(self, name)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not ok(v)
            ):
                raise ValueError(f"FEBSConfig.{name} must be a finite number {allowed}, got {v!r}")
        g = self.num_groups
        if isinstance(g, bool) or not isinstance(g, int) or g < 1:
            raise ValueError(f"FEBSConfig.num_groups must be an integer >= 1, got {g!r}")
        if self.absent_classes not in ("skip", "count"):
            raise ValueError(
                f"FEBSConfig.absent_classes must be one of skip, count, got {self.absent_classes!r}"
            )


def check_groups(
    batch: Mapping[str, torch.Tensor], n: int, num_groups: int, who: str
) -> torch.Tensor:
    """``batch["group"]`` as int64 ``[n]`` in 0…G−1, or a ``ValueError`` naming ``who``."""
    group = batch.get("group")
    if group is None:
        raise ValueError(
            f"{who}: needs batch['group'] (identity groups 0…{num_groups - 1}); e.g. data.groups for digits"
        )
    if group.dtype.is_floating_point or group.shape != (n,):
        raise ValueError(
            f"{who}: batch['group'] must hold {n} integer group ids, got {group.dtype} {tuple(group.shape)}"
        )
    if n and (int(group.min()) < 0 or int(group.max()) >= num_groups):
        raise ValueError(
            f"{who}: group ids must lie in 0…{num_groups - 1} (num_groups = {num_groups}), "
            f"got {int(group.min())}…{int(group.max())}"
        )
    return group.long()


class FEBS(Plugin):
    """Fair Error-Bound Scaling (FairSeg, ICLR 2024): the FEBS Dice loss as an objective term.

    Each step: every rank sums (Σ p t, Σ p², Σ t²) per group and class over its samples; one
    :func:`paperhooks.dist.all_reduce_sum` of these ``[G, C, 3]`` sums gives the global group
    losses L_a *before* the weights w_a are computed, so w is identical on all ranks and equal
    to one process's on the global batch. L_FEBS and its gradient w.r.t. the sums follow from
    the same global sums (:func:`~.functional.febs_value_and_grad`); each sample's term is
    L_FEBS plus N·⟨∂L/∂S_{a_i}, s_i⟩ (value removed), so the core's mean over the N samples
    (and DDP's mean over ranks) gives the exact gradient of the global-batch Dice.

    The term is added under ``febs_dice`` next to the task's own cross-entropy (``loss``), as
    the code's 0.5 CE + 0.5 FEBS. It needs ``outputs["logits"]`` (``[B, C]`` or
    ``[B, C, *spatial]``), ``batch["target"]`` and ``batch["group"]``. No state: the weights
    come from the current batch, as in the code.
    """

    Config = FEBSConfig
    name = "febs"
    family: ClassVar[str] = "objective"
    paper: ClassVar[Paper] = PAPER
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: FEBSConfig

    @hookimpl
    def objective_terms(
        self,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        """dice_weight·L_FEBS of the global batch, as per-sample terms with the exact gradient."""
        cfg = self.config
        logits = outputs.get("logits")
        if logits is None:
            raise ValueError(f"{F.PLUGIN}: needs outputs['logits'] (class scores [B, C, ...])")
        group = check_groups(batch, logits.shape[0], cfg.num_groups, F.PLUGIN)
        probs = logits.float().softmax(dim=1)
        s = F.per_sample_sums(probs, batch["target"].long())  # [B, C, 3], with graph
        S = dist.all_reduce_sum(
            F.group_sums(s.detach(), group, cfg.num_groups)
        )  # [G, C, 3], global
        if not bool(torch.isfinite(S).all()):  # NaN/inf logits anywhere reach every rank's sums
            raise ValueError(
                f"{F.PLUGIN}: logits of the global batch hold NaN or inf; the Dice loss is undefined"
            )
        n = dist.all_reduce_sum(torch.tensor(float(logits.shape[0]), device=logits.device))  # N
        loss, grad, w, L = F.febs_value_and_grad(S, cfg.gamma, cfg.absent_classes, cfg.smooth)
        # u_i = ⟨∂L/∂S_{a_i}, s_i⟩: Σ_i u_i over all ranks has the gradient of L_FEBS
        u = (grad[group].to(s.dtype) * s).sum(dim=(1, 2))  # [B]
        term = loss.to(s.dtype) + n * (u - u.detach())
        for a in range(cfg.num_groups):
            ctx.log(f"febs/w{a}", w[a])
            ctx.log(f"febs/group_loss{a}", L[a])
        ctx.log("febs/dice", loss)
        return {TERM: (cfg.dice_weight * term).to(logits.dtype)}
