"""The ``weight-compander`` plugin: :mod:`.functional` wired to the reparameterization hooks."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn.utils import parametrize

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_weight_compander import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "weight-compander"
log = logging.getLogger(__name__)

BIBTEX = """\
@inproceedings{cakaj2023weight,
  title     = {Weight Compander: A Simple Weight Reparameterization for Regularization},
  author    = {Rinor Cakaj and Jens Mehnert and Bin Yang},
  booktitle = {International Joint Conference on Neural Networks (IJCNN)},
  year      = {2023},
  eprint    = {2306.16993},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2306.16993},
}"""

#: |w| below this counts as "near zero" in the logged fraction (the paper's histograms show
#: fewer weights at zero; the threshold is ours)
NEAR_ZERO = 1e-2


def _positive(name: str, x: object) -> None:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x) or x <= 0:
        raise ValueError(f"WeightCompanderConfig.{name} must be a finite number > 0, got {x!r}")


@dataclass(frozen=True)
class WeightCompanderConfig:
    """Hyper-parameters of Weight Compander, with the paper's values.

    :ivar a: a of Ψ(v) = a·arctan(v/b), fixed version; |w| < aπ/2. Default 0.8: the row
        ResNet34 / CIFAR-10 of the paper's Table I (a, b grid-searched in {0.5, ..., 1.0}).
    :ivar b: b of Ψ, fixed version. Default 0.5 (the same row); Ψ'(0) = a/b = 1.6.
    :ivar learnable: the paper's learnable "fine" extension (Sec. III-B): every layer trains
        its own a and b, starting at ``init_a``, ``init_b``; the decay then acts on v.
    :ivar init_a: initial a of the learnable version; 0.5 was the paper's best.
    :ivar init_b: initial b of the learnable version; 1.0 was the paper's best.
    :ivar weight_decay: λ of Eq. 5, as PyTorch's ``weight_decay`` coefficient (the term is
        (λ/2)‖Ψ(v)‖², gradient λ·w): on Ψ(v) in the fixed version, on v in the learnable one,
        never on a or b. Default 1e-4: the paper's value for ResNets on CIFAR-10 (5e-4 for
        CIFAR-100 and VGGs). 0 turns the term off.
    :ivar layers: the layers reparameterized. The paper companders every conv and linear
        weight, the last linear layer included (its learned a is reported), so the head is
        not skipped; biases and normalization layers are never touched.
    """

    a: float = 0.8
    b: float = 0.5
    learnable: bool = False
    init_a: float = 0.5
    init_b: float = 1.0
    weight_decay: float = 1e-4
    layers: Layers = Layers(types=("Linear", "Conv1d", "Conv2d", "Conv3d"), skip_head=False)

    def __post_init__(self) -> None:
        for name in ("a", "b", "init_a", "init_b"):
            _positive(name, getattr(self, name))
        wd = self.weight_decay
        if (
            isinstance(wd, bool)
            or not isinstance(wd, int | float)
            or not math.isfinite(wd)
            or wd < 0
        ):
            raise ValueError(
                f"WeightCompanderConfig.weight_decay must be a finite number >= 0, got {wd!r}"
            )
        if not isinstance(self.learnable, bool):
            raise ValueError(
                f"WeightCompanderConfig.learnable must be true or false, got {self.learnable!r}"
            )
        if "Embedding" in self.layers.types:
            raise ValueError(
                "WeightCompanderConfig.layers.types: the paper companders conv and linear weights, not Embedding"
            )


class WeightCompander(Plugin):
    """Weight Compander (Cakaj et al., IJCNN 2023): w = a·arctan(v/b) on conv and linear weights.

    ``reparam_setup`` registers :class:`~.functional.Compander` on the selected layers' weights,
    with v initialized to Ψ⁻¹(w) (Eq. 4) so the network's initial function is unchanged.
    ``objective_terms`` adds the weight decay of Eq. 5, (λ/2)‖Ψ(v)‖² summed over the layers
    (learnable version: (λ/2)‖v‖²), as the objective ``weight_decay``; it reads the tensors
    the parametrization saw in this step's forward pass (whole tensors, also under FSDP2).

    Why an objective term and not an optimizer: the decay must act on Ψ(v), which only the
    parametrization knows, and the loss is where a chain rule through Ψ is free; an optimizer
    hook would make this plugin the run's one optimizer owner and clash with every optimizer
    plugin. The term is the same on every rank, so the averaged gradient is the global one.
    """

    Config = WeightCompanderConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    paper: ClassVar[Paper] = Paper(
        title="Weight Compander: A Simple Weight Reparameterization for Regularization",
        authors=("Rinor Cakaj", "Jens Mehnert", "Bin Yang"),
        year=2023,
        venue="IJCNN 2023",
        arxiv="2306.16993",
        bibtex=BIBTEX,
        code="none found",
        checked_against=(
            "the paper's text: IJCNN-2023 camera-ready PDF files/WC_IJCNN_2023.pdf in "
            "rinorcakaj/rinorcakaj.github.io@cecb43c (Eqs. 1-5, Sec. III-B, Table I), as transcribed "
            "in the project's papers/resolved.md; no official code exists"
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

    config: WeightCompanderConfig

    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register Ψ on the weight of every selected layer (after earlier reparameterizations).

        Called once, before sharding and before the optimizer is built, identically on every
        rank. Ψ's ``right_inverse`` sets v = b·tan(w/a) from the layer's current weight.
        """
        cfg = self.config
        self._warn_about_optimizer(getattr(module, "optimizer_config", None))
        a, b = (cfg.init_a, cfg.init_b) if cfg.learnable else (cfg.a, cfg.b)
        for _, layer in select_layers(module.model, cfg.layers, plugin=self.name):
            parametrize.register_parametrization(
                layer, "weight", F.Compander(a, b, learnable=cfg.learnable)
            )
        self._found = None  # the companders are looked up again on the next step

    def _warn_about_optimizer(self, opt: Any) -> None:
        if opt is None:
            return
        if getattr(opt, "weight_decay", 0.0):
            log.warning(
                "%s: the recipe's optimizer.weight_decay also decays the stored v (and a, b); the paper "
                "decays Ψ(v) only (the plugin's weight_decay): set optimizer.weight_decay to 0 to follow it",
                self.name,
            )
        if getattr(opt, "name", "sgd") in ("adam", "adamw"):
            log.warning(
                "%s: the paper uses Powerpropagation's modified Adam step with companded weights; the "
                "recipe's Adam acts on v unmodified (CompanderAdam implements the paper's step)",
                self.name,
            )

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``weight_decay``: the Eq. 5 term, the same for every sample (shape ``[B]``)."""
        n = batch["target"].shape[0]
        companders = self._companders(module.model)
        seen = [c.take_seen() for c in companders]
        if ctx is not None and companders and ctx.logging_step:
            self._log(ctx, companders, seen)
        if not self.config.weight_decay:
            return None
        if not companders:  # nothing reparameterized: nothing to decay
            return {"weight_decay": batch["target"].new_zeros(n, dtype=torch.float32)}
        total = (
            0.5
            * self.config.weight_decay
            * sum((x * x).sum() for x in _decayed(companders, seen, module.model))
        )
        return {"weight_decay": total.expand(n)}

    def _companders(self, model: torch.nn.Module) -> list[F.Compander]:
        """The model's companders, found once per model object (not a module walk every step)."""
        cached = getattr(self, "_found", None)
        if cached is None or cached[0] is not model:
            cached = (model, [m for m in model.modules() if isinstance(m, F.Compander)])
            self._found = cached
        return cached[1]

    @torch.no_grad()
    def _log(self, ctx: StepContext, companders: list[F.Compander], seen: list[Any]) -> None:
        """The diagnostics, as tensors on the weights' device (no host read here), on the steps
        the trainer writes logs only (``ctx.logging_step``)."""
        ws = [s[1] for s in seen if s is not None]
        if ws:
            near = torch.stack([(w.abs() < NEAR_ZERO).sum() for w in ws]).sum() / sum(
                w.numel() for w in ws
            )
            ctx.log("compander/near_zero_fraction", near)
            ctx.log("compander/max_abs_weight", torch.stack([w.abs().max() for w in ws]).max())
        if self.config.learnable:
            ctx.log(
                "compander/mean_a", torch.stack([c.a.detach().mean() for c in companders]).mean()
            )
            ctx.log(
                "compander/mean_b", torch.stack([c.b.detach().mean() for c in companders]).mean()
            )


def _decayed(
    companders: list[F.Compander], seen: list[Any], model: torch.nn.Module
) -> list[torch.Tensor]:
    """What Eq. 5 decays, per compander: Ψ(v) (fixed) or v (learnable), from this step's forward.

    A compander whose forward did not run with gradients since the last step (no training
    forward, e.g. when the hook is called on its own) recomputes its input from its layer's
    parametrization chain.
    """
    out = []
    fresh = None
    for c, s in zip(companders, seen, strict=True):
        if s is None:
            if fresh is None:
                fresh = _recompute(model)
            s = fresh[id(c)]
        v, w = s
        out.append(v if c.learnable else w)
    return out


def _recompute(model: torch.nn.Module) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(input, output) of every Compander, by running each parametrization chain once."""
    found = {}
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for plist in m.parametrizations.values():
            x = plist.original
            for p in plist:
                y = p(x)
                if isinstance(p, F.Compander):
                    found[id(p)] = (x, y)
                x = y
    return found


__all__ = ["NEAR_ZERO", "WeightCompander", "WeightCompanderConfig"]
