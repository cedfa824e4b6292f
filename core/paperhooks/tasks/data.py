"""The datamodule base and the built-in datasets: ``digits`` and synthetic ``regression``.

Every batch is a dict with ``input``, ``target`` and ``index`` (int64 position in its
dataset), plus ``clean_target`` and ``group`` where the options create them. Data is built
once, deterministically from the seed, in the constructor, so ``info`` exists before any
trainer. ``batch_size`` is the global batch size; each process gets
``batch_size // world_size`` rows of every global batch (see :mod:`.sampler`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from paperhooks.tasks.registry import DataInfo, check_field, register_dataset
from paperhooks.tasks.sampler import DictDataset, generator

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


def __getattr__(name: str) -> Any:
    """``PaperhooksDataModule``, from :mod:`.datamodule` (Lightning loads on first use)."""
    if name == "PaperhooksDataModule":
        from paperhooks.tasks.datamodule import PaperhooksDataModule

        return PaperhooksDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Duplicates:
    """Near-duplicate copies of a random ``fraction`` of the training samples."""

    fraction: float = 0.0
    copies: int = 0
    jitter: float = 0.0

    def __post_init__(self) -> None:
        check_field(0 <= self.fraction <= 1, "duplicates.fraction", "in [0, 1]", self.fraction)
        check_field(self.copies >= 0, "duplicates.copies", ">= 0", self.copies)
        check_field(self.jitter >= 0, "duplicates.jitter", ">= 0", self.jitter)


@dataclass(frozen=True)
class LabelNoise:
    """Training-label corruption: ``symmetric`` (to a random other class) or ``pairflip``."""

    kind: Literal["none", "symmetric", "pairflip"] = "none"
    rate: float = 0.0

    def __post_init__(self) -> None:
        check_field(
            self.kind in ("none", "symmetric", "pairflip"),
            "label_noise.kind",
            "one of none, symmetric, pairflip",
            self.kind,
        )
        check_field(0 <= self.rate < 1, "label_noise.rate", "in [0, 1)", self.rate)


@dataclass(frozen=True)
class DigitsConfig:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), no download."""

    batch_size: int = 64
    num_workers: int = 0
    val_fraction: float = 0.2
    image_size: int = 8
    imbalance: float = 1.0
    duplicates: Duplicates = field(default_factory=Duplicates)
    label_noise: LabelNoise = field(default_factory=LabelNoise)
    groups: int = 0
    group_majority: float = 0.9
    #: train on these digits only (empty: all ten). The validation split keeps every digit,
    #: and ``val/acc_train_classes`` / ``val/acc_other_classes`` are logged beside ``val/acc``;
    #: the training split's other digits stay available as ``datamodule.calibration_set``
    #: (a general calibration set for criteria such as d-pruner's). Stages may change it,
    #: e.g. a general stage on 0-4, then a domain stage on 5-9 (same split, same seed).
    train_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(0 < self.val_fraction < 1, "val_fraction", "in (0, 1)", self.val_fraction)
        check_field(self.image_size >= 1, "image_size", ">= 1", self.image_size)
        check_field(self.imbalance >= 1, "imbalance", ">= 1 (1 = balanced)", self.imbalance)
        check_field(self.groups >= 0, "groups", ">= 0 (0 = no groups)", self.groups)
        check_field(
            0 <= self.group_majority <= 1, "group_majority", "in [0, 1]", self.group_majority
        )
        check_field(
            all(0 <= c <= 9 for c in self.train_classes)
            and len(set(self.train_classes)) == len(self.train_classes),
            "train_classes",
            "distinct digits in 0-9 (empty: all)",
            list(self.train_classes),
        )


