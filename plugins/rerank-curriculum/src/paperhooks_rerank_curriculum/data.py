"""``digits-difficulty``: scikit-learn's digits with the batch keys the paper's heuristics read.

The paper scores each (question, answer) training pair with a cheap first-stage ranker
(BM25) and calls a pair easy when that ranker agrees with its relevance label. Here a
question is an image, the candidate answers are the 10 classes, the relevant answer is
the image's (possibly corrupted) training label, and the cheap ranker is the nearest class
centroid in pixel space, its centroids averaged over the training labels::

    s_c(x) = −‖x − μ_c‖²                              (ranker score of class c for image x)
    rank   = 1 + #{c : s_c(x) > s_y(x)}              (1 = the ranker puts the label first)
    normscore = (s_y − min_c s_c) / (max_c s_c − min_c s_c)     ∈ [0, 1]
    relevance = 1                                    (every (image, label) pair is a positive)

A corrupted label is usually far down the ranker's list, so it gets a small 1/rank and is
down-weighted early, as the paper's curriculum does with answers BM25 ranks low. The
dataset does not provide ``kdescore`` (the KDE heuristic's construction was not checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from paperhooks.tasks import (
    DictDataset,
    DigitsConfig,
    build_datamodule,
    register_dataset,
)

if TYPE_CHECKING:
    from paperhooks.tasks.datamodule import PaperhooksDataModule


@dataclass(frozen=True)
class DigitsDifficultyConfig(DigitsConfig):
    """The options of ``digits`` (label noise, imbalance, ...); the keys are added to train."""


def centroid_ranker(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """``rank``, ``normscore`` and ``relevance`` of each (image, label) pair under the
    nearest-centroid ranker whose centroids are the per-label means of ``x``.

    :param x: images, shape ``[N, ...]`` (flattened inside).
    :param y: labels, int64 ``[N]``.
    :return: ``rank`` (int64 ``[N]``, 1-based), ``normscore`` (float ``[N]`` in [0, 1]) and
        ``relevance`` (float ``[N]``, all 1).
    """
    flat = x.reshape(x.shape[0], -1).to(torch.float64)  # [N, P]
    centroids = torch.stack(
        [flat[y == c].mean(0) if bool((y == c).any()) else flat.mean(0) for c in range(num_classes)]
    )
    scores = -(torch.cdist(flat, centroids) ** 2)  # [N, C]
    s_y = scores.gather(1, y[:, None])  # [N, 1]
    rank = 1 + (scores > s_y).sum(dim=1)  # [N]
    lo, hi = scores.min(dim=1, keepdim=True).values, scores.max(dim=1, keepdim=True).values
    span = hi - lo
    norm = torch.where(span > 0, (s_y - lo) / span.clamp_min(1e-300), torch.ones_like(s_y)).squeeze(
        1
    )
    return {
        "rank": rank.to(torch.int64),
        "normscore": norm.to(torch.float32),
        "relevance": torch.ones(x.shape[0], dtype=torch.float32),
    }


@register_dataset("digits-difficulty", DigitsDifficultyConfig, task="classification")
def build_digits_difficulty(config: DigitsDifficultyConfig, seed: int) -> PaperhooksDataModule:
    """digits plus ``rank``, ``normscore`` and ``relevance`` from a nearest-centroid ranker."""
    from paperhooks.tasks.datamodule import PaperhooksDataModule

    dm = build_datamodule("digits", config, seed)
    train = {k: v for k, v in dm.train_set.tensors.items() if k != "index"}
    train.update(centroid_ranker(train["input"], train["target"], dm.info.num_classes))
    return PaperhooksDataModule(
        dm.info,
        DictDataset(train),
        dm.val_set,
        dm.batch_size,
        dm.seed,
        dm.num_workers,
        dm.redundant,
    )


__all__ = ["DigitsDifficultyConfig", "build_digits_difficulty", "centroid_ranker"]
