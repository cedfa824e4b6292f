"""The ``perp`` plugin: PERP's selective retraining and MaskLoRA / ScaleLoRA as a reparameterization."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn.utils import parametrize

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_perp import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "perp"

BIBTEX = """\
@article{zimmer2023perp,
  title     = {PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs},
  author    = {Max Zimmer and Megi Andoni and Christoph Spiegel and Sebastian Pokutta},
  journal   = {arXiv preprint arXiv:2312.15230},
  year      = {2023},
  eprint    = {2312.15230},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2312.15230},
}"""


@dataclass(frozen=True)
class PerpConfig:
    """PERP's retraining set, with the defaults of ``main.py`` of ``ZIB-IOL/PERP``.

    :ivar method: ``mask_lora`` (default, ``lora_type``), ``scale_lora``, or ``none`` (biases
        and norms only, ``peft_use_lora=False``).
    :ivar r: the adapters' rank (``lora_r`` = 16; small models need a smaller one).
    :ivar alpha: α of MaskLoRA's scaling α/r (``lora_alpha`` = 32; ScaleLoRA has no scaling).
    :ivar biases: retrain every bias (``peft_use_bias`` = True).
    :ivar norms: retrain the parameters of normalization layers (``peft_use_ln`` = True).
    :ivar layers: the adapted layers. The head is included by default: the core prunes it
        like every Linear layer, so it gets the same sparsity-preserving adapter (the official
        code leaves ``lm_head`` dense and gives it plain LoRA).
    :ivar trainable: glob patterns over ``model.named_parameters()`` names that stay
        trainable besides the above; everything else is frozen, the pruned weights included.
    """

    method: str = "mask_lora"
    r: int = 16
    alpha: float = 32.0
    biases: bool = True
    norms: bool = True
    layers: Layers = Layers(types=("Linear", "Conv2d"), skip_head=False)
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in F.METHODS:
            raise ValueError(
                f"PerpConfig.method must be one of {', '.join(F.METHODS)}, got {self.method!r}"
            )
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"PerpConfig.r must be an integer >= 1, got {self.r!r}")
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not a > 0:
            raise ValueError(f"PerpConfig.alpha must be a number > 0, got {a!r}")
        for key in ("biases", "norms"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(
                    f"PerpConfig.{key} must be true or false, got {getattr(self, key)!r}"
                )


class Perp(Plugin):
    """PERP: retrain a pruned network through biases, norms and sparsity-preserving adapters.

    ``reparam_setup`` registers on each selected weight W (already pruned, or pruned at step 0
    of the same fit by a schedule such as ``one-shot-pruning``) MaskLoRA
    ``W + (α/r)·((B A) ⊙ 1[W ≠ 0])`` or ScaleLoRA ``W ⊙ (B A)`` — both the identity at
    init — and freezes every parameter but the adapters, the biases and the normalization
    parameters (``SelectivePEFT`` of the official code). The core's pruning mask M is
    registered after it, so the effective weight is ``M ⊙ W'``: pruned entries are exactly
    zero whatever the adapter computes, and the adapters themselves are zero there too, so
    ``paperhooks.reparam.merge`` (stages, export) yields a weight with the same zeros.

    The adapters are deterministic functions of the seed and the weights; under DDP they are
    replicated parameters averaged like any other, so N processes compute what one does on
    the global batch. Logs ``perp/trainable`` (the number of trainable scalars).
    """

    Config = PerpConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    paper: ClassVar[Paper] = Paper(
        title="PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs",
        authors=("Max Zimmer", "Megi Andoni", "Christoph Spiegel", "Sebastian Pokutta"),
        year=2023,
        venue="arXiv preprint",
        arxiv="2312.15230",
        bibtex=BIBTEX,
        code="https://github.com/ZIB-IOL/PERP",
        checked_against=(
            "ZIB-IOL/PERP @ 0d4554b: customLayers.py (MaskLoRALayer, ScaleLoRALayer: forward, _initialize, "
            "set_effective_weights), peft_methods.py (SelectivePEFT.select_peft_layers), utilities.py "
            "(SelectiveMethods: biases, LayerNorm/RMSNorm), main.py (defaults)"
        ),
        verified=True,
    )
    #: FSDP2: PERP retrains a pruned model, and the core refuses a pruning mask stacked on a
    #: reparameterization under FSDP2 (the mask of sharded rows must be the weight's only
    #: parametrization); its staged recipes run on one process or DDP only
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: PerpConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.trainable = 0

    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register the adapters on the selected weights, then freeze all but PERP's set.

        Called once, before the pruning masks are added, before sharding and before the
        optimizer is built, identically on every rank: MaskLoRA's A of the i-th selected layer
        is drawn from a generator seeded with ``seed·1000003 + i`` (the recipe's seed), not from
        the global random state.
        """
        cfg = self.config
        model = module.model
        keep: set[int] = set()
        if cfg.method != "none":
            seed = int(getattr(ctx, "seed", 0) or 0)
            for i, (_, layer) in enumerate(select_layers(model, cfg.layers, plugin=self.name)):
                shape = layer.weight.shape
                if cfg.method == "mask_lora":
                    g = torch.Generator().manual_seed(seed * 1_000_003 + i)
                    adapter = F.MaskLoRA(shape, cfg.r, cfg.alpha, generator=g)
                else:
                    adapter = F.ScaleLoRA(shape, cfg.r)
                adapter.to(layer.weight.device, layer.weight.dtype)
                parametrize.register_parametrization(layer, "weight", adapter)
                keep.update(id(p) for p in adapter.parameters())
        for m in model.modules():
            if cfg.norms and F.is_norm(m):
                keep.update(id(p) for p in m.parameters(recurse=False))
            bias = m._parameters.get("bias") if cfg.biases else None
            if bias is not None:
                keep.add(id(bias))
        for pname, p in model.named_parameters():
            p.requires_grad_(
                id(p) in keep or any(fnmatch.fnmatchcase(pname, pat) for pat in cfg.trainable)
            )
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    @hookimpl
    def reparam_after_step(self, module: Any, ctx: StepContext) -> None:
        if ctx is not None:
            ctx.log("perp/trainable", float(self.trainable))


__all__ = ["Perp", "PerpConfig"]
