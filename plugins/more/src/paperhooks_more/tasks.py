"""The task MORE needs: preference pairs from several datasets that partly disagree, and an RM.

Registered on import of the package (so on loading the plugin through its entry point):

- dataset ``diverse-preferences``: T synthetic preference datasets over response features
  x ∈ R^d. Dataset t prefers by the utility w_t·x with

      w_t = ρ·u + √(1 − ρ²)·s_t·e,    s_t = +1 for even t, −1 for odd t,

  u ⊥ e unit vectors: every dataset shares the preference u (ρ = ``shared``), and the
  datasets split into two camps on e (the majority of even t, the minority of odd t), so
  cos(w_s, w_t) is 1 within a camp and 2ρ² − 1 across (< 0 for ρ < 0.71: partly conflicting
  preferences). A pair (a, b), x ~ N(0, I), is labelled by Bradley–Terry,
  P(a ≻ b) = σ(β·w_t·(x_a − x_b)), β = ``sharpness``. Rows: ``input`` [2, d] = (chosen,
  rejected), ``target`` 0 (the preferred column), ``task`` t, ``index``.
- model ``reward-mlp``: r(x) = wᵀ φ(x), a small MLP encoder φ and a linear reward head w
  without bias (as the official ``reward_head``); input [B, M, d] → rewards [B, M].

With classification on the two columns, the built-in task module's cross-entropy is the
ranking loss −log σ(r_chosen − r_rejected) and its accuracy is the preference accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from paperhooks.dist import step_generator
from paperhooks.tasks import (
    DataInfo,
    DictDataset,
    check_field,
    register_dataset,
    register_model,
)

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class DiversePreferencesConfig:
    """T preference datasets sharing the utility u and split into two camps on e.

    :ivar num_tasks: T, the number of preference datasets (the paper mixes 5).
    :ivar dim: d, the number of response features (≥ 2).
    :ivar pairs_per_task: training pairs of each dataset (balanced, as the official
        ``--resampling`` makes them).
    :ivar val_pairs_per_task: validation pairs of each dataset.
    :ivar shared: ρ, the weight of the shared utility u in every w_t.
    :ivar sharpness: β, the Bradley–Terry scale of the label noise (larger: fewer flips).
    """

    batch_size: int = 96
    num_workers: int = 0
    num_tasks: int = 3
    dim: int = 8
    pairs_per_task: int = 512
    val_pairs_per_task: int = 1024
    shared: float = 0.4
    sharpness: float = 3.0

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(self.num_tasks >= 1, "num_tasks", ">= 1", self.num_tasks)
        check_field(self.dim >= 2, "dim", ">= 2", self.dim)
        check_field(self.pairs_per_task >= 1, "pairs_per_task", ">= 1", self.pairs_per_task)
        check_field(
            self.val_pairs_per_task >= 1, "val_pairs_per_task", ">= 1", self.val_pairs_per_task
        )
        check_field(0 <= self.shared <= 1, "shared", "in [0, 1]", self.shared)
        check_field(
            math.isfinite(self.sharpness) and self.sharpness > 0, "sharpness", "> 0", self.sharpness
        )


def utilities(config: DiversePreferencesConfig, seed: int) -> torch.Tensor:
    """``[T, d]``: the utility vectors w_t (unit norm); u and e are the first two columns of a
    random orthogonal matrix drawn from ``seed``."""
    g = step_generator(seed, 0, "diverse-preferences/utilities")
    q, _ = torch.linalg.qr(torch.randn(config.dim, config.dim, generator=g))
    u, e = q[:, 0], q[:, 1]
    rho = config.shared
    sign = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(config.num_tasks)])
    return rho * u + math.sqrt(1 - rho * rho) * sign.unsqueeze(1) * e


def sample_pairs(
    w: torch.Tensor, n: int, sharpness: float, g: torch.Generator
) -> dict[str, torch.Tensor]:
    """``n`` Bradley–Terry labelled pairs of every task: ``input`` [T·n, 2, d] (chosen first),
    ``target`` zeros, ``task`` [T·n]."""
    t_count, d = w.shape
    task = torch.arange(t_count).repeat_interleave(n)  # [T·n]
    a, b = torch.randn(t_count * n, d, generator=g), torch.randn(t_count * n, d, generator=g)
    p_a = torch.sigmoid(sharpness * ((a - b) * w[task]).sum(-1))  # P(a ≻ b)
    a_wins = (torch.rand(t_count * n, generator=g) < p_a).unsqueeze(1)
    chosen, rejected = torch.where(a_wins, a, b), torch.where(a_wins, b, a)
    return {
        "input": torch.stack([chosen, rejected], dim=1),
        "target": torch.zeros(t_count * n, dtype=torch.int64),
        "task": task,
    }


@register_dataset("diverse-preferences", DiversePreferencesConfig, task="classification")
def build_diverse_preferences(config: DiversePreferencesConfig, seed: int) -> PaperhooksDataModule:
    """Preference pairs from T datasets that share one utility and split into two camps."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    w = utilities(config, seed)
    train = sample_pairs(
        w,
        config.pairs_per_task,
        config.sharpness,
        step_generator(seed, 0, "diverse-preferences/train"),
    )
    val = sample_pairs(
        w,
        config.val_pairs_per_task,
        config.sharpness,
        step_generator(seed, 0, "diverse-preferences/val"),
    )
    info = DataInfo("classification", 2, (2, config.dim))
    dm = PaperhooksDataModule(
        info, DictDataset(train), DictDataset(val), config.batch_size, seed, config.num_workers
    )
    dm.utilities = w  # the true w_t, for analysis
    return dm


@dataclass(frozen=True)
class RewardMLPConfig:
    """An MLP encoder (ReLU between the layers of ``hidden``) and a bias-free linear reward
    head; ``hidden: []`` is the linear reward model r(x) = wᵀx."""

    hidden: tuple[int, ...] = (32,)

    def __post_init__(self) -> None:
        check_field(all(h >= 1 for h in self.hidden), "hidden", "a list of sizes >= 1", self.hidden)


class RewardMLP(nn.Module):
    """r(x) = wᵀ φ(x): ``encoder`` φ, ``head`` w (``Linear(h, 1, bias=False)``); [B, M, d] → [B, M]."""

    def __init__(self, dim: int, config: RewardMLPConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.encoder = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x)).squeeze(-1)


@register_model("reward-mlp", RewardMLPConfig)
def build_reward_mlp(config: RewardMLPConfig, info: DataInfo) -> nn.Module:
    """A reward model over response features: input [M, d] per prompt, one reward per response."""
    if len(info.input_shape) != 2:
        raise ValueError(
            f"model reward-mlp needs inputs of shape [M responses, d features] per row (e.g. data: "
            f"diverse-preferences), got per-row shape {info.input_shape}"
        )
    return RewardMLP(info.input_shape[-1], config)


__all__ = [
    "DiversePreferencesConfig",
    "RewardMLP",
    "RewardMLPConfig",
    "build_diverse_preferences",
    "build_reward_mlp",
    "sample_pairs",
    "utilities",
]