@dataclass(frozen=True)
class RegressionConfig:
    """Synthetic linear regression ``y = x @ beta + noise * eps`` with ``x ~ N(0, I)``."""

    batch_size: int = 64
    num_workers: int = 0
    n_train: int = 512
    n_val: int = 512
    dim: int = 16
    noise: float = 0.1
    redundant_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_field(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        check_field(self.num_workers >= 0, "num_workers", ">= 0", self.num_workers)
        check_field(self.n_train >= 1, "n_train", ">= 1", self.n_train)
        check_field(self.n_val >= 1, "n_val", ">= 1", self.n_val)
        check_field(self.dim >= 1, "dim", ">= 1", self.dim)
        check_field(self.noise >= 0, "noise", ">= 0", self.noise)
        check_field(
            0 <= self.redundant_fraction <= 1,
            "redundant_fraction",
            "in [0, 1]",
            self.redundant_fraction,
        )


def _subsample_imbalanced(
    y: torch.Tensor, ratio: float, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    """Indices keeping ``n_c * ratio ** (-c / (C - 1))`` (at least 1) samples of class ``c``."""
    keep = []
    for c in range(num_classes):
        idx = (y == c).nonzero().flatten()
        n_keep = max(1, round(idx.numel() * ratio ** (-c / max(1, num_classes - 1))))
        keep.append(idx[torch.randperm(idx.numel(), generator=gen)[:n_keep]])
    return torch.cat(keep).sort().values


def _noisy_labels(
    y: torch.Tensor, noise: LabelNoise, num_classes: int, gen: torch.Generator
) -> torch.Tensor:
    flip = torch.rand(y.shape, generator=gen) < noise.rate
    if noise.kind == "symmetric":
        other = (y + torch.randint(1, num_classes, y.shape, generator=gen)) % num_classes
    elif noise.kind == "pairflip":
        other = (y + 1) % num_classes
    else:
        return y.clone()
    return torch.where(flip, other, y)


def _groups(y: torch.Tensor, groups: int, majority: float, gen: torch.Generator) -> torch.Tensor:
    """``y mod groups`` for a ``majority`` fraction, another group uniformly for the rest."""
    aligned = y % groups
    if groups == 1:
        return aligned
    other = (aligned + torch.randint(1, groups, y.shape, generator=gen)) % groups
    return torch.where(torch.rand(y.shape, generator=gen) < majority, aligned, other)


@register_dataset("digits", DigitsConfig, task="classification")
def build_digits(config: DigitsConfig, seed: int) -> PaperhooksDataModule:
    """scikit-learn digits as [1, S, S] images in [0, 1], with imbalance, duplicates, noise, groups."""
    from sklearn.datasets import load_digits

    from paperhooks.tasks.datamodule import PaperhooksDataModule

    raw = load_digits()
    x = torch.as_tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(raw.target, dtype=torch.int64)
    c = 10
    if config.image_size != 8:
        size = (config.image_size, config.image_size)
        x = torch.nn.functional.interpolate(
            x, size=size, mode="bilinear", align_corners=False
        ).clamp(0, 1)
    # stratified split: the first round(val_fraction * n_c) of each class's permutation go to val
    g = generator(seed, "digits.split")
    val_mask = torch.zeros(len(y), dtype=torch.bool)
    for k in range(c):
        idx = (y == k).nonzero().flatten()
        val_mask[
            idx[
                torch.randperm(idx.numel(), generator=g)[: round(config.val_fraction * idx.numel())]
            ]
        ] = True
    xt, yt, xv, yv = x[~val_mask], y[~val_mask], x[val_mask], y[val_mask]
    if config.imbalance != 1.0:
        keep = _subsample_imbalanced(yt, config.imbalance, c, generator(seed, "digits.imbalance"))
        xt, yt = xt[keep], yt[keep]
    pool = None
    if config.train_classes:  # the rows of the other digits stay out of training only
        pool = DictDataset({"input": xt, "target": yt})
        keep = torch.isin(yt, torch.tensor(config.train_classes))
        xt, yt = xt[keep], yt[keep]
    redundant = torch.zeros(len(yt), dtype=torch.bool)
    dup = config.duplicates
    n_dup = round(dup.fraction * len(yt)) if dup.copies else 0
    if n_dup:
        g = generator(seed, "digits.duplicates")
        pick = torch.randperm(len(yt), generator=g)[:n_dup].repeat(dup.copies)
        copies = (xt[pick] + dup.jitter * torch.randn(xt[pick].shape, generator=g)).clamp(0, 1)
        redundant[pick] = True
        xt, yt = torch.cat([xt, copies]), torch.cat([yt, yt[pick]])
        redundant = torch.cat([redundant, torch.ones(len(pick), dtype=torch.bool)])
    train: dict[str, torch.Tensor] = {"input": xt, "target": yt}
    val: dict[str, torch.Tensor] = {"input": xv, "target": yv}
    if config.label_noise.kind != "none":
        train["target"] = _noisy_labels(yt, config.label_noise, c, generator(seed, "digits.noise"))
        train["clean_target"], val["clean_target"] = yt, yv.clone()
    if config.groups:
        train["group"] = _groups(
            yt, config.groups, config.group_majority, generator(seed, "digits.groups")
        )
        val["group"] = _groups(
            yv, config.groups, config.group_majority, generator(seed, "digits.groups.val")
        )
    info = DataInfo(
        "classification", c, tuple(xt.shape[1:]), train_classes=tuple(config.train_classes)
    )
    return PaperhooksDataModule(
        info,
        DictDataset(train),
        DictDataset(val),
        config.batch_size,
        seed,
        config.num_workers,
        redundant,
        calibration_set=pool,
    )


@register_dataset("regression", RegressionConfig, task="regression")
def build_regression(config: RegressionConfig, seed: int) -> PaperhooksDataModule:
    """Synthetic linear regression; ``redundant_fraction`` of train repeats a pool of 8 points."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    g = generator(seed, "regression")
    beta = torch.randn(config.dim, generator=g) / math.sqrt(config.dim)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, config.dim, generator=g)
        return x, x @ beta + config.noise * torch.randn(n, generator=g)

    (xt, yt), (xv, yv), (xp, yp) = sample(config.n_train), sample(config.n_val), sample(8)
    redundant = torch.zeros(config.n_train, dtype=torch.bool)
    n_red = round(config.redundant_fraction * config.n_train)
    if n_red:
        rows = torch.randperm(config.n_train, generator=g)[:n_red]
        pool = torch.arange(n_red) % 8
        xt[rows], yt[rows], redundant[rows] = xp[pool], yp[pool], True
    info = DataInfo("regression", 0, (config.dim,))
    train, val = DictDataset({"input": xt, "target": yt}), DictDataset({"input": xv, "target": yv})
    return PaperhooksDataModule(
        info, train, val, config.batch_size, seed, config.num_workers, redundant
    )


__all__ = ["DigitsConfig", "Duplicates", "LabelNoise", "PaperhooksDataModule", "RegressionConfig"]
__all__ += ["build_digits", "build_regression"]
