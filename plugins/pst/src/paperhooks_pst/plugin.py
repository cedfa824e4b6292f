"""The ``pst`` plugin: PST's learned scores as the pruning criterion, its cubic schedule, per-layer masks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch.nn.utils import parametrize

from paperhooks import pruning
from paperhooks.builtins.pruning import GradualConfig, cubic_sparsity
from paperhooks.dist import step_generator
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_pst import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "pst"

BIBTEX = """\
@inproceedings{li2022pst,
  title     = {Parameter-Efficient Sparsity for Large Language Models Fine-Tuning},
  author    = {Li, Yuchao and Luo, Fuli and Tan, Chuanqi and Wang, Mengdi and Huang, Songfang and Li, Shen and Bai, Junjie},
  booktitle = {Proceedings of the Thirty-First International Joint Conference on Artificial Intelligence (IJCAI-22)},
  year      = {2022},
  eprint    = {2205.11005},
  archivePrefix = {arXiv},
}"""


def _number(key: str, value: Any, lo: float, hi: float, *, hi_open: bool = True) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise ValueError(
            f"PstConfig.{key} must be a number in [{lo}, {hi}{')' if hi_open else ']'}, got {value!r}"
        )


@dataclass(frozen=True)
class PstConfig:
    """PST's hyper-parameters; defaults from the official ``NLU/run_glue.py`` arguments.

    :ivar final_sparsity: s_f (``--sparsity`` 0.9).
    :ivar initial_sparsity: s_i (``--initial_sparsity`` 0).
    :ivar initial_warmup: t_w, the fraction of the T training steps before the sparsity
        rises (``--initial_warmup`` 0.1).
    :ivar final_warmup: t_f, the fraction of T at s_f at the end (``--final_warmup`` 0.3).
    :ivar weight_rank: r_w, rank of U V (``--weight_rank`` 8).
    :ivar weight_beta: β (``--weight_beta`` 1).
    :ivar mask_rank: r_m, rank of A B (``--mask_rank`` 8).
    :ivar mask_alpha1: α₁, scale of the low-rank score (``--mask_alpha1`` 1).
    :ivar mask_alpha2: α₂, scale of the structured score (``--mask_alpha2`` 1).
    :ivar per_layer: every layer at s_t (the official ``SparseBinarizer`` sorts each weight
        alone); ``false`` leaves the allocation to the core (one global threshold) or to an
        allocation plugin.
    :ivar layers: the Linear layers given PST (the official code converts every
        ``nn.Linear`` of the encoder); layers not selected are still masked by the core, by |W|.
    :ivar trainable: glob patterns over ``model.named_parameters()`` names that stay trainable
        besides U, V, A, B, R, C (e.g. a task head); everything else is frozen.
    """

    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    initial_warmup: float = 0.1
    final_warmup: float = 0.3
    weight_rank: int = 8
    weight_beta: float = 1.0
    mask_rank: int = 8
    mask_alpha1: float = 1.0
    mask_alpha2: float = 1.0
    per_layer: bool = True
    layers: Layers = Layers(types=("Linear",), skip_head=False)
    trainable: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _number("final_sparsity", self.final_sparsity, 0.0, 1.0)
        _number("initial_sparsity", self.initial_sparsity, 0.0, 1.0)
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"PstConfig.initial_sparsity ({self.initial_sparsity}) must be <= final_sparsity ({self.final_sparsity})"
            )
        _number("initial_warmup", self.initial_warmup, 0.0, 1.0)
        _number("final_warmup", self.final_warmup, 0.0, 1.0)
        if self.initial_warmup + self.final_warmup >= 1.0:
            raise ValueError(
                f"PstConfig.initial_warmup + final_warmup must be < 1, got {self.initial_warmup} + {self.final_warmup}"
            )
        for key in ("weight_rank", "mask_rank"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PstConfig.{key} must be an integer >= 1, got {v!r}")
        for key in ("weight_beta", "mask_alpha1", "mask_alpha2"):
            _number(key, getattr(self, key), 0.0, math.inf)
        if not isinstance(self.per_layer, bool):
            raise ValueError(f"PstConfig.per_layer must be true or false, got {self.per_layer!r}")
        if tuple(self.layers.types) != ("Linear",):
            raise ValueError(
                f"PstConfig.layers.types: PST converts Linear layers only, got {list(self.layers.types)}"
            )


class Pst(Plugin):
    """PST (Li et al., IJCAI 2022): frozen W, learned importance S = |W'| + α₁AB + α₂(R1ᵀ + 1Cᵀ).

    Three roles in one plugin:

    - ``reparam_setup`` registers :class:`~.functional.PstWeight` on each selected Linear
      weight (W' = W + βUV; S reaches the loss through the straight-through estimator) and
      freezes every other parameter but the ``trainable`` patterns;
    - ``pruning_schedule``: PST's cubic schedule (``schedule_sparsity_ratio`` of the official
      code), computed by the core's :func:`paperhooks.builtins.pruning.cubic_sparsity`
      (Zhu & Gupta's equation (1)) with t_0 = t_w·T, t_0 + nΔt = T − t_f·T, Δt = 1, so the
      mask follows the scores at every step of the ramp;
    - ``pruning_scores``: S per weight; ``pruning_allocate``: each layer at s_t.

    The core's masks are monotone (a pruned weight stays pruned) and change only when s_t
    does; the official ``SparseBinarizer`` re-sorts S at every forward pass, so it may revive
    a weight and keeps changing the mask at s_f. See the method card.
    """

    Config = PstConfig
    name = NAME
    family: ClassVar[str] = "pruning"
    extra_families: ClassVar[tuple[str, ...]] = ("reparameterization",)
    paper: ClassVar[Paper] = Paper(
        title="Parameter-Efficient Sparsity for Large Language Models Fine-Tuning",
        authors=(
            "Yuchao Li",
            "Fuli Luo",
            "Chuanqi Tan",
            "Mengdi Wang",
            "Songfang Huang",
            "Shen Li",
            "Junjie Bai",
        ),
        year=2022,
        venue="IJCAI 2022",
        arxiv="2205.11005",
        bibtex=BIBTEX,
        code="https://github.com/alibaba/AliceMind/tree/main/S4/PST",
        checked_against=(
            "alibaba/AliceMind @41153b1: S4/PST/pst/sparse.py (SparseBinarizer, SparseLinear.forward: "
            "W' = W + βUV, S = |W'| + α₁AB + α₂(R+C), initializations), S4/PST/pst/utils.py "
            "(schedule_sparsity_ratio), S4/PST/NLU/run_glue.py (defaults); arXiv 2205.11005 abstract"
        ),
        verified=True,
    )
    #: DDP: U..C are ordinary parameters averaged by DDP; W is frozen, so S and the masks are
    #: identical on every rank. FSDP2: the core keeps masks stacked on a reparameterization off
    #: FSDP2 (it scores each rank's rows of ``original ⊙ M``; W' = W + βUV and S need whole V, B, C).
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: PstConfig

    # -- reparameterization ---------------------------------------------------------------------
    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register PstWeight on each selected Linear, then freeze all but U, V, A, B, R, C.

        U, A ~ N(0, 1) are drawn from a generator seeded by (recipe seed, layer name), the same
        on every rank; V = B = 0 and R = C = 0, so W' = W and S = |W| at the start.
        """
        cfg = self.config
        ours: set[int] = set()
        seed = ctx.seed if ctx is not None else 0
        for name, layer in select_layers(module.model, cfg.layers, plugin=self.name):
            out_features, in_features = layer.weight.shape
            p = F.PstWeight(
                out_features,
                in_features,
                weight_rank=cfg.weight_rank,
                weight_beta=cfg.weight_beta,
                mask_rank=cfg.mask_rank,
                alpha1=cfg.mask_alpha1,
                alpha2=cfg.mask_alpha2,
                generator=step_generator(seed, 0, f"pst/{name}"),
            )
            parametrize.register_parametrization(
                layer, "weight", p.to(layer.weight.device, layer.weight.dtype)
            )
            ours.update(id(t) for t in p.parameters())
        for pname, t in module.model.named_parameters():
            t.requires_grad_(
                id(t) in ours or any(fnmatch.fnmatchcase(pname, pat) for pat in cfg.trainable)
            )

    # -- pruning ----------------------------------------------------------------------------------
    @hookimpl
    def pruning_schedule(self, ctx: StepContext) -> float | None:
        """s_t of PST's cubic schedule after ``ctx.step`` of T = ``ctx.max_steps`` steps."""
        cfg = self.config
        if not ctx.max_steps:
            raise ValueError(
                "pst: the schedule needs the number of training steps (trainer.max_steps or max_epochs)"
            )
        begin, end = F.cubic_bounds(ctx.max_steps, cfg.initial_warmup, cfg.final_warmup)
        gradual = GradualConfig(
            initial_sparsity=cfg.initial_sparsity,
            final_sparsity=cfg.final_sparsity,
            begin_step=begin,
            end_step=end,
            frequency=1,
        )
        return cubic_sparsity(ctx.step, gradual)

    @hookimpl
    def pruning_scores(
        self, params: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """S = |W'| + α₁AB + α₂(R1ᵀ + 1Cᵀ) for PST layers, |W| for any other masked layer.

        ``params`` holds M ⊙ W' (the current effective weight): equal to W' wherever M = 1,
        and the core ranks entries already pruned below all others anyway.
        """
        layers = pruning.prunable(module.model)
        out = {}
        with torch.no_grad():
            for k, w in params.items():
                layer = layers[k]
                extra = (
                    [p for p in layer.parametrizations.weight if isinstance(p, F.PstWeight)]
                    if parametrize.is_parametrized(layer, "weight")
                    else []
                )
                out[k] = w.abs() + extra[0].learned() if extra else w.abs()
        return out

    @hookimpl
    def pruning_allocate(
        self, scores: Mapping[str, torch.Tensor], sparsity: float, ctx: StepContext
    ) -> Any:
        """Each layer at s_t (``round(s_t·n_l)`` of its ``n_l`` pruned), or ``None`` (core's global)."""
        if not self.config.per_layer:
            return None
        return pruning.uniform_allocation(scores, sparsity, sharded=pruning.sharded_run(ctx))

    @hookimpl
    def reparam_after_step(self, module: Any, ctx: StepContext) -> None:
        """Log the mean |learned score| (α₁AB + α₂(R + C)) relative to the mean |W'|."""
        if ctx is None:
            return
        ratios = []
        with torch.no_grad():
            for m in module.model.modules():
                if parametrize.is_parametrized(m, "weight"):
                    for p in m.parametrizations.weight:
                        if isinstance(p, F.PstWeight):
                            wp = p.updated(m.parametrizations.weight.original)
                            ratios.append(
                                p.learned().abs().mean() / wp.abs().mean().clamp_min(1e-12)
                            )
        if ratios:
            ctx.log("pst/learned_score_ratio", torch.stack(ratios).mean())


__all__ = ["Pst", "PstConfig"]
