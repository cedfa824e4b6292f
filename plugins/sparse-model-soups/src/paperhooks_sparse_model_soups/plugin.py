"""The ``sparse-model-soups`` plugin: one SMS phase (IMP prune + LLR retraining) of a staged recipe."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_sparse_model_soups import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "sparse-model-soups"

BIBTEX = """\
@inproceedings{zimmer2024sparse,
  title     = {Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging},
  author    = {Max Zimmer and Christoph Spiegel and Sebastian Pokutta},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2306.16788},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2306.16788},
}"""

#: the learning rate LLR decays from (η), kept in each optimizer param group (so it is saved
#: with the optimizer state and a resumed fit continues the same schedule)
MAX_LR = "sms_max_lr"


@dataclass(frozen=True)
class SparseModelSoupsConfig:
    """Defaults: ``main.py`` of ``ZIB-IOL/SMS`` (``goal_sparsity`` 0.9, ``n_phases`` 1,
    ``retrain_schedule`` LLR) and ``define_retrain_schedule`` (10 % warm-up).

    :ivar goal_sparsity: s, the sparsity after the last phase (SMS ``goal_sparsity``).
    :ivar n_phases: the number of prune–retrain phases (SMS ``n_phases``).
    :ivar phase: k, the phase this fit is (1..n_phases, SMS ``phase``): at its start it prunes
        ``1 − (1 − s)^{1/n_phases}`` of the remaining weights, reaching ``1 − (1 − s)^{k/n_phases}``.
        The masks it starts from must be those of phase k − 1 (dense for k = 1).
    :ivar retrain_schedule: ``llr`` (SMS's default: cosine warm-up from 0, then linear decay
        from the recipe's ``optimizer.lr`` to 0 over the fit) or ``none`` (the recipe's own).
    :ivar warmup_fraction: LLR's warm-up, a fraction of the fit's optimizer steps (SMS: 0.1).
    """

    goal_sparsity: float = 0.9
    n_phases: int = 1
    phase: int = 1
    retrain_schedule: Literal["llr", "none"] = "llr"
    warmup_fraction: float = 0.1

    def __post_init__(self) -> None:
        s = self.goal_sparsity
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0 <= s < 1:
            raise ValueError(
                f"SparseModelSoupsConfig.goal_sparsity must be a number in [0, 1), got {s!r}"
            )
        for key in ("n_phases", "phase"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"SparseModelSoupsConfig.{key} must be an integer >= 1, got {v!r}")
        if self.phase > self.n_phases:
            raise ValueError(
                f"SparseModelSoupsConfig.phase ({self.phase}) must be <= n_phases ({self.n_phases})"
            )
        if self.retrain_schedule not in ("llr", "none"):
            raise ValueError(
                f"SparseModelSoupsConfig.retrain_schedule must be 'llr' or 'none', got {self.retrain_schedule!r}"
            )
        w = self.warmup_fraction
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < 1:
            raise ValueError(
                f"SparseModelSoupsConfig.warmup_fraction must be a number in [0, 1), got {w!r}"
            )


class SparseModelSoups(Plugin):
    """Phase k of Sparse Model Soups' iterative magnitude pruning, with its LLR retraining.

    At the start of the fit (the core's step-0 call of ``pruning_schedule``) the masks are
    updated once: of the ``n`` Linear/Conv weights, ``p`` pruned so far, the fit prunes
    ``round(f·(n − p))`` more by global magnitude, ``f = 1 − (1 − s)^{1/n_phases}``
    (``IMP.at_train_end`` in ``strategies/strategies.py``; counts as ``torch.nn.utils.prune``'s
    ``PruningContainer``), so phase k ends at sparsity ``1 − (1 − s)^{k/n_phases}``. The
    masks then stay for the whole fit. With ``retrain_schedule: llr`` the learning rate of
    step t is ``η·llr(t, T)`` (:func:`~paperhooks_sparse_model_soups.functional.llr_factor`),
    η the optimizer's ``lr``, T the fit's steps.

    A full SMS run is a staged recipe: a dense stage, then per phase a soup stage whose
    ingredients all carry this plugin with ``phase: k`` (each prunes the previous soup — the
    same weights, so the same masks — and retrains under its own seed, weight decay...), and
    the core's ``soup`` averages them and recalibrates BatchNorm. A phase stage without
    ingredients is plain IMP. Under DDP every rank prunes the same replicated weights (same
    masks, no collective) and sets the same learning rate, so N processes compute what one
    does on the global batch.
    """

    Config = SparseModelSoupsConfig
    name = NAME
    family: ClassVar[str] = "pruning"
    paper: ClassVar[Paper] = Paper(
        title="Sparse Model Soups: A Recipe for Improved Pruning via Model Averaging",
        authors=("Max Zimmer", "Christoph Spiegel", "Sebastian Pokutta"),
        year=2024,
        venue="ICLR 2024",
        arxiv="2306.16788",
        bibtex=BIBTEX,
        code="https://github.com/ZIB-IOL/SMS",
        checked_against=(
            "ZIB-IOL/SMS @ 5308fad: strategies/strategies.py (IMP.at_train_end, pruning_step: prune_per_phase, "
            "global L1Unstructured), runners/baseRunner.py (define_retrain_schedule: LLR), "
            "runners/pretrainedRunner.py (phases, ensemble_by), strategies/ensembleStrategies.py (soups, in the core)"
        ),
        verified=True,
    )
    #: one process and DDP (replicated weights) tested; SMS is a staged recipe and stages pass
    #: whole model states between fits, which the core implements for one process and DDP only
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: SparseModelSoupsConfig

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._module: Any = None

    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        self._module = module  # its masks (the phase's start) and optimizer

    def _target(self) -> float:
        """The sparsity after this phase, counted as SMS counts (from the masks in force)."""
        c = self.config
        masks = self._module.masks
        n = sum(m.mask.numel() for m in masks.values())
        pruned = sum(int((~m.mask).sum()) for m in masks.values())
        expected = F.pruned_counts(n, c.goal_sparsity, c.n_phases)[c.phase - 1]
        if pruned != expected:
            raise ValueError(
                f"{NAME}: phase {c.phase} of {c.n_phases} (goal_sparsity {c.goal_sparsity}) must start from the masks of "
                f"phase {c.phase - 1}: {expected} of {n} weights pruned, but {pruned} are; give the stages phases 1, 2, ... "
                "in order"
            )
        return F.pruned_after_phase(n, pruned, c.goal_sparsity, c.n_phases) / n

    def _start_llr(self, ctx: StepContext) -> None:
        trainer = self._module.trainer
        if trainer.lr_scheduler_configs:
            raise ValueError(
                f"{NAME}: retrain_schedule 'llr' sets the learning rate of every step itself; set optimizer.scheduler: none "
                "(or retrain_schedule: none to keep the recipe's scheduler)"
            )
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group[MAX_LR] = group["lr"]
        self._set_lr(ctx.step, ctx)

    def _set_lr(self, t: int, ctx: StepContext) -> None:
        factor = F.llr_factor(t, ctx.max_steps or 0, self.config.warmup_fraction)
        for opt in self._module.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = group[MAX_LR] * factor
        ctx.log("sms/lr_factor", factor)

    @hookimpl
    def pruning_schedule(self, ctx: StepContext) -> float | None:
        """The phase's sparsity at step 0 (before the first update), then ``None`` (masks kept).

        The core asks step 0 once, at the start of a fresh fit (not on resume, whose masks
        and learning rate come from the checkpoint); that is also where LLR starts. Without a
        module (a bare schedule) the value is the closed form ``1 − (1 − s)^{k/n_phases}``.
        """
        if ctx.step != 0:
            return None
        c = self.config
        if self._module is None or not getattr(self._module, "masks", None):
            return F.phase_sparsity(c.goal_sparsity, c.n_phases, c.phase)
        target = self._target()
        if c.retrain_schedule == "llr" and getattr(self._module, "_trainer", None) is not None:
            self._start_llr(ctx)
        return target

    @hookimpl
    def lifecycle_step_end(self, module: Any, ctx: StepContext) -> None:
        """LLR: after step t (``ctx.step`` = t + 1 steps done), the learning rate of step t + 1."""
        if self.config.retrain_schedule == "llr":
            self._set_lr(ctx.step, ctx)
