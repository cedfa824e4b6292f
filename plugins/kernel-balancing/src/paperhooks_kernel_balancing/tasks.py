"""The task the paper needs: ratings missing not at random, and a matrix factorization.

Registered on import of the package (so on loading the plugin through its entry point):

- dataset ``synthetic-recsys``: users × items with known true ratings and a known exposure
  probability that grows with the rating and the item's popularity. Training batches are
  the observed pairs (biased towards high ratings); validation is every pair with its true
  rating, so ``val/mse`` is the unbiased target the paper's method aims at.
- model ``mf``: r̂_ui = p_u·q_i (+ b_u + c_i + μ), input ``[B, 2]`` (user, item) ids.
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
from paperhooks_kernel_balancing.features import all_pairs

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class RecsysInfo(DataInfo):
    """:class:`~paperhooks.tasks.DataInfo` plus the sizes of the user and item id spaces."""

    num_users: int
    num_items: int


@dataclass(frozen=True)
class SyntheticRecsysConfig:
    """Ratings R = P Qᵀ/√rank + b_u + c_i (standardized) of ``num_users`` × ``num_items`` pairs.

    Pair (u, i) is observed with probability σ(α + β R_ui + κ pop_i), pop_i ~ N(0, 1), and
    then carries the rating R_ui + noise · ε. β > 0 makes the data missing not at random.

    :ivar exposure_base: α; with the defaults about a quarter of the pairs are observed.
    :ivar exposure_rating: β, how much a higher rating raises the chance to be observed.
    :ivar exposure_popularity: κ, how much item popularity does.
    """

    batch_size: int = 128
    num_workers: int = 0
    num_users: int = 60
    num_items: int = 60
    rank: int = 3
    bias_scale: float = 0.5
    noise: float = 0.1
    exposure_base: float = -1.5
    exposure_rating: float = 1.5
    exposure_popularity: float = 0.5

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(self.num_users >= 1, "num_users", ">= 1", self.num_users)
        check_field(self.num_items >= 1, "num_items", ">= 1", self.num_items)
        check_field(self.rank >= 1, "rank", ">= 1", self.rank)
        check_field(self.bias_scale >= 0, "bias_scale", ">= 0", self.bias_scale)
        check_field(self.noise >= 0, "noise", ">= 0", self.noise)
        for name in ("exposure_base", "exposure_rating", "exposure_popularity"):
            value = getattr(self, name)
            check_field(math.isfinite(value), name, "a finite number", value)


def simulate(config: SyntheticRecsysConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full simulated matrix: ``rating`` R, ``propensity`` P, ``observed`` O, ``noisy`` R + ε.

    All ``[U, I]``; drawn from one generator seeded by ``seed``.
    """
    g = step_generator(seed, 0, "synthetic-recsys")
    u, i, k = config.num_users, config.num_items, config.rank
    p, q = torch.randn(u, k, generator=g), torch.randn(i, k, generator=g)
    b = config.bias_scale * torch.randn(u, 1, generator=g)
    c = config.bias_scale * torch.randn(1, i, generator=g)
    r = p @ q.T / math.sqrt(k) + b + c  # [U, I]
    r = (r - r.mean()) / r.std().clamp_min(1e-12)
    popularity = torch.randn(1, i, generator=g)
    logit = (
        config.exposure_base + config.exposure_rating * r + config.exposure_popularity * popularity
    )
    propensity = torch.sigmoid(logit)  # [U, I]
    observed = torch.rand(u, i, generator=g) < propensity
    noisy = r + config.noise * torch.randn(u, i, generator=g)
    return {"rating": r, "propensity": propensity, "observed": observed, "noisy": noisy}


@register_dataset("synthetic-recsys", SyntheticRecsysConfig, task="regression")
def build_synthetic_recsys(config: SyntheticRecsysConfig, seed: int) -> PaperhooksDataModule:
    """Ratings missing not at random: train on the observed pairs, validate on all pairs."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    sim = simulate(config, seed)
    observed = sim["observed"].nonzero()  # [n, 2], user-major
    if observed.shape[0] == 0:
        raise ValueError("synthetic-recsys: no pair was observed; raise exposure_base")
    u, i = observed[:, 0], observed[:, 1]
    train = DictDataset(
        {
            "input": observed,
            "target": sim["noisy"][u, i],
            "propensity": sim["propensity"][u, i],  # the true exposure probability, for IPS
        }
    )
    everything = all_pairs(config.num_users, config.num_items)
    val = DictDataset({"input": everything, "target": sim["rating"].reshape(-1)})
    info = RecsysInfo("regression", 0, (2,), config.num_users, config.num_items)
    return PaperhooksDataModule(info, train, val, config.batch_size, seed, config.num_workers)


@dataclass(frozen=True)
class MFConfig:
    """Matrix factorization; ``dim`` 4 is the official ``embedding_k``."""

    dim: int = 4
    bias: bool = True
    init_std: float = 0.1

    def __post_init__(self) -> None:
        check_field(self.dim >= 0, "dim", ">= 0 (0 = biases only)", self.dim)
        check_field(self.init_std >= 0, "init_std", ">= 0", self.init_std)
        check_field(self.dim > 0 or self.bias, "dim", "> 0 when bias is false", self.dim)


class MatrixFactorization(nn.Module):
    """r̂_ui = p_u·q_i + b_u + c_i + μ for input ``[B, 2]`` of (user, item) ids; output ``[B]``."""

    def __init__(self, num_users: int, num_items: int, config: MFConfig) -> None:
        super().__init__()
        self.dim, self.bias = config.dim, config.bias
        if config.dim:
            self.user = nn.Embedding(num_users, config.dim)
            self.item = nn.Embedding(num_items, config.dim)
            nn.init.normal_(self.user.weight, std=config.init_std)
            nn.init.normal_(self.item.weight, std=config.init_std)
        if config.bias:
            self.user_bias = nn.Embedding(num_users, 1)
            self.item_bias = nn.Embedding(num_items, 1)
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
            self.global_bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, i = x[:, 0], x[:, 1]
        out = torch.zeros(x.shape[0], device=x.device)
        if self.dim:
            out = out + (self.user(u) * self.item(i)).sum(-1)
        if self.bias:
            out = (
                out
                + self.user_bias(u).squeeze(-1)
                + self.item_bias(i).squeeze(-1)
                + self.global_bias
            )
        return out


@register_model("mf", MFConfig)
def build_mf(config: MFConfig, info: DataInfo) -> nn.Module:
    """Matrix factorization over (user, item) ids; needs data that names its id spaces."""
    if not isinstance(info, RecsysInfo):
        raise ValueError(
            "model mf needs data that gives num_users and num_items (e.g. data: synthetic-recsys)"
        )
    return MatrixFactorization(info.num_users, info.num_items, config)


__all__ = [
    "MFConfig",
    "MatrixFactorization",
    "RecsysInfo",
    "SyntheticRecsysConfig",
    "build_mf",
    "build_synthetic_recsys",
    "simulate",
]
