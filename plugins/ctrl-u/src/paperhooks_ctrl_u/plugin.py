"""The ``ctrl-u`` plugin: :mod:`.functional` wired to the sample-weighting and objective hooks."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_ctrl_u import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

BIBTEX = """\
@inproceedings{zhang2025ctrlu,
  title     = {Ctrl-U: Robust Conditional Image Generation via Uncertainty-aware Reward Modeling},
  author    = {Zhang, Guiyu and Gao, Huan-ang and Jiang, Zijian and Zhao, Hao and Zheng, Zhedong},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025},
  eprint    = {2410.11236},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2410.11236}
}"""

#: the output keys the plugin compares, in order of preference, and the divergence each implies
OUTPUT_KEYS = {"logits": "kl", "prediction": "l1"}


@dataclass(frozen=True)
class CtrlUConfig:
    """Hyper-parameters; defaults from the official ``train/ctrlu-*.py`` argument parsers.

    :ivar u_scale: λ (official ``u_scale``, default 0.1; the ADE20K script uses 1). With ``kl``
        it scales U itself (U = λ·KL, penalty + U); with ``l1`` only the penalty (+ λ·U).
    :ivar divergence: ``kl`` (segmentation form, on ``outputs["logits"]``), ``l1`` (depth form,
        on ``outputs["prediction"]``) or ``auto`` (``kl`` for logits, ``l1`` for predictions).
    :ivar input_noise: σ of Gaussian noise added to the inputs of the second forward pass (the
        adaptation's stand-in for the paper's second timestep, t + 1, of the same noisy
        latent). Drawn per step from the recipe seed for the global batch, so N processes
        draw what 1 process draws. 0 leaves the inputs alone; the passes then differ only
        through stochastic layers (dropout) of the model.
    """

    u_scale: float = 0.1
    divergence: Literal["auto", "kl", "l1"] = "auto"
    input_noise: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("u_scale", "input_noise"):
            v = getattr(self, field)
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not (math.isfinite(v) and v >= 0)
            ):
                raise ValueError(f"{name}.{field} must be a finite number >= 0, got {v!r}")
        if self.divergence not in ("auto", "kl", "l1"):
            raise ValueError(
                f"{name}.divergence must be one of auto, kl, l1, got {self.divergence!r}"
            )


@dataclass
class _Step:
    """U and w of one step, from the objective hook to the weighting hook (never saved)."""

    outputs: Mapping[str, torch.Tensor]
    u: torch.Tensor
    w: torch.Tensor


class CtrlU(Plugin):
    """Uncertainty-aware loss of Ctrl-U (Zhang et al., ICLR 2025), Eq. 4 as in the official code.

    Each step the module runs a second forward pass of the same samples (the paper: the same
    latent at timestep t + 1), the disagreement U of the two predictions is measured, and
    sample i's loss is weighted by ``w_i = exp(−U_i)`` while ``c·U_i`` is added, where c = 1
    (``kl``) or λ (``l1``). U is *not* detached: gradients flow through w and the penalty into
    both passes, as in the code.

    Two hooks realize the per-sample objective ``o_i = ℓ_i w_i + c U_i``:
    ``objective_terms`` (runs first) does the second pass and returns the term
    :func:`~paperhooks_ctrl_u.functional.penalty_term`, whose product with w is ``c U_i`` in
    value and gradient; ``weighting_sample_weights`` returns w (with its gradient). The core
    then minimizes ``Σ_i o_i / Σ_j w_j`` (Σ w detached): the official mean of o times the
    positive factor ``1 / mean(w)`` per step.
    """

    Config = CtrlUConfig
    name = "ctrl-u"
    family: ClassVar[str] = "sample-weighting"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    paper: ClassVar[Paper] = Paper(
        title="Ctrl-U: Robust Conditional Image Generation via Uncertainty-aware Reward Modeling",
        authors=("Guiyu Zhang", "Huan-ang Gao", "Zijian Jiang", "Hao Zhao", "Zhedong Zheng"),
        year=2025,
        venue="ICLR 2025",
        arxiv="2410.11236",
        bibtex=BIBTEX,
        code="https://github.com/grenoble-zhang/Ctrl-U",
        checked_against=(
            "grenoble-zhang/Ctrl-U @ 730f2e6: train/ctrlu-reward.py (two timesteps t and "
            "t + add_timestep in one batch with the same latents and noise; "
            "U = u_scale * sum_c KLDivLoss(log_softmax(o_prim), softmax(o_aux)); "
            "reward_loss * exp(-U); loss += mean(U); U not detached; defaults u_scale 0.1, "
            "add_timestep 1, grad_scale 1, linear_reward_scale_steps 5000), train/ctrlu-depth.py "
            "(U = |o_prim - o_aux|; loss += u_scale * mean(U)) and train/ctrlu_ade20k.sh, "
            "ctrlu_depth.sh (u_scale 1 and 0.1). The paper's own Eq. 4 text was not available; "
            "the code's comment says its form matches the effect of Eq. 4."
        ),
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: CtrlUConfig

    def __init__(self, config: CtrlUConfig | None = None) -> None:
        super().__init__(config)
        self._step: _Step | None = None
        self._warned_zero = False
        self._warned_alone = False

    # -- the two predictions -----------------------------------------------------------
    def _key(self, outputs: Mapping[str, torch.Tensor]) -> tuple[str, str]:
        for key, divergence in OUTPUT_KEYS.items():
            if key in outputs:
                chosen = divergence if self.config.divergence == "auto" else self.config.divergence
                return key, chosen
        raise ValueError(
            f"{F.PLUGIN}: the module's outputs have none of the keys {list(OUTPUT_KEYS)} "
            f"(they have {sorted(outputs)}); the two predictions to compare are read from them"
        )

    def _second_view(
        self, batch: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> Mapping[str, torch.Tensor]:
        """The batch for the second pass: the same inputs, plus σε when ``input_noise`` > 0.

        ε is drawn for the *global* batch from the step generator (identical on every rank and
        on resume) and each rank keeps its rows, so N processes see what 1 process sees.
        """
        sigma = self.config.input_noise
        if sigma == 0:
            return batch
        x = batch["input"]
        if not x.is_floating_point():
            raise ValueError(f"{F.PLUGIN}: input_noise needs floating-point inputs, got {x.dtype}")
        sizes, _ = dist.all_gather_cat(torch.tensor([x.shape[0]], device=x.device))  # [world]
        start = int(sizes[: ctx.rank].sum())
        g = ctx.generator(F.PLUGIN, device=x.device)
        eps = torch.randn(
            (int(sizes.sum()), *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype
        )
        return {**batch, "input": x + sigma * eps[start : start + x.shape[0]]}

    def uncertainty(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> _Step:
        """U and w for this step: a second forward pass, compared with ``outputs``."""
        step = self._step
        if step is not None and step.outputs is outputs:
            return step  # computed by objective_terms earlier in this step
        key, divergence = self._key(outputs)
        second = module.outputs(self._second_view(batch, ctx))[key]
        first = outputs[key]
        mask = batch.get("token_mask")
        if divergence == "kl":
            u = F.kl_uncertainty(first, second, self.config.u_scale, mask)
        else:
            u = F.l1_uncertainty(first, second, mask)
        F.check_finite(u.detach(), "uncertainties U (the two predictions are not finite)")
        if not self._warned_zero and torch.equal(first.detach(), second.detach()):
            self._warned_zero = True
            warnings.warn(
                f"{F.PLUGIN}: the two forward passes agree exactly (U ≈ 0), so every weight is about 1; "
                "use a model with dropout or set input_noise > 0",
                stacklevel=2,
            )
        self._step = _Step(outputs, u, F.uncertainty_weights(u))
        return self._step

    def penalty_scale(self, divergence: str) -> float:
        """c: 1 for ``kl`` (λ is inside U), λ for ``l1``."""
        return 1.0 if divergence == "kl" else self.config.u_scale

    # -- hooks ----------------------------------------------------------------------------
    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``{"ctrl-u": t}`` with ``w_i t_i = c U_i`` (value and gradient): Ctrl-U's penalty."""
        step = self.uncertainty(module, batch, outputs, ctx)
        c = self.penalty_scale(self._key(outputs)[1])
        if c == 0:
            return None
        return {F.PLUGIN: F.penalty_term(step.u, step.w, c)}

    @hookimpl
    def weighting_sample_weights(
        self,
        losses: torch.Tensor,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        module: Any,
        ctx: StepContext,
    ) -> torch.Tensor:
        """w = exp(−U) for this rank's samples, *with* its gradient (U is not detached)."""
        F.check_finite(losses, "per-sample losses")
        if (self._step is None or self._step.outputs is not outputs) and not self._warned_alone:
            self._warned_alone = True
            warnings.warn(
                f"{F.PLUGIN}: objective_terms did not run before the weights this step, so the "
                "penalty c·U is missing from the loss; call the objective hooks first (as "
                "HookedModule does)",
                stacklevel=2,
            )
        step = self.uncertainty(module, batch, outputs, ctx)
        self._step = None  # one step's tensors are not kept past the step
        if step.w.shape != losses.shape:
            raise ValueError(
                f"{F.PLUGIN}: {tuple(step.w.shape)} uncertainties for {tuple(losses.shape)} losses"
            )
        ctx.log(f"{F.PLUGIN}/uncertainty", dist.global_mean(step.u))
        ctx.log(f"{F.PLUGIN}/mean_weight", dist.global_mean(step.w))
        return step.w
