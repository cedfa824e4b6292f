"""The toy task of the paper's setting: two 2-D Gaussian-blob domains, the target rotated.

Registered on import of the package (so on loading the plugin through its entry point):

- dataset ``rotated-blobs``: C Gaussian blobs (the source, labelled) and the same blobs
  rotated by ``rotation`` degrees about the origin (the target, unlabelled). A training row
  carries a source point with its label (``input``, ``target``), a target point
  (``input_target``) and a point of a separate held-out target set (``input_heldout``; the
  official script holds out 10% of the target training images). Validation is a fresh
  labelled target sample, so ``val/acc`` is the target accuracy.
- model ``da-mlp``: a ReLU MLP feature extractor ``features`` and a linear classifier ``head``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from paperhooks.tasks import (
    DataInfo,
    DictDataset,
    check_field,
    register_dataset,
    register_model,
)
from paperhooks.tasks.sampler import generator

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class RotatedBlobsConfig:
    """Blob k is centred at ``radius · (cos θ_k, sin θ_k)``, θ_k = 2πk/C, with standard deviation
    ``std`` along the circle and ``std · stretch`` along the radius; the target domain is
    the source rotated by ``rotation`` degrees.

    :ivar num_source: labelled source points (also the number of training rows).
    :ivar num_target: unlabelled target training points (paired with the rows in a random order).
    :ivar num_heldout: held-out unlabelled target points (row i gets point i mod num_heldout).
    :ivar num_test: labelled target points of the validation set.
    """

    batch_size: int = 64
    num_workers: int = 0
    num_classes: int = 3
    radius: float = 2.0
    std: float = 0.5
    stretch: float = 1.0
    rotation: float = 30.0
    num_source: int = 512
    num_target: int = 512
    num_heldout: int = 64
    num_test: int = 1024

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(self.num_classes >= 2, "num_classes", ">= 2", self.num_classes)
        for name in ("radius", "std", "stretch"):
            value = getattr(self, name)
            check_field(math.isfinite(value) and value > 0, name, "a finite number > 0", value)
        check_field(
            math.isfinite(self.rotation), "rotation", "a finite number of degrees", self.rotation
        )
        for name in ("num_source", "num_target", "num_heldout", "num_test"):
            check_field(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))


def sample_blobs(
    config: RotatedBlobsConfig, n: int, rotation: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points ``[n, 2]`` with balanced labels ``[n]``, the blobs rotated by ``rotation`` degrees."""
    labels = torch.arange(n) % config.num_classes
    labels = labels[torch.randperm(n, generator=g)]
    theta = 2 * math.pi * labels.double() / config.num_classes
    radial = config.radius + config.std * config.stretch * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    tangential = config.std * torch.randn(n, generator=g, dtype=torch.float64)
    x = radial * torch.cos(theta) - tangential * torch.sin(theta)
    y = radial * torch.sin(theta) + tangential * torch.cos(theta)
    r = math.radians(rotation)
    points = torch.stack(
        [x * math.cos(r) - y * math.sin(r), x * math.sin(r) + y * math.cos(r)], dim=1
    )
    return points.float(), labels


@register_dataset("rotated-blobs", RotatedBlobsConfig, task="classification")
def build_rotated_blobs(config: RotatedBlobsConfig, seed: int) -> PaperhooksDataModule:
    """Source Gaussian blobs (labelled) and the same blobs rotated (unlabelled target, held-out target)."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    g = generator(seed, "rotated-blobs")
    x_s, y_s = sample_blobs(config, config.num_source, 0.0, g)
    x_t, _ = sample_blobs(config, config.num_target, config.rotation, g)
    x_v, _ = sample_blobs(config, config.num_heldout, config.rotation, g)
    x_test, y_test = sample_blobs(config, config.num_test, config.rotation, g)
    rows = torch.arange(config.num_source)
    target_of_row = torch.randperm(config.num_target, generator=g)[rows % config.num_target]
    train = DictDataset(
        {
            "input": x_s,
            "target": y_s,
            "input_target": x_t[target_of_row],
            "input_heldout": x_v[rows % config.num_heldout],
        }
    )
    val = DictDataset({"input": x_test, "target": y_test})
    info = DataInfo("classification", config.num_classes, (2,))
    return PaperhooksDataModule(info, train, val, config.batch_size, seed, config.num_workers)


@dataclass(frozen=True)
class DAMLPConfig:
    """Feature extractor ``features``: Linear–ReLU layers of widths ``hidden``; classifier ``head``: Linear."""

    hidden: tuple[int, ...] = (32, 32)

    def __post_init__(self) -> None:
        check_field(
            len(self.hidden) >= 1 and all(isinstance(h, int) and h >= 1 for h in self.hidden),
            "hidden",
            "a non-empty tuple of ints >= 1",
            self.hidden,
        )


class DAMLP(nn.Module):
    """``head(features(x))``: the split ParetoDA needs (the shared features are the surgery set)."""

    def __init__(self, in_features: int, num_classes: int, config: DAMLPConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in config.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.flatten(1)))


@register_model("da-mlp", DAMLPConfig)
def build_da_mlp(config: DAMLPConfig, info: DataInfo) -> nn.Module:
    """A ReLU MLP split into ``features`` and a linear ``head`` (for domain adaptation plugins)."""
    if info.task != "classification":
        raise ValueError("model da-mlp needs a classification dataset")
    return DAMLP(math.prod(info.input_shape), info.num_classes, config)


__all__ = [
    "DAMLP",
    "DAMLPConfig",
    "RotatedBlobsConfig",
    "build_da_mlp",
    "build_rotated_blobs",
    "sample_blobs",
]
