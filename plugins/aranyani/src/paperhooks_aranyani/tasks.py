"""The task the paper needs, registered on import of the package (so on loading the plugin).

- dataset ``online-fair-stream``: a synthetic stream of binary decisions with a binary
  protected group that correlates with the label, in the spirit of the paper's tabular
  benchmarks (Adult, COMPAS). Batches carry ``input``, ``target`` and ``group``. One epoch is
  one pass over the stream, in the sampler's seeded order.
- model ``oblique-forest``: :class:`~paperhooks_aranyani.forest.ObliqueForest`.
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
from paperhooks_aranyani.forest import ObliqueForest

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class FairStreamConfig:
    """a ~ Bernoulli(½); y | a ~ Bernoulli(½ + (2a − 1)·``label_gap``/2); x ∈ R^``dim``.

    The first ``informative`` features are (2y − 1)·``signal`` + ε, the next ``proxies`` are
    (2a − 1)·``proxy_signal`` + ε, the rest ε (ε ~ N(0, 1)). A classifier gains accuracy by
    reading the group through the proxies, and thereby widens its demographic-parity gap.

    :ivar batch_size: global batch; the paper trains online with batch 1 (see the method card).
    :ivar n_train: samples of the stream (the training set).
    :ivar n_val: held-out samples of the same distribution.
    """

    batch_size: int = 16
    num_workers: int = 0
    n_train: int = 5000
    n_val: int = 2000
    dim: int = 8
    informative: int = 3
    proxies: int = 3
    signal: float = 0.7
    proxy_signal: float = 1.5
    label_gap: float = 0.2

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(self.n_train >= 2, "n_train", ">= 2", self.n_train)
        check_field(self.n_val >= 2, "n_val", ">= 2", self.n_val)
        check_field(self.dim >= 1, "dim", ">= 1", self.dim)
        check_field(self.informative >= 0, "informative", ">= 0", self.informative)
        check_field(self.proxies >= 0, "proxies", ">= 0", self.proxies)
        check_field(
            self.informative + self.proxies <= self.dim,
            "informative",
            "<= dim - proxies",
            self.informative,
        )
        check_field(math.isfinite(self.signal), "signal", "a finite number", self.signal)
        check_field(
            math.isfinite(self.proxy_signal), "proxy_signal", "a finite number", self.proxy_signal
        )
        check_field(0 <= self.label_gap < 1, "label_gap", "in [0, 1)", self.label_gap)


def sample_stream(config: FairStreamConfig, n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` samples: ``input`` [n, dim] float32, ``target`` and ``group`` [n] int64."""
    a = (torch.rand(n, generator=g) < 0.5).long()
    p_y = 0.5 + (2 * a - 1) * config.label_gap / 2
    y = (torch.rand(n, generator=g) < p_y).long()
    x = torch.randn(n, config.dim, generator=g)
    k, m = config.informative, config.proxies
    x[:, :k] += ((2 * y - 1) * config.signal).unsqueeze(1)
    x[:, k : k + m] += ((2 * a - 1) * config.proxy_signal).unsqueeze(1)
    return {"input": x, "target": y, "group": a}


@register_dataset("online-fair-stream", FairStreamConfig, task="classification")
def build_online_fair_stream(config: FairStreamConfig, seed: int) -> PaperhooksDataModule:
    """Synthetic online stream: binary label, binary protected group correlated with it."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    train = sample_stream(
        config, config.n_train, step_generator(seed, 0, "online-fair-stream.train")
    )
    val = sample_stream(config, config.n_val, step_generator(seed, 0, "online-fair-stream.val"))
    info = DataInfo("classification", 2, (config.dim,))
    return PaperhooksDataModule(
        info, DictDataset(train), DictDataset(val), config.batch_size, seed, config.num_workers
    )


@dataclass(frozen=True)
class ObliqueForestConfig:
    """Soft oblique decision forest; defaults are ``train_online``'s (``tree_depth=3``, ``num_trees=3``)."""

    depth: int = 3
    trees: int = 3

    def __post_init__(self) -> None:
        check_field(self.depth >= 1, "depth", ">= 1", self.depth)
        check_field(self.trees >= 1, "trees", ">= 1", self.trees)


@register_model("oblique-forest", ObliqueForestConfig)
def build_oblique_forest(config: ObliqueForestConfig, info: DataInfo) -> nn.Module:
    """Aranyani's ensemble of soft oblique decision trees (classification)."""
    if info.task != "classification":
        raise ValueError(
            "model oblique-forest is a classifier; the data's task is " + repr(info.task)
        )
    return ObliqueForest(math.prod(info.input_shape), info.num_classes, config.depth, config.trees)


__all__ = [
    "FairStreamConfig",
    "ObliqueForestConfig",
    "build_oblique_forest",
    "build_online_fair_stream",
    "sample_stream",
]
