"""The ``aranyani`` plugin: :mod:`.functional` wired to the objective and gradient-surgery hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_aranyani import functional as F
from paperhooks_aranyani.forest import find_forest

if TYPE_CHECKING:
    from paperhooks.context import StepContext
    from paperhooks.gradients import Direction, GradientSet

NAME = "aranyani"
GROUPS = ("nodes_g0", "nodes_g1")  # the objective terms whose gradients are E_a[∂n/∂θ]

BIBTEX = """\
@inproceedings{chowdhury2024enhancing,
  title     = {Enhancing Group Fairness in Online Settings Using Oblique Decision Forests},
  author    = {Somnath Basu Roy Chowdhury and Nicholas Monath and Ahmad Beirami and Rahul Kidambi
               and Kumar Avinava Dubey and Amr Ahmed and Snigdha Chaturvedi},
  booktitle = {The Twelfth International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2310.11401},
  archivePrefix = {arXiv},
  url       = {https://openreview.net/forum?id=E1NxN5QMOE}
}"""

CHECKED_AGAINST = (
    "brcsomnath/Aranyani@af2cf3f325ff775fc4800adf25252687395b5db5: src/aranyani.py (train_online: "
    "node aggregates, vanilla/momentum/ema gradient averages with the (1-γ)/(1-γ^t) correction, "
    "F per tree and node, the Huber derivative with δ=0.01 and sign(F-δ/2), λ·H'(F)·(E_1-E_0) on "
    "W and B only, Adam lr 2e-3, batch 1, λ=0.3, depth 3, 3 trees), src/fdt.py and src/forest.py "
    "(node decisions σ(xW+B), routing mask, leaf mixture of softmax(θ), tree average, init), "
    "src/utils.py (demographic parity), src/train.py and src/configs/*.yaml (driver defaults)"
)


@dataclass(frozen=True)
class AranyaniConfig:
    """Hyper-parameters, defaults from ``train_online`` in ``src/aranyani.py`` (commit af2cf3f).

    :ivar lambda_const: λ, the weight of the fairness gradient (``lambda_const=0.3``). 0 is the
        official baseline (``compute_fairness=False``): the task gradient alone.
    :ivar delta: δ, the Huber threshold (hard-coded ``huber_loss_delta = 0.01``).
    :ivar gradient_type: how E_a[∂n/∂θ] is averaged over the stream (``gradient_type``):
        ``vanilla`` (running mean, the official default), ``momentum`` (γ-accumulator, no
        correction) or ``ema`` (γ-accumulator with the bias correction (1 − γ)/(1 − γ^t)).
    :ivar gamma: γ of ``momentum``/``ema`` (``base_gamma=0.9``).
    """

    lambda_const: float = 0.3
    delta: float = 0.01
    gradient_type: Literal["vanilla", "momentum", "ema"] = "vanilla"
    gamma: float = 0.9

    def __post_init__(self) -> None:
        def number(name: str, ok: bool, allowed: str) -> None:
            value = getattr(self, name)
            good = (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            )
            if not (good and ok):
                raise ValueError(f"AranyaniConfig.{name} must be {allowed}, got {value!r}")

        number(
            "lambda_const",
            isinstance(self.lambda_const, int | float) and self.lambda_const >= 0,
            "a finite number >= 0",
        )
        number(
            "delta", isinstance(self.delta, int | float) and self.delta > 0, "a finite number > 0"
        )
        number("gamma", isinstance(self.gamma, int | float) and 0 < self.gamma < 1, "in (0, 1)")
        if self.gradient_type not in ("vanilla", "momentum", "ema"):
            raise ValueError(
                f"AranyaniConfig.gradient_type must be one of vanilla, momentum, ema, got {self.gradient_type!r}"
            )


class Aranyani(Plugin):
    """Aranyani's node-level fairness gradient (``train_online`` of the official code).

    **Objective terms** ``nodes_g0``, ``nodes_g1``: per sample, Σ_{t,i} n_{t,i}(x) · 1[a = g] ·
    R·B_r / N_g, with N_g the samples of group g in the *global* batch, B_r this rank's batch and
    R the number of ranks. The core averages each rank's mean over ranks, so the objective is
    E_g[Σ_{t,i} n_{t,i}] over the global batch, and its gradient restricted to node i's (w_i,
    b_i) is E_g[∂n_i/∂θ_i]. The same hook all-reduces the batch's group counts, the per-node
    group sums of n and the online-prediction counts (one collective).

    **Surgery**: reads the two rows' W and B blocks (``grads.view``), folds them and the sums
    into the running aggregates, and returns the direction Σ_{other k} g_k + λ H'(F)(E_1 − E_0)
    on W and B, with F = S_1/N_1 − S_0/N_0 per tree and node. The two ``nodes_g*`` rows do
    not enter the update. Everything comes from global quantities, so the aggregates are the
    same on every rank and equal to those of one process on the global batch.
    """

    Config = AranyaniConfig
    name = NAME
    family: ClassVar[str] = "gradient-surgery"
    extra_families: ClassVar[tuple[str, ...]] = ("objective",)
    paper: ClassVar[Paper] = Paper(
        title="Enhancing Group Fairness in Online Settings Using Oblique Decision Forests",
        authors=(
            "Somnath Basu Roy Chowdhury",
            "Nicholas Monath",
            "Ahmad Beirami",
            "Rahul Kidambi",
            "Kumar Avinava Dubey",
            "Amr Ahmed",
            "Snigdha Chaturvedi",
        ),
        year=2024,
        venue="ICLR 2024",
        arxiv="2310.11401",
        bibtex=BIBTEX,
        code="https://github.com/brcsomnath/Aranyani",
        checked_against=CHECKED_AGAINST,
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        # FSDP2 gives each rank a shard of each parameter's gradient; grads.view needs them whole
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }
    #: reads parameter blocks (``grads.view``) and keeps gradient averages in its state
    columns_ok: ClassVar[bool] = False

    config: AranyaniConfig

    def __init__(self, config: AranyaniConfig | None = None) -> None:
        super().__init__(config)
        self._reset()
        self._pending: dict[str, Any] | None = None
        self._params: tuple[str, str] | None = None  # names of the forest's W and B in the module

    def _reset(self) -> None:
        empty = torch.zeros(0, dtype=torch.float64)
        #: N_a: samples of group a seen so far, ``[2]``
        self.counts = torch.zeros(2, dtype=torch.float64)
        #: S_a: Σ over the stream of n per tree and node, ``[2, T, N]``
        self.node_sums = empty.clone()
        #: accumulators of ∂n/∂W and ∂n/∂B per group, ``[2, T, D, N]`` and ``[2, T, N]``
        self.grad_w = empty.clone()
        self.grad_b = empty.clone()
        #: online predictions: ŷ = 1 per group ``[2]``, and correct predictions ``[1]``
        self.positives = torch.zeros(2, dtype=torch.float64)
        self.correct = torch.zeros(1, dtype=torch.float64)

    # -- objective: the terms whose gradients are E_a[∂n/∂θ] -------------------------------------
    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> dict[str, torch.Tensor]:
        if self._pending is not None:
            raise RuntimeError(
                f"{NAME}: the previous step's gradient surgery did not run; a surgery plugin placed "
                f"before {NAME!r} returned a direction. Put {NAME!r} first among the surgery plugins."
            )
        forest = find_forest(module)
        if "group" not in batch:
            raise ValueError(
                f"{NAME}: the batch has no 'group' (the protected attribute a ∈ {{0, 1}})"
            )
        a = batch["group"].reshape(-1).long()
        if bool(((a != 0) & (a != 1)).any()):
            raise ValueError(
                f"{NAME}: 'group' must hold 0 or 1 (binary protected attribute), got {a.unique().tolist()}"
            )
        ids = {id(p): name for name, p in module.named_parameters()}
        self._params = (ids[id(forest.W)], ids[id(forest.B)])  # their blocks in the gradient set
        n = forest.node_decisions(batch["input"])  # [T, B, N]
        t, b_local, nodes = n.shape
        if self.node_sums.numel() == 0:
            self._init_state(forest)
        onehot = torch.stack([a == 0, a == 1]).to(torch.float64)  # [2, B]
        pred = outputs["logits"].detach().argmax(dim=-1)
        sums = torch.einsum("gb,tbn->gtn", onehot, n.detach().double())  # Σ n per group: [2, T, N]
        stats = torch.cat(
            [
                onehot.sum(1),  # group counts of the batch
                sums.reshape(-1),
                (onehot * (pred == 1)).sum(1),  # ŷ = 1 per group
                (pred == batch["target"].reshape(-1)).sum().reshape(1).double(),  # correct
            ]
        )
        stats = dist.all_reduce_sum(
            stats
        ).cpu()  # the running aggregates live on the CPU, in float64
        counts = stats[:2]
        self._pending = {
            "counts": counts,
            "node_sums": stats[2 : 2 + 2 * t * nodes].reshape(2, t, nodes),
            "positives": stats[2 + 2 * t * nodes : 4 + 2 * t * nodes],
            "correct": stats[-1:],
        }
        per_sample = n.sum(dim=(0, 2))  # Σ_{t,i} n_{t,i}(x): [B]
        world = dist.world_size()
        terms = {}
        for g, name in enumerate(GROUPS):
            scale = world * b_local / float(counts[g]) if counts[g] > 0 else 0.0
            terms[name] = per_sample * onehot[g].to(per_sample.dtype) * scale
        return terms

    def _init_state(self, forest: Any) -> None:
        t, d, nodes = forest.W.shape
        self.node_sums = torch.zeros(2, t, nodes, dtype=torch.float64)
        self.grad_w = torch.zeros(2, t, d, nodes, dtype=torch.float64)
        self.grad_b = torch.zeros(2, t, nodes, dtype=torch.float64)

    # -- surgery: task gradient + λ H'(F)(E_1 − E_0) on the internal nodes ----------------------------
    @hookimpl
    def surgery_combine(self, grads: GradientSet, ctx: StepContext) -> Direction | None:
        pending, self._pending = self._pending, None
        present = [g in grads.names for g in GROUPS]
        if pending is None:
            if any(present):
                raise ValueError(
                    f"{NAME}: objectives {GROUPS} exist, but {NAME}'s objective_terms did not run this step"
                )
            return None  # nothing of this plugin in the set (e.g. the family's property checks)
        if not all(present):
            raise ValueError(
                f"{NAME}: the objectives {GROUPS} are missing from the gradient set {list(grads.names)}; "
                f"put {NAME!r} first among the surgery plugins"
            )
        assert self._params is not None
        w_name, b_name = self._params
        if w_name not in grads.parameter_names or b_name not in grads.parameter_names:
            raise ValueError(
                f"{NAME}: the surgery parameters must include the forest's {w_name} and {b_name}"
            )
        rows = [grads.index(g) for g in GROUPS]
        e_w = grads.view(w_name)[rows].double().cpu()  # [2, T, D, N]: this batch's E_a[∂n/∂W]
        e_b = grads.view(b_name)[rows].double().cpu()  # [2, T, N]
        self._update(pending, e_w, e_b)

        task = [k for k in range(len(grads)) if k not in rows]
        vector = grads.rows[task].sum(dim=0)  # Σ of the task objectives' gradients
        if not bool((self.counts > 0).all()):
            return grads.direction(vector)  # F needs both groups (the official loop skips the step)
        gap = F.group_gap(self.node_sums, self.counts)  # F: [T, N]
        rates = self.positives / self.counts  # online P(ŷ = 1 | a)
        ctx.log(f"{NAME}/node_gap", gap.abs().mean())  # mean |F| over trees and nodes
        ctx.log(f"{NAME}/online_dp", (rates[1] - rates[0]).abs())
        if self.config.lambda_const == 0:
            return grads.direction(vector)
        cfg = self.config
        c = [F.correction(float(self.counts[g]), cfg.gradient_type, cfg.gamma) for g in (0, 1)]
        fair_w = F.fairness_gradient(
            gap, c[1] * self.grad_w[1], c[0] * self.grad_w[0], cfg.lambda_const, cfg.delta
        )
        fair_b = F.fairness_gradient(
            gap, c[1] * self.grad_b[1], c[0] * self.grad_b[0], cfg.lambda_const, cfg.delta
        )
        extra = torch.zeros_like(vector)
        for block in grads.blocks:
            if block.name == w_name:
                extra[block.start : block.stop] = fair_w.reshape(-1).to(vector.device, vector.dtype)
            elif block.name == b_name:
                extra[block.start : block.stop] = fair_b.reshape(-1).to(vector.device, vector.dtype)
        return grads.direction(vector + extra)

    def _update(
        self, pending: Mapping[str, torch.Tensor], e_w: torch.Tensor, e_b: torch.Tensor
    ) -> None:
        """Fold this batch into N_a, S_a and the averaged gradients (official order: before F)."""
        cfg = self.config
        batch_counts = pending["counts"]
        for g in (0, 1):
            n, before = float(batch_counts[g]), float(self.counts[g])
            if n == 0:
                continue
            self.grad_w[g] = F.accumulate(
                self.grad_w[g], before, e_w[g], n, cfg.gradient_type, cfg.gamma
            )
            self.grad_b[g] = F.accumulate(
                self.grad_b[g], before, e_b[g], n, cfg.gradient_type, cfg.gamma
            )
        self.counts = self.counts + batch_counts
        self.node_sums = self.node_sums + pending["node_sums"]
        self.positives = self.positives + pending["positives"]
        self.correct = self.correct + pending["correct"]

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts.clone(),
            "node_sums": self.node_sums.clone(),
            "grad_w": self.grad_w.clone(),
            "grad_b": self.grad_b.clone(),
            "positives": self.positives.clone(),
            "correct": self.correct.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._reset()
        for key in ("counts", "node_sums", "grad_w", "grad_b", "positives", "correct"):
            if key in state:
                setattr(self, key, state[key].detach().clone().to(torch.float64))
        self._pending = None


__all__ = ["Aranyani", "AranyaniConfig"]
