"""The ``inpo`` plugin: :mod:`.functional` wired to the objective hooks."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_inpo import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "inpo"

BIBTEX = """\
@misc{zhang2025iterative,
  title     = {Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning},
  author    = {Yuheng Zhang and Dian Yu and Baolin Peng and Linfeng Song and Ye Tian and Mingyue Huo and Nan Jiang and Haitao Mi and Dong Yu},
  year      = {2025},
  note      = {ICLR 2025},
  eprint    = {2407.00617},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2407.00617},
}"""


def _positive(name: str, v: Any, *, allow_zero: bool = False) -> None:
    if (
        isinstance(v, bool)
        or not isinstance(v, int | float)
        or not math.isfinite(v)
        or v < 0
        or (v == 0 and not allow_zero)
    ):
        raise ValueError(
            f"InpoConfig.{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}"
        )


@dataclass(frozen=True)
class InpoConfig:
    """Hyper-parameters; defaults from §4.1 and App. B of the paper.

    :ivar eta: η, the OMD parameter (1/η is the mirror-descent learning rate); 0.005 in the
        paper (grid {0.1, 0.01, 0.0075, 0.005, 0.002}). Small η means big OMD steps.
    :ivar tau: τ, the KL strength towards π_ref; ``None``: η/3 (the paper's choice). 0 is the
        paper's "w/o KL" ablation (then no copy of π_ref is kept).
    :ivar iteration_steps: K, optimizer steps per INPO iteration: after every K steps the
        policy is snapshotted as π_{t+1} (``module.snapshot_reference()``). The paper runs
        T = 3 iterations, each on its own 20K prompts; set ``trainer.max_steps = T·K``.
    :ivar on_policy_weights: weight pairs by π_t(y_w)π_t(y_l) (mean 1 over the global batch), so
        a fixed set of pairs stands for pairs sampled from π_t, as Eq. 8 requires. Off: the data
        are taken as sampled from π_t (the paper's online setting).
    """

    eta: float = 0.005
    tau: float | None = None
    iteration_steps: int = 100
    on_policy_weights: bool = False

    def __post_init__(self) -> None:
        _positive("eta", self.eta)
        if self.tau is not None:
            _positive("tau", self.tau, allow_zero=True)
        k = self.iteration_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"InpoConfig.iteration_steps must be an integer >= 1, got {k!r}")
        if not isinstance(self.on_policy_weights, bool):
            raise ValueError(
                f"InpoConfig.on_policy_weights must be true or false, got {self.on_policy_weights!r}"
            )

    @property
    def tau_value(self) -> float:
        return self.eta / 3 if self.tau is None else float(self.tau)


class Inpo(Plugin):
    """INPO (Algorithm 1 of Zhang et al.): the loss of Eq. 8 against policy snapshots.

    Replaces DPO (``replaces_task_loss``) with ``(h_t(π, y_w, y_l) − 1/(2η))²`` per pair, where
    π_t is the module's reference model and π_ref a frozen copy of the initial policy that the
    plugin keeps (its weights are the plugin's state, so in checkpoints). The recipe's
    ``objective.reference`` must be ``model``: it starts as π₁ = π_ref and, after every
    ``iteration_steps`` optimizer steps, :meth:`~paperhooks.preference.PreferenceModule.snapshot_reference`
    makes it π_{t+1} (the snapshot is in the module's weights, so a resumed run continues the
    same iteration bit-identically; the iteration number is ``⌊step / K⌋ + 1``).

    On N processes: the loss is per pair; the snapshot copies identical (DDP-synchronized)
    weights on every rank; the optional on-policy weights are a softmax over the **global**
    batch (gathered), so N processes compute what 1 process computes on the global batch.
    Logs ``inpo/iteration`` and, on the tabular fixture, ``inpo/exploitability``.
    """

    Config = InpoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="Iterative Nash Policy Optimization: Aligning LLMs with General Preferences via No-Regret Learning",
        authors=(
            "Yuheng Zhang",
            "Dian Yu",
            "Baolin Peng",
            "Linfeng Song",
            "Ye Tian",
            "Mingyue Huo",
            "Nan Jiang",
            "Haitao Mi",
            "Dong Yu",
        ),
        year=2025,
        venue="ICLR 2025",
        arxiv="2407.00617",
        bibtex=BIBTEX,
        code="none found",
        checked_against=(
            "the paper's text (arXiv 2407.00617, ICLR 2025 version): Eq. 4-8, Algorithm 1, Prop. 6, §4.1 and App. B "
            "(η = 0.005, τ = η/3, T = 3); no official code exists; the loss's minimizer checked against the "
            "closed-form OMD step (Eq. 5) on the tabular fixture"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }
    config: InpoConfig

    def __init__(self, config: InpoConfig | None = None) -> None:
        super().__init__(config)
        self.reference: torch.nn.Module | None = None  # π_ref (τ > 0 only)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.reference is None:
            return {}
        return {
            "reference": {k: v.detach().clone() for k, v in self.reference.state_dict().items()}
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "reference" in state:
            if self.reference is None:
                raise ValueError(
                    "inpo: a checkpoint with π_ref, but the plugin was not set up (τ = 0?)"
                )
            self.reference.load_state_dict(state["reference"])

    # -- hooks ------------------------------------------------------------------------------
    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        """Check the reference mode; keep π_ref = a frozen copy of the initial policy (τ > 0)."""
        if getattr(getattr(module, "objective", None), "reference", None) != "model":
            raise ValueError(
                "inpo needs a preference task with objective.reference 'model' (its snapshots are the "
                f"π_t of the iterations); got {getattr(getattr(module, 'objective', None), 'reference', None)!r}"
            )
        if self.config.tau_value > 0 and self.reference is None:
            self.reference = copy.deepcopy(module.model).requires_grad_(False).eval()

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """The Eq. 8 loss per pair, as ``loss`` (it replaces DPO)."""
        from paperhooks.preference import pair_inputs

        cfg = self.config
        eta, tau = cfg.eta, cfg.tau_value
        w, lo = outputs["chosen_logps"], outputs["rejected_logps"]
        snap_w, snap_l = outputs["ref_chosen_logps"], outputs["ref_rejected_logps"]  # π_t
        if self.reference is not None:
            ids, attention, mask = pair_inputs(batch)
            self.reference.to(ids.device)
            with torch.no_grad():
                seq = (self.reference(ids, attention) * mask).sum(1)
            b = w.shape[0]
            ref_w, ref_l = seq[:b], seq[b:]
        else:
            ref_w, ref_l = torch.zeros_like(w), torch.zeros_like(lo)
        h = F.log_ratio_h(w, lo, ref_w, ref_l, snap_w, snap_l, eta, tau)
        loss = F.inpo_loss(h, eta)
        if cfg.on_policy_weights:
            s = (snap_w + snap_l).detach()
            everything, mine = ctx.dist.all_gather_cat(s)
            loss = loss * F.on_policy_weights(everything, torch.zeros_like(everything))[mine]
        return {"loss": loss}

    @hookimpl
    def lifecycle_step_end(self, module: Any, ctx: StepContext) -> None:
        """After every K-th optimizer step: π_{t+1} ← the policy (``snapshot_reference``)."""
        if ctx.step % self.config.iteration_steps == 0:
            module.snapshot_reference()
        ctx.log("inpo/iteration", float(ctx.step // self.config.iteration_steps + 1))
        dm = getattr(getattr(module, "trainer", None), "datamodule", None)
        preference = getattr(dm, "preference_matrix", None)
        if preference is not None and hasattr(module.model, "log_probs"):
            with torch.no_grad():
                pi = module.model.log_probs().exp()
                ctx.log(
                    "inpo/exploitability", F.exploitability(pi, preference.to(pi.device)).mean()
                )
