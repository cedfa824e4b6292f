"""The ``bone`` plugin: :mod:`.functional` wired to the reparameterization hooks."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn.utils import parametrize

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_bone import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "bone"

BIBTEX = """\
@misc{kang2024bone,
  title     = {Bone: Block-Affine Adaptation of Large Language Models},
  author    = {Jiale Kang},
  year      = {2024},
  eprint    = {2409.15371},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2409.15371},
}"""


@dataclass(frozen=True)
class BoneConfig:
    """Hyper-parameters of Bone, with PEFT's defaults (the paper's code base).

    :ivar variant: ``bone`` (plain Bone: b of shape [r, out] tiled along the input dimension;
        PEFT's default ``init_weights=True``) or ``bat`` (the weight-guided block affine
        form W_ij + W_ij B_i + B_i; PEFT's ``init_weights="bat"``).
    :ivar r: the block size ("rank"); 64 in PEFT's config and the official ``BONE_CONFIG``.
        ``bat`` needs r to divide both dimensions of every selected weight; ``bone`` needs
        r ≤ in_features. Small models need a small r.
    :ivar layers: the adapted layers (PEFT's Bone adapts ``nn.Linear`` only; the head is
        skipped by default, like PEFT's ``all-linear``).
    :ivar trainable: glob patterns over ``model.named_parameters()`` names that stay trainable
        besides the blocks (PEFT's ``modules_to_save`` / ``bias``); everything else in the
        model is frozen, the adapted weights included.
    """

    variant: str = "bone"
    r: int = 64
    layers: Layers = Layers(types=("Linear",))
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.variant not in F.VARIANTS:
            raise ValueError(
                f"BoneConfig.variant must be one of {', '.join(F.VARIANTS)}, got {self.variant!r}"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"BoneConfig.r must be an integer >= 1, got {self.r!r}")
        if tuple(self.layers.types) != ("Linear",):
            raise ValueError(
                f"BoneConfig.layers.types: Bone adapts Linear layers only, got {list(self.layers.types)}"
            )


class Bone(Plugin):
    """Bone (Kang, 2024): a frozen W plus a trainable block adapter per selected Linear layer.

    ``reparam_setup`` registers :class:`~.functional.BoneBlock` on each selected weight (the
    block is zero, so the model is unchanged), then freezes every parameter of the model but
    the blocks and the ``trainable`` patterns. The adapted weight W' is formed inside the
    forward pass, on whole tensors (also under FSDP2, where parametrizations run on
    all-gathered parameters); the blocks are ordinary parameters, averaged by DDP like any
    other. ``paperhooks.reparam.merge`` folds W' into plain Linear layers.
    """

    Config = BoneConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    paper: ClassVar[Paper] = Paper(
        title="Bone: Block-Affine Adaptation of Large Language Models",
        authors=("Jiale Kang",),
        year=2024,
        venue="arXiv preprint",
        arxiv="2409.15371",
        bibtex=BIBTEX,
        code="https://github.com/JL-er/Bone",
        checked_against=(
            "huggingface/peft src/peft/tuners/bone/layer.py @093b431 (get_delta_weight, "
            "get_delta_weight_bone, forward); the installed peft 0.21.2, where Bone is "
            "peft.tuners.miss (MissLinear, init_weights=True / 'bat'), agreement tested; "
            "JL-er/Bone llama/boneLinear.py @81f1379 (class 'Bone-col', BONE_CONFIG r=64)"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: BoneConfig

    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register a zero block on every selected Linear weight, then freeze the rest.

        Called once, before sharding and before the optimizer is built, identically on every
        rank (the blocks start at zero, so no randomness is involved).
        """
        cfg = self.config
        model = module.model
        blocks = set()
        for name, layer in select_layers(model, cfg.layers, plugin=self.name):
            out_features, in_features = layer.weight.shape
            F.check_shape(cfg.variant, cfg.r, out_features, in_features, where=name)
            block = F.BoneBlock(cfg.variant, cfg.r, out_features, in_features).to(
                layer.weight.device, layer.weight.dtype
            )
            parametrize.register_parametrization(layer, "weight", block)
            blocks.add(id(block.block))
        for pname, p in model.named_parameters():
            keep = id(p) in blocks or any(fnmatch.fnmatchcase(pname, pat) for pat in cfg.trainable)
            p.requires_grad_(keep)

    @hookimpl
    def reparam_after_step(self, module: Any, ctx: StepContext) -> None:
        """Log ‖ΔW‖/‖W‖ averaged over the adapted layers, as seen in the last forward."""
        ratios = [
            m.last_ratio
            for m in module.model.modules()
            if isinstance(m, F.BoneBlock) and m.last_ratio is not None
        ]
        if ratios and ctx is not None:
            ctx.log("bone/delta_ratio", torch.stack(ratios).mean())


__all__ = ["Bone", "BoneConfig"]
