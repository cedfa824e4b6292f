"""``digits-ambiguous``: digits whose *ambiguous* training images carry wrong labels.

Ctrl-U down-weights samples whose supervision is unreliable *and* look uncertain to the
model. Symmetric label noise (the built-in ``digits`` option) is independent of the image,
so no uncertainty measured on the image can find it. Here the noise depends on the image,
as an annotator's errors do: the ``ambiguous_rate`` fraction of training images closest to
another class are relabelled as that class::

    d_c(x)  = ‖x − μ_c‖                        (μ_c: mean image of class c, clean labels)
    margin  = min_{c ≠ y} d_c(x) − d_y(x)     (small: x is nearly as close to another class)
    the lowest-margin images get label argmin_{c ≠ y} d_c(x)

``clean_target`` keeps the true labels; validation labels are clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from paperhooks.tasks import (
    DictDataset,
    DigitsConfig,
    build_datamodule,
    check_field,
    register_dataset,
)

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class DigitsAmbiguousConfig(DigitsConfig):
    """The options of ``digits``, plus the fraction of training labels flipped by ambiguity.

    :ivar ambiguous_rate: fraction of training images (the most ambiguous) given the label of
        their nearest other class. ``label_noise`` must stay ``none``: one noise model at a time.
    """

    ambiguous_rate: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_field(
            0 <= self.ambiguous_rate < 1, "ambiguous_rate", "in [0, 1)", self.ambiguous_rate
        )
        check_field(
            self.label_noise.kind == "none",
            "label_noise.kind",
            "none with digits-ambiguous",
            self.label_noise.kind,
        )


def ambiguous_labels(
    x: torch.Tensor, y: torch.Tensor, rate: float, num_classes: int = 10
) -> torch.Tensor:
    """Labels with the ``rate`` fraction of lowest-margin samples moved to their nearest other class.

    :param x: images ``[N, ...]``; :param y: clean labels int64 ``[N]``.
    :return: new labels ``[N]`` (the others unchanged).
    """
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    centroids = torch.stack([flat[y == c].mean(0) for c in range(num_classes)])  # [C, P]
    d = torch.cdist(flat, centroids)  # [N, C]
    d_true = d.gather(1, y[:, None]).squeeze(1)
    d_other = d.scatter(1, y[:, None], float("inf"))
    margin = d_other.min(dim=1).values - d_true  # [N]
    k = round(rate * y.numel())
    flip = margin.argsort()[:k]
    out = y.clone()
    out[flip] = d_other.argmin(dim=1)[flip]
    return out


@register_dataset("digits-ambiguous", DigitsAmbiguousConfig, task="classification")
def build_digits_ambiguous(config: DigitsAmbiguousConfig, seed: int) -> PaperhooksDataModule:
    """digits with the labels of its most ambiguous training images flipped (instance noise)."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    dm = build_datamodule("digits", config, seed)
    train = {k: v for k, v in dm.train_set.tensors.items() if k != "index"}
    clean = train["target"]
    train["target"] = ambiguous_labels(
        train["input"], clean, config.ambiguous_rate, dm.info.num_classes
    )
    train["clean_target"] = clean
    return PaperhooksDataModule(
        dm.info,
        DictDataset(train),
        dm.val_set,
        dm.batch_size,
        dm.seed,
        dm.num_workers,
        dm.redundant,
    )


__all__ = ["DigitsAmbiguousConfig", "ambiguous_labels", "build_digits_ambiguous"]
