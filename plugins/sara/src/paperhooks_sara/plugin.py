"""The ``sara`` plugin: :mod:`.functional` wired to the reparameterization and objective hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_sara import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "sara"
TERM = "sara_rank"  # the nuclear-norm objective's name (logged as train/sara_rank)

BIBTEX = """\
@inproceedings{hu2025sara,
  title     = {{SaRA}: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation},
  author    = {Hu, Teng and Zhang, Jiangning and Yi, Ran and Huang, Hongrui and Wang, Yabiao and Ma, Lizhuang},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2409.06633},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2409.06633}
}"""


def _number(owner: str, name: str, value: object, low: float, *, strict: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        raise ValueError(
            f"{owner}.{name} must be a finite number {'>' if strict else '>='} {low}, got {value!r}"
        )


def _count(owner: str, name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}.{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class SaraConfig:
    """Hyper-parameters; defaults are the paper's (arXiv 2409.06633v2, App. B and K) and, where
    the paper is silent, the official code's (``sjtuplayer/SaRA`` ``optim/adamw2.py``), see the
    method card.

    :ivar threshold: ε (the paper's θ_t): entries with |P| < ε are fine-tuned (absolute; 2e-3,
        App. K, as in the readme).
    :ivar trainable_fraction: when set, ε is instead the value below which this fraction of
        the selected entries lies at set-up (one global quantile), e.g. 0.1 for a model whose
        weights are not on Stable Diffusion's scale.
    :ivar progressive_iter: T, the step after which the trainable set is re-selected (Sec. 4.3:
        half of the fine-tuning, 2500 of the paper's 5000 iterations; -1 never).
    :ivar lambda_rank: λ_rank, the weight of L_rank (App. K chooses 5e-3; the code's readme
        command passes 5e-4; 0 turns it off).
    :ivar rank_min_dim: only 2-D weights with both dimensions above this are penalized (code 64;
        the paper does not say which matrices L_rank covers).
    :ivar rank_min_entries: a weight is penalized only when more of its entries than this are
        trainable (``adamw2``: ``mask.sum() > 100``; not in the paper).
    :ivar freeze_others: freeze every parameter of the model outside the selected layers
        (SaRA trains nothing else).
    :ivar layers: the layers whose ``weight`` and ``bias`` get the sparse update (the paper
        selects among all parameters, with no layer selection; the code masks every
        parameter of the UNet).
    """

    threshold: float = 2e-3
    trainable_fraction: float | None = None
    progressive_iter: int = 2500
    lambda_rank: float = 5e-3
    rank_min_dim: int = 64
    rank_min_entries: int = 100
    freeze_others: bool = True
    layers: Layers = Layers(
        types=("Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding"), skip_head=False
    )

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _number(owner, "threshold", self.threshold, 0.0, strict=True)
        if self.trainable_fraction is not None:
            f = self.trainable_fraction
            if isinstance(f, bool) or not isinstance(f, int | float) or not 0 < f < 1:
                raise ValueError(f"{owner}.trainable_fraction must be in (0, 1) or null, got {f!r}")
        _count(owner, "progressive_iter", self.progressive_iter, -1)
        _number(owner, "lambda_rank", self.lambda_rank, 0.0, strict=False)
        _count(owner, "rank_min_dim", self.rank_min_dim, 0)
        _count(owner, "rank_min_entries", self.rank_min_entries, 0)
        if not isinstance(self.freeze_others, bool):
            raise ValueError(
                f"{owner}.freeze_others must be true or false, got {self.freeze_others!r}"
            )


class Sara(Plugin):
    """SaRA (Hu et al., ICLR 2025): fine-tune only the smallest-magnitude weights.

    ``reparam_setup`` registers P = M ⊙ V + (1 − M) ⊙ P₀ (:class:`~paperhooks_sara.functional.
    SparseUpdate`) on the ``weight`` and ``bias`` of every selected layer, with M = |P₀| < ε,
    and freezes the rest of the model (Eqs. 2–3). The parameters keep their full shapes (DDP's
    parameter set is fixed), and frozen entries are read from P₀, so no optimizer (AdamW's
    decoupled weight decay and moments included) can move them. ``objective_terms`` adds
    λ_rank‖P_l ⊙ M_l‖_* (Eq. 5) for one 2-D weight l drawn per step from the step generator
    (the official code's choice; the same l on every rank and on resume).
    ``reparam_after_step`` re-selects M at step T (Sec. 4.3).

    Everything is computed from replicated, identical weights, so every rank holds the same
    masks. Under FSDP2 the re-selection and the SVD would see shards (unsupported).
    """

    Config = SaraConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    paper: ClassVar[Paper] = Paper(
        title="SaRA: High-Efficient Diffusion Model Fine-tuning with Progressive Sparse Low-Rank Adaptation",
        authors=(
            "Teng Hu",
            "Jiangning Zhang",
            "Ran Yi",
            "Hongrui Huang",
            "Yabiao Wang",
            "Lizhuang Ma",
        ),
        year=2025,
        venue="ICLR 2025",
        arxiv="2409.06633",
        bibtex=BIBTEX,
        code="https://github.com/sjtuplayer/SaRA",
        checked_against=(
            "arXiv 2409.06633v2 (the ICLR 2025 text): Sec. 3.1 (the smallest 10–20 % of SD's "
            "weights can be zeroed), Eq. 2 (M = |P0| < θ_t), Eq. 3 (masked gradient and update), "
            "Eqs. 4–5 (L_rank = ‖P_M‖_*, weighted by λ_rank), Sec. 4.3 (re-selection after the "
            "first half of the iterations, the others of the first set frozen), Eq. 12 and App. B "
            "(lr = 1e-3·exp(−350·θ_t), AdamW, cosine schedule, 5000 iterations, batch 4), App. K "
            "(θ_t = 2e-3, λ_rank = 5e-3, T = 2500), App. M (meant for models above ~100M "
            "parameters). Where the paper is silent, sjtuplayer/SaRA @ 5cb8c67 optim/adamw2.py: one "
            "random 2-D weight with min dim > 64 and mask.sum() > 100 penalized per step, "
            "update_mask = new mask ⊙ old mask, AdamW state kept at T; @ ea21192 "
            "examples/finetune.py: AdamW betas (0.9, 0.999), eps 1e-8, weight decay 1e-2; @ 4189ee0 "
            "readme.md (threshold 2e-3, progressive_iter 2500, lambda_rank 5e-4)."
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        # the progressive re-selection reads |P| and the penalty takes an SVD of a whole
        # matrix outside the forward pass, where FSDP2 holds only shards; M and P₀ are
        # replicated buffers, so sharding would not save their memory either
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: SaraConfig

    def __init__(self, config: SaraConfig | None = None) -> None:
        super().__init__(config)
        self.threshold: float | None = None  # ε in use
        self.reselected = False
        self._parts: list[tuple[nn.Module, str, F.SparseUpdate]] = []

    # -- set-up ---------------------------------------------------------------------------------
    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register P = M ⊙ V + (1 − M) ⊙ P₀ on the selected layers' weights and biases.

        Called once, before the optimizer is built; identical on every rank.
        """
        cfg = self.config
        model = module.model
        layers = select_layers(model, cfg.layers, plugin=self.name)
        tensors = [
            (layer, t)
            for _, layer in layers
            for t in ("weight", "bias")
            if getattr(layer, t, None) is not None
        ]
        with (
            torch.no_grad()
        ):  # rank 0's values, as DDP will sync them: ε, M and P₀ agree on every rank
            for layer, t in tensors:
                dist.broadcast(getattr(layer, t).detach())
        if self.threshold is None:
            if cfg.trainable_fraction is not None:
                self.threshold = F.quantile_threshold(
                    [getattr(m, t) for m, t in tensors], cfg.trainable_fraction
                )
            else:
                self.threshold = cfg.threshold
        self._parts = []
        for layer, t in tensors:
            part = F.SparseUpdate(getattr(layer, t), self.threshold)
            parametrize.register_parametrization(layer, t, part)
            self._parts.append((layer, t, part))
        if cfg.freeze_others:
            keep = {id(p) for _, layer in layers for p in layer.parameters()}
            for p in model.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
        self._log(ctx)

    def _log(self, ctx: StepContext | None) -> None:
        if ctx is None:
            return
        trainable, total = self.trainable()
        ctx.log(f"{NAME}/threshold", float(self.threshold))
        ctx.log(f"{NAME}/trainable_parameters", float(trainable))
        ctx.log(f"{NAME}/trainable_fraction", trainable / max(total, 1))

    def trainable(self) -> tuple[int, int]:
        """(entries that train, entries of the selected tensors)."""
        return sum(int(p.mask.sum()) for *_, p in self._parts), sum(
            p.mask.numel() for *_, p in self._parts
        )

    # -- the low-rank constraint ----------------------------------------------------------------
    def candidates(self) -> list[tuple[nn.Module, F.SparseUpdate]]:
        """2-D weights with both dimensions above ``rank_min_dim`` (``low_rank_ids``)."""
        return [
            (layer, p)
            for layer, t, p in self._parts
            if t == "weight" and p.mask.dim() == 2 and min(p.mask.shape) > self.config.rank_min_dim
        ]

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """λ_rank · ‖P_l ⊙ M_l‖_* for the step's random l, as the same value for every sample
        (its global-batch mean is the penalty itself)."""
        cfg = self.config
        pool = self.candidates()
        if cfg.lambda_rank == 0 or not pool:
            return None
        pick = int(torch.randint(len(pool), (1,), generator=ctx.generator(f"{NAME}/rank")))
        layer, part = pool[pick]
        if int(part.mask.sum()) <= cfg.rank_min_entries:
            return None
        penalty = cfg.lambda_rank * F.nuclear_norm(layer.weight * part.mask)
        n = batch["target"].shape[0]
        return {TERM: penalty.expand(n)}

    # -- the progressive schedule ---------------------------------------------------------------
    @hookimpl
    def reparam_after_step(self, module: Any, ctx: StepContext) -> None:
        """After T steps, keep training only the entries still below ε (``update_mask``)."""
        if (
            self.config.progressive_iter < 0
            or ctx.step != self.config.progressive_iter
            or self.reselected
        ):
            return
        with torch.no_grad():
            for layer, t, part in self._parts:
                part.reselect(getattr(layer, t), self.threshold)
        self.reselected = True
        self._log(ctx)

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """ε and whether the re-selection happened; the masks and P₀ are model buffers."""
        if self.threshold is None:
            return {}
        return {"threshold": float(self.threshold), "reselected": self.reselected}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        self.reselected = bool(state["reselected"])
        saved = float(state["threshold"])
        if self.threshold is not None and saved != self.threshold:
            raise ValueError(
                f"plugin {self.name!r}: the checkpoint was trained with ε = {saved}, this run selects ε = {self.threshold}"
            )
        self.threshold = saved
