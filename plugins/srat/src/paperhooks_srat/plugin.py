"""The ``srat`` plugin: :mod:`.functional` wired to the sample-weighting and objective hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_srat import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

BIBTEX = """\
@article{wang2021imbalanced,
  title   = {Imbalanced Adversarial Training with Reweighting},
  author  = {Wang, Wentao and Xu, Han and Liu, Xiaorui and Li, Yaxin and Thuraisingham, Bhavani
             and Tang, Jiliang},
  journal = {arXiv preprint arXiv:2107.13639},
  year    = {2021},
  eprint  = {2107.13639},
  archivePrefix = {arXiv},
  url     = {https://arxiv.org/abs/2107.13639}
}"""

TERM = "srat_separability"
"""Name of the objective the separability term is added under (logged as ``train/srat_separability``)."""


@dataclass(frozen=True)
class SRATConfig:
    """Hyper-parameters. The paper's values could not be read (see the method card); the
    defaults come from the methods the reconstruction borrows from, named per field.

    :ivar weighting: class weights w_c: ``inverse`` (∝ 1/n_c) or ``effective`` (∝ inverse
        effective number, Cui et al. 2019).
    :ivar beta: β of the effective number (Cui et al. and LDAM-DRW use 0.9999).
    :ivar switch_at: when the class weights switch on, in ``switch_unit`` (DRW's 160 of 200
        epochs). Before it, every sample weighs the same.
    :ivar switch_unit: ``epoch`` (compared with ``ctx.epoch``) or ``step`` (with ``ctx.step``).
    :ivar sep_weight: λ, the weight of the separability term; 0 turns it off.
    :ivar margin: m of the triplet hinge (FaceNet's 0.2 on L2-normalized features).
    :ivar normalize: compare L2-normalized features (d ∈ [0, 4]) instead of raw ones.
    """

    weighting: Literal["inverse", "effective"] = "inverse"
    beta: float = 0.9999
    switch_at: int = 160
    switch_unit: Literal["epoch", "step"] = "epoch"
    sep_weight: float = 1.0
    margin: float = 0.2
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.weighting not in F.SCHEMES:
            raise ValueError(
                f"SRATConfig.weighting must be one of {', '.join(F.SCHEMES)}, got {self.weighting!r}"
            )
        if self.switch_unit not in ("epoch", "step"):
            raise ValueError(
                f"SRATConfig.switch_unit must be one of epoch, step, got {self.switch_unit!r}"
            )
        _number(self.beta, "beta", lambda v: 0 <= v < 1, "in [0, 1)")
        _number(self.sep_weight, "sep_weight", lambda v: v >= 0, ">= 0")
        _number(self.margin, "margin", lambda v: v >= 0, ">= 0")
        n = self.switch_at
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SRATConfig.switch_at must be an integer >= 0, got {n!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"SRATConfig.normalize must be true or false, got {self.normalize!r}")


def _number(value: Any, name: str, ok: Any, allowed: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"SRATConfig.{name} must be a finite number {allowed}, got {value!r}")


class SRAT(Plugin):
    """Separable Reweighted Adversarial Training (Wang et al., arXiv 2107.13639), reconstructed.

    **Class weights** (sample weighting): w_{y_i} from the class counts n_c of the training
    data, switched on once ``ctx.epoch`` (or ``ctx.step``) reaches ``switch_at``. The counts are
    the labels of every training batch of epoch 0, summed over ranks with
    :func:`paperhooks.dist.all_reduce_sum` (identical on all ranks) and kept in
    :meth:`state_dict`. The weights of a step use the counts of the steps before it, so both
    hooks of one step see the same weights.

    **Separability** (objective term ``srat_separability``): λ·ℓ_i, the batch-hard triplet loss
    of the penultimate features over the *global* batch (features gathered from all ranks; each
    rank gets the exact gradient of its own rows through :func:`~.functional.linearize`). It
    stays unweighted by the class weights, as in L = Σ w CE / Σ w + λ mean ℓ: after the switch
    each term is divided by its own w_{y_i} and multiplied by Σ_j w_{y_j}/N, which the core's
    weighted mean undoes exactly. The features are the input of the last ``nn.Linear`` of
    ``module.model`` (captured by a forward hook registered in ``lifecycle_setup``), or
    ``outputs["features"]`` when the module returns them.

    Adversarial examples come from an input-perturbation plugin (e.g. ``pgd``) placed before
    this one; without it SRAT reweights and separates clean features.
    """

    Config = SRATConfig
    name = "srat"
    family: ClassVar[str] = "sample-weighting"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    paper: ClassVar[Paper] = Paper(
        title="Imbalanced Adversarial Training with Reweighting",
        authors=(
            "Wentao Wang",
            "Han Xu",
            "Xiaorui Liu",
            "Yaxin Li",
            "Bhavani Thuraisingham",
            "Jiliang Tang",
        ),
        year=2021,
        venue="arXiv preprint (ICLR 2022 submission)",
        arxiv="2107.13639",
        bibtex=BIBTEX,
        code="none found",
        checked_against=(
            "Only the abstract and the introduction's first lines (arXiv 2107.13639, ar5iv, "
            "OpenReview Zae_OHNq-y) could be read, re-checked in session 6 (the first author's 2023 "
            "MSU dissertation and WSDM'22 doctoral-consortium abstract were found, abstracts only); "
            "no method section and no official code were found. Class weights follow LDAM-DRW's convention "
            "(Σ_c w_c = C; effective number of Cui et al. 2019), the deferred switch DRW's, the "
            "separability term is the batch-hard triplet loss of Hermans et al. 2017 on FaceNet's "
            "normalized squared distance. All of it is a reconstruction."
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

    config: SRATConfig

    def __init__(self, config: SRATConfig | None = None) -> None:
        super().__init__(config)
        #: n_c: global class counts of epoch 0, float64 (exact for counts below 2^53)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self._features: dict[int, torch.Tensor] = {}  # id(model) -> features of its last forward
        self._hooked: set[int] = set()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = torch.as_tensor(state["counts"], dtype=torch.float64).clone()

    # -- the schedule -----------------------------------------------------------------------------
    def active(self, ctx: StepContext) -> bool:
        """Whether the class weights are on at this step (the deferred switch)."""
        now = ctx.epoch if self.config.switch_unit == "epoch" else ctx.step
        return now >= self.config.switch_at

    def weights_for(self, y: torch.Tensor) -> torch.Tensor:
        """w_{y_i} for labels ``y`` from the counts so far (classes never counted count as 1)."""
        size = max(self.counts.numel(), int(y.max()) + 1 if y.numel() else 0)
        counts = torch.zeros(size, dtype=torch.float64)
        counts[: self.counts.numel()] = self.counts
        w = F.class_weights(counts, self.config.weighting, self.config.beta)  # [C]
        return w.to(y.device)[y]

    # -- sample weighting -------------------------------------------------------------------------
    @hookimpl
    def weighting_sample_weights(
        self, losses: torch.Tensor, batch: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> torch.Tensor | None:
        """Count this batch's classes (epoch 0) and return w_{y_i} once switched on, else ``None``."""
        y = _labels(batch, losses)
        # after agreeing on the number of classes (a max over ranks), one all-reduce carries the
        # class histogram and the number of non-finite losses, so that every rank raises
        # together instead of the others waiting in the next collective (collectives run on
        # the batch's device: NCCL reduces CUDA tensors only)
        size = torch.tensor(
            [max(self.counts.numel(), int(y.max()) + 1 if y.numel() else 0)], device=y.device
        )
        size = int(dist.all_reduce_max(size).item())
        local = torch.zeros(size + 1, dtype=torch.float64, device=y.device)
        local[:size] = torch.bincount(y, minlength=size).to(torch.float64)
        local[size] = (~torch.isfinite(losses)).sum().to(torch.float64)
        both = dist.all_reduce_sum(local).cpu()
        if both[size] > 0:
            raise ValueError(
                f"{F.PLUGIN}: {int(both[size])} per-sample losses of the global batch are NaN or inf"
            )
        w = (
            self.weights_for(y).to(losses.dtype) if self.active(ctx) else None
        )  # counts before this step
        if ctx.epoch == 0:
            grown = torch.zeros(size, dtype=torch.float64)
            grown[: self.counts.numel()] = self.counts
            self.counts = grown + both[:size]
        ctx.log("srat/active", float(w is not None))
        if w is not None and self.counts.numel():
            cw = F.class_weights(self.counts, self.config.weighting, self.config.beta)
            ctx.log("srat/weight_ratio", float(cw.max() / cw.min()))
        return w

    # -- the separability objective -------------------------------------------------------------
    @hookimpl
    def lifecycle_setup(self, module: Any) -> None:
        """Capture the input of the last ``nn.Linear`` of ``module.model``: the features z."""
        if self.config.sep_weight > 0:
            self.watch(module.model)

    def watch(self, model: nn.Module) -> None:
        """Register the forward hook that captures z on ``model`` (idempotent)."""
        if id(model) in self._hooked:
            return
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(
                f"{F.PLUGIN}: the model has no nn.Linear whose input could serve as the features z; "
                "return them as outputs['features'] from the module's outputs()"
            )
        key = id(model)

        def capture(_: nn.Module, args: tuple[Any, ...]) -> None:
            self._features[key] = args[0]

        linears[-1].register_forward_pre_hook(capture)
        self._hooked.add(key)

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor] | None:
        """λ·ℓ_i over the global batch, as per-sample terms with the exact gradient of each rank's rows."""
        cfg = self.config
        if cfg.sep_weight == 0:
            return None
        y = _labels(batch)
        z = self._take_features(module, batch, outputs, y.shape[0]).flatten(1)  # [B, D]
        Z, mine = dist.all_gather_cat(z)  # [N, D]
        Y, _ = dist.all_gather_cat(y)  # [N]
        ell, G = F.triplet_value_and_grad(Z, Y, cfg.margin, cfg.normalize)  # [N], [N, D]
        term = F.linearize(ell[mine], G[mine], z)  # [B]
        if self.active(ctx):
            # the core will weight this term by w_{y_i}/Σ_j w_{y_j}: pre-divide so that the
            # separability term stays the plain global mean (1/N) Σ ℓ_i
            w_all = self.weights_for(Y)  # [N], identical on all ranks
            term = term * (w_all.sum() / (Y.numel() * w_all[mine])).to(term.dtype)
        ctx.log("srat/separability", ell.mean())
        ctx.log("srat/active_triplets", (ell > 0).to(ell.dtype).mean())
        return {TERM: cfg.sep_weight * term}

    def _take_features(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        n: int,
    ) -> torch.Tensor:
        if "features" in outputs:
            z = outputs["features"]
        else:
            model = getattr(module, "model", None)
            if not isinstance(model, nn.Module):
                raise ValueError(
                    f"{F.PLUGIN}: no features for the separability term: return outputs['features'] "
                    "or pass a module whose network is module.model"
                )
            z = self._features.pop(id(model), None)
            if z is None:
                # not watched yet (a loop of one's own, without lifecycle_setup): watch now and
                # pay one extra forward pass, this time only
                self.watch(model)
                module.outputs(batch)
                z = self._features.pop(id(model))
        if z.shape[0] != n:
            raise ValueError(
                f"{F.PLUGIN}: features have {z.shape[0]} rows but the batch has {n} samples"
            )
        return z


def _labels(batch: Mapping[str, torch.Tensor], like: torch.Tensor | None = None) -> torch.Tensor:
    y = batch.get("target")
    if y is None or y.dtype.is_floating_point or y.dim() != 1:
        raise ValueError(f"{F.PLUGIN}: needs batch['target'] as integer class labels of shape [B]")
    if like is not None and like.shape != y.shape:
        raise ValueError(f"{F.PLUGIN}: {y.shape[0]} labels but {like.shape[0]} per-sample losses")
    if y.numel() and int(y.min()) < 0:
        raise ValueError(f"{F.PLUGIN}: class labels must be >= 0, got {int(y.min())}")
    return y
