"""SWS as pure torch: stage-wise weight sharing, the expansion, the distillation loss.

"Exploring Learngene via Stage-wise Weight Sharing for Initializing Variable-sized Models"
(Xia, Zhu, Yang and Geng, IJCAI 2024, arXiv 2404.16897). Checked against AlphaXia/SWS:
``SWS_vit.py`` (``RepeatedModuleList``: one module instance per stage, called once per layer
of the stage), ``aux_models.py`` (stages [3, 3, 4, 3, 3] of the 16-layer auxiliary model),
``losses.py`` (``DistillationLoss``) and ``utils.py`` (``gene_tranfer_1``, the expansion).

Notation: an auxiliary model of L = Σ_s k_s blocks in S stages. Block j of stage s(j) *is*
the stage's learngene layer θ_{s(j)} (one module object, its gradient is the sum over the k_s
uses). A descendant of depth L' is initialized block by block from a map σ: {0..L'−1} → {0..S−1}
(the code's ``layers_source``): block j ← a copy of θ_{σ(j)}; the other parts (stem, final norm,
optionally the head) are copied as they are. Distillation, with z_s the student's and z_t the
teacher's logits over C classes::

    L = (1 − α)·CE(z_s, y) + α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) · B / numel(z_s)    (soft)
    L = (1 − α)·CE(z_s, y) + α·CE(z_s, argmax z_t)                                         (hard)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# -- stages --------------------------------------------------------------------------------------------
def stage_starts(stages: Sequence[int]) -> list[int]:
    """Index of the first block of each stage: [3, 3, 4] → [0, 3, 6]."""
    out, start = [], 0
    for k in stages:
        out.append(start)
        start += k
    return out


def stage_of_block(stages: Sequence[int]) -> list[int]:
    """Stage of every block of the auxiliary model: [2, 1, 3] → [0, 0, 1, 2, 2, 2]."""
    return [s for s, k in enumerate(stages) for _ in range(k)]


def spread(depth: int, num_stages: int) -> tuple[int, ...]:
    """σ for a descendant of ``depth`` blocks when none is given: ``depth`` split over the
    stages as evenly as possible, earlier stages taking the remainder — the code's 12-layer
    example from 5 stages, ``0,0,0,1,1,1,2,2,3,3,4,4``."""
    if depth < num_stages:
        raise ValueError(
            f"a descendant of {depth} blocks cannot take every one of {num_stages} stages; give layers_source"
        )
    base, extra = divmod(depth, num_stages)
    return tuple(s for s in range(num_stages) for _ in range(base + (1 if s < extra else 0)))


def tie_stages(blocks: nn.Module, stages: Sequence[int]) -> None:
    """Make every block of a stage the stage's first block (the same module object), in place.

    :param blocks: an ``nn.ModuleList`` or ``nn.Sequential`` of ``Σ stages`` blocks.
    """
    if len(blocks) != sum(stages):
        raise ValueError(
            f"stages {list(stages)} need {sum(stages)} blocks, the model has {len(blocks)}"
        )
    for j, s in enumerate(stage_of_block(stages)):
        blocks[j] = blocks[stage_starts(stages)[s]]


def untie(blocks: nn.Module) -> None:
    """Give every repeated block its own copy (same values), in place: what merge does."""
    seen: set[int] = set()
    for j in range(len(blocks)):
        if id(blocks[j]) in seen:
            blocks[j] = copy.deepcopy(blocks[j])
        seen.add(id(blocks[j]))


def learngene_layers(
    state: Mapping[str, torch.Tensor], prefix: str, stages: Sequence[int]
) -> list[dict[str, torch.Tensor]]:
    """θ_s of each stage, from an auxiliary model's state dict: the keys of block ``start_s``
    under ``prefix`` (e.g. ``"model.blocks."``), relative to the block."""
    out = []
    for start in stage_starts(stages):
        p = f"{prefix}{start}."
        layer = {k[len(p) :]: v for k, v in state.items() if k.startswith(p)}
        if not layer:
            raise KeyError(f"the learngene state has no keys under {p!r}")
        out.append(layer)
    return out


@torch.no_grad()
def expand(
    learngene: Sequence[Mapping[str, torch.Tensor]], blocks: nn.Module, layers_source: Sequence[int]
) -> None:
    """Initialize descendant block j with a copy of θ_{σ(j)} (``gene_tranfer_1``), in place."""
    if len(layers_source) != len(blocks):
        raise ValueError(
            f"layers_source has {len(layers_source)} entries for a descendant of {len(blocks)} blocks"
        )
    for j, s in enumerate(layers_source):
        if not 0 <= s < len(learngene):
            raise ValueError(
                f"layers_source[{j}] = {s} names no stage (the learngene has {len(learngene)})"
            )
        blocks[j].load_state_dict({k: v.clone() for k, v in learngene[s].items()}, strict=True)


# -- distillation ------------------------------------------------------------------------------------------
def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor | None,
    target: torch.Tensor,
    *,
    alpha: float = 1.0,
    tau: float = 1.0,
    kind: str = "soft",
) -> torch.Tensor:
    """Per-sample loss ``[B]`` of ``DistillationLoss`` (losses.py); its batch mean is the code's loss.

    The code's soft term sums KL over the batch and the classes and divides by numel = B·C,
    so sample i contributes T²·KL_i / C. Without a teacher: plain cross-entropy.
    """
    ce = F.cross_entropy(student, target, reduction="none")
    if teacher is None:
        return ce
    teacher = teacher.detach()
    if kind == "soft":
        log_p = F.log_softmax(student / tau, dim=1)
        log_q = F.log_softmax(teacher / tau, dim=1)
        kd = (log_q.exp() * (log_q - log_p)).sum(dim=1) * (tau * tau) / student.shape[1]
    else:
        kd = F.cross_entropy(student, teacher.argmax(dim=1), reduction="none")
    return (1 - alpha) * ce + alpha * kd


__all__ = [
    "distillation_loss",
    "expand",
    "learngene_layers",
    "spread",
    "stage_of_block",
    "stage_starts",
    "tie_stages",
    "untie",
]
