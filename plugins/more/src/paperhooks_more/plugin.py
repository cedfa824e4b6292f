"""The ``more`` plugin: :mod:`.functional` wired to the objective, surgery and metric hooks."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_more import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext
    from paperhooks.gradients import Direction, GradientSet
    from paperhooks_more.metric import PreferenceCalibrationError

NAME = "more"

BIBTEX = """\
@article{zeng2023diverse,
  title   = {On Diversified Preferences of Large Language Model Alignment},
  author  = {Zeng, Dun and Dai, Yong and Cheng, Pengyu and Wang, Longyue and Hu, Tianhao
             and Chen, Wanshun and Du, Nan and Xu, Zenglin},
  journal = {arXiv preprint arXiv:2312.07401},
  year    = {2023},
  url     = {https://arxiv.org/abs/2312.07401}
}"""


@dataclass(frozen=True)
class MoreConfig:
    """Hyper-parameters; defaults from the official README's training command.

    :ivar num_tasks: T, the number of preference datasets (``--task_num 5``); the objectives
        are named ``task0`` … ``task{T-1}``.
    :ivar alpha: α of the gradient EMA m ← (1 − α)m + αg (``--alpha 0.99``).
    :ivar normalize: ``l2`` divides each EMA by its norm before the min-norm solve
        (``--normalize l2``); ``none`` does not (the code's ``loss``/``loss+`` are not ported).
    :ivar reweight: False gives λ_t = 1/T', the plain mean over all pairs (``--reweight``).
    :ivar head: the parameters whose gradients set λ: ``auto`` is the last module that has
        parameters (the reward head), else a glob over parameter names (``model.head.*``).
    :ivar task_key: the batch field holding each row's dataset id in [0, T).
    :ivar ece_bins: bin counts of the logged ECE metrics (official ``calibration_bins``).
    """

    num_tasks: int = 5
    alpha: float = 0.99
    normalize: Literal["l2", "none"] = "l2"
    reweight: bool = True
    head: str = "auto"
    task_key: str = "task"
    ece_bins: tuple[int, ...] = (5, 10, 20)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        n = self.num_tasks
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{owner}.num_tasks must be an integer >= 1, got {n!r}")
        a = self.alpha
        if (
            isinstance(a, bool)
            or not isinstance(a, int | float)
            or not (math.isfinite(a) and 0 < a <= 1)
        ):
            raise ValueError(f"{owner}.alpha must be a number in (0, 1], got {a!r}")
        if self.normalize not in ("l2", "none"):
            raise ValueError(
                f"{owner}.normalize must be one of ['l2', 'none'], got {self.normalize!r}"
            )
        if not isinstance(self.reweight, bool):
            raise ValueError(f"{owner}.reweight must be true or false, got {self.reweight!r}")
        for field in ("head", "task_key"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{owner}.{field} must be a non-empty string, got {value!r}")
        bins = self.ece_bins
        if not isinstance(bins, tuple) or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in bins
        ):
            raise ValueError(f"{owner}.ece_bins must be a list of integers >= 1, got {bins!r}")


class More(Plugin):
    """Multi-Objective Reward learning (MORE; Zeng et al., arXiv 2312.07401).

    One ranking-loss objective per preference dataset, L_t over the pairs of dataset t in the
    global batch (:meth:`objective_terms`). The core computes their gradients; MORE reads
    those of the reward head only (:meth:`surgery_parameters`), keeps an EMA m_t of them,
    L2-normalizes it, and takes λ = the Frank–Wolfe min-norm point of the ĝ_t. The whole model
    then follows Σ_t c_t ∇L_t with c_t = λ_t·T'·N_t/N, which is the gradient of the official
    loss T'·Σ_t λ_t·(summed pair losses of t)/N (:meth:`surgery_combine`). Also: the RM's
    expected calibration error as validation metrics (:meth:`metric_build`).

    Many processes: the gradients the core hands over are those of the global objectives,
    identical on every rank, so the EMA and λ are too; the per-task pair counts are summed
    over ranks. The official code solves for λ on each rank's own batch instead.
    """

    Config = MoreConfig
    name = NAME
    family: ClassVar[str] = "gradient-surgery"
    extra_families: ClassVar[tuple[str, ...]] = ("objective", "metric")
    replaces_task_loss: ClassVar[bool] = True
    #: keeps the EMA of gradient vectors in its state: needs the full layout
    columns_ok: ClassVar[bool] = False
    paper: ClassVar[Paper] = Paper(
        title="On Diversified Preferences of Large Language Model Alignment",
        authors=(
            "Dun Zeng",
            "Yong Dai",
            "Pengyu Cheng",
            "Longyue Wang",
            "Tianhao Hu",
            "Wanshun Chen",
            "Nan Du",
            "Zenglin Xu",
        ),
        year=2023,
        venue="arXiv preprint",
        arxiv="2312.07401",
        bibtex=BIBTEX,
        code="https://github.com/dunzeng/MORE",
        checked_against=(
            "dunzeng/MORE @ e7baee6: trainer.py (ranking_loss, more_ranking_loss, "
            "RewardModelTrainer.compute_lambda / compute_lambda_noresampling / compute_more_loss: "
            "EMA (1-alpha)*grad_m + alpha*grad of the reward head's gradient, normalize, "
            "find_min_norm_element_FW, rescale x task count / total pairs), utils.py "
            "(gradient_normalizer 'l2', calibration_error), arguments.py; min_norm_solvers.py @ "
            "f60b993 (MinNormSolver: MAX_ITER 1000, STOP_CRIT 1e-5, 0.999/0.001 clipping); "
            "trainer_utils.py @ 7aae1c6 (compute_metrics: ECE over both orders, 5/10/20 bins); "
            "README @ 07d29b8 (--task_num 5 --normalize l2 --alpha 0.99 --resampling, lr 1e-6). "
            "Only the paper's abstract was readable; the equations are the official code's."
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        # FSDP2 gives each rank a shard of the gradients; the EMA of whole gradient vectors
        # in this plugin's state needs the full layout (columns_ok = False)
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: MoreConfig

    def __init__(self, config: MoreConfig | None = None) -> None:
        super().__init__(config)
        self.task_names = tuple(f"task{t}" for t in range(self.config.num_tasks))
        self.average: torch.Tensor | None = None  # [K, P_head]: the EMA m_t, one row per objective
        self.average_names: tuple[str, ...] = ()
        self._counts: torch.Tensor | None = None  # [T] global pair counts of this step
        self._warned = False

    # -- set-up ------------------------------------------------------------------------------
    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        """Check the training set's task ids against ``num_tasks`` before training starts."""
        try:
            trainer = module.trainer
        except (AttributeError, RuntimeError):  # not attached to a Trainer
            return
        train = getattr(getattr(trainer, "datamodule", None), "train_set", None)
        tensors = getattr(train, "tensors", None)
        if not isinstance(tensors, Mapping):
            return
        key, t_count = self.config.task_key, self.config.num_tasks
        if key not in tensors:
            raise ValueError(
                f"{NAME}: the training set has no {key!r} field (each pair's dataset id); "
                f"fields: {sorted(tensors)}. Set plugins.{NAME}.task_key, or use data: diverse-preferences"
            )
        found = sorted({int(i) for i in tensors[key].unique().tolist()})
        if found != list(range(t_count)):
            raise ValueError(
                f"{NAME}: num_tasks is {t_count}, but the training set holds the task ids {found}; "
                f"they must be 0 … num_tasks − 1"
            )

    # -- the objectives ------------------------------------------------------------------------
    def _task_ids(
        self, batch: Mapping[str, torch.Tensor], rows: int, device: torch.device
    ) -> torch.Tensor:
        key = self.config.task_key
        if key not in batch:
            if not self._warned:
                warnings.warn(
                    f"{NAME}: the batch has no {key!r} ids; every pair counts as task 0, so MORE "
                    "trains on the plain ranking loss",
                    stacklevel=3,
                )
                self._warned = True
            return torch.zeros(rows, dtype=torch.int64, device=device)
        task = batch[key].to(device).long().reshape(-1)
        if task.numel() != rows:
            raise ValueError(f"{NAME}: batch[{key!r}] has {task.numel()} ids for {rows} rows")
        if rows and (int(task.min()) < 0 or int(task.max()) >= self.config.num_tasks):
            raise ValueError(
                f"{NAME}: task ids must lie in [0, {self.config.num_tasks}), got {sorted(set(task.tolist()))}"
            )
        return task

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        """``task{t}``: per-row terms whose global mean is L_t, the mean ranking loss over the
        pairs of dataset t in the global batch.

        Row i of task t contributes S_i · B_local · R / N_t (S_i its summed pair losses, R the
        world size, N_t the global pair count of t): the core averages over the B_local rows
        and over the R ranks, which leaves Σ_{i∈t} S_i / N_t = L_t.
        """
        rewards, scores = F.batch_rewards_and_scores(outputs, batch)
        rows = rewards.shape[0]
        task = self._task_ids(batch, rows, rewards.device)
        sums, counts = F.pair_losses(rewards, scores)  # [B], [B]
        t_count = self.config.num_tasks
        local = F.task_pair_counts(counts, task, t_count)  # [T] pairs of each task on this rank
        self._counts = dist.all_reduce_sum(local).cpu()  # [T] global N_t
        scale = rows * dist.world_size() / self._counts.clamp_min(1.0)  # [T]
        per_row = sums * scale.to(sums.device, sums.dtype)[task]  # [B]
        return {
            name: per_row * (task == t).to(per_row.dtype) for t, name in enumerate(self.task_names)
        }

    # -- the surgery ---------------------------------------------------------------------------
    @hookimpl
    def surgery_parameters(self, module: Any, names: Sequence[str]) -> list[str]:
        """The reward head's parameters: λ depends on their gradients only (official
        ``compute_lambda`` differentiates a copy of ``reward_head``)."""
        pattern = self.config.head
        if pattern == "auto":
            picked = _last_parameterized_module(module, set(names))
            where = "the last module with trainable parameters"
        else:
            picked = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            where = f"head pattern {pattern!r}"
        if not picked:
            raise ValueError(
                f"{NAME}: {where} matches no trainable parameter; parameters: {list(names)[:8]}"
            )
        return picked

    @hookimpl
    def surgery_combine(self, grads: GradientSet, ctx: StepContext) -> Direction:
        """d = Σ_t c_t g_t, c_t = λ_t · T' · N_t / N, λ from the L2-normalized EMA of the head
        gradients (official ``compute_lambda_noresampling`` + ``more_ranking_loss``).

        Tasks without pairs in the global batch keep their EMA and get λ_t = 0.
        """
        names, rows = grads.names, grads.rows  # [K, P_head], the global gradients
        counts, self._counts = self._counts, None
        if counts is None:  # called outside a step of this plugin's objectives: balanced tasks
            counts = torch.ones(len(names), dtype=torch.float64)
        elif names != self.task_names:
            raise ValueError(
                f"{NAME}: weighs its own objectives {list(self.task_names)} only, but the surgery "
                f"received {list(names)}; remove the other objectives or the other surgery plugin"
            )
        present = counts > 0
        if self.average is None or self.average.shape != rows.shape or self.average_names != names:
            self.average, self.average_names = torch.zeros_like(rows), names
        average = self.average.to(rows.device)
        mask = present.to(rows.device).unsqueeze(1)
        self.average = torch.where(mask, F.ema(average, rows, self.config.alpha), average)
        m = self.average.double()
        gram = F.normalized_gram(m @ m.T, self.config.normalize)  # [K, K] of ĝ
        lam = (
            F.min_norm_lambda(gram, present) if self.config.reweight else F.uniform_lambda(present)
        )
        coef = F.loss_coefficients(lam, counts)
        for name, value in zip(names, lam.tolist(), strict=True):
            ctx.log(f"{NAME}/lambda_{name}", value)
        ctx.log(f"{NAME}/min_norm", max(float(lam @ gram.cpu() @ lam), 0.0) ** 0.5)
        return grads.combine(coef)

    # -- the metric ----------------------------------------------------------------------------
    @hookimpl
    def metric_build(self, module: Any, ctx: StepContext) -> dict[str, PreferenceCalibrationError]:
        """``rm_ece_bin{n}``: the ECE of σ(r_i − r_j) over all ranked pairs, n equal bins."""
        from paperhooks_more.metric import PreferenceCalibrationError

        return {
            f"rm_ece_bin{n}": PreferenceCalibrationError(n_bins=n) for n in self.config.ece_bins
        }

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.average is None:
            return {}
        return {"average": self.average.detach().clone(), "names": list(self.average_names)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "average" not in state:
            self.average, self.average_names = None, ()
            return
        self.average = state["average"].detach().clone()
        self.average_names = tuple(state["names"])


def _last_parameterized_module(module: torch.nn.Module, trainable: set[str]) -> list[str]:
    """Names of the trainable parameters of the last module (in registration order) that owns any."""
    last: list[str] = []
    for prefix, sub in module.named_modules():
        own = [f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False)]
        own = [n for n in own if n in trainable]
        if own:
            last = own
    return last


__all__ = ["More", "MoreConfig"]
