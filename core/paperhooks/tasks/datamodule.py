"""The Lightning datamodules behind the registered datasets.

They live apart from the dataset configs and builders (:mod:`.data`, :mod:`.preference`, the
plugins' task modules) so that validating a recipe, which needs only the configs, does not
import Lightning; the builders import this module when they build data.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from paperhooks.tasks.registry import DataInfo
from paperhooks.tasks.sampler import DictDataset, make_loader, per_rank_batch_size


class PaperhooksDataModule(pl.LightningDataModule):
    """Train/val :class:`DictDataset` pair served through :func:`.sampler.make_loader`.

    Attributes:
        info: what the model needs (task, classes, per-sample input shape).
        train_set, val_set: the datasets, as built from the seed.
        redundant: bool mask over ``train_set``: the redundant (repeated) samples.
        calibration_set: rows a criterion may calibrate on (``input``, ``target``): the
            training split before a class filter (digits' ``train_classes``) left rows out,
            so it holds the classes the fit does not train on; ``train_set`` otherwise.
    """

    def __init__(
        self,
        info: DataInfo,
        train_set: DictDataset,
        val_set: DictDataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        redundant: torch.Tensor | None = None,
        calibration_set: DictDataset | None = None,
    ) -> None:
        super().__init__()
        self.info = info
        self.train_set = train_set
        self.val_set = val_set
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.redundant = (
            redundant if redundant is not None else torch.zeros(len(train_set), dtype=torch.bool)
        )
        self.calibration_set = calibration_set if calibration_set is not None else train_set

    def per_process_batch_size(self) -> int:
        """``batch_size // world_size``; raises if the global batch does not split evenly."""
        return per_rank_batch_size(self.batch_size, self.trainer)

    def train_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return make_loader(
            self.train_set, self.batch_size, self.seed, self.trainer, True, self.num_workers
        )

    def val_dataloader(self) -> DataLoader[dict[str, torch.Tensor]]:
        return make_loader(
            self.val_set, self.batch_size, self.seed, self.trainer, False, self.num_workers
        )


class PreferenceDataModule(PaperhooksDataModule):
    """Pairs with their hidden reward: :meth:`hidden_reward` scores any response.

    Attributes:
        reward_table: ``u`` ``[K, V]`` for ``synthetic-preferences`` (rows: topic), the
            validity table ``1[v ∈ V[k, t]]`` ``[K, max_response, V]`` for its ``reward: chain``,
            or ``r`` ``[P, M]`` for ``tabular-preferences``.
        preference_matrix: ``[P, M, M]``, the probability that response ``i`` beats ``j``
            (0/1 here; 0.5 on the diagonal), for tabular data.
        reward_kind: ``mean``, ``sum`` or ``chain`` (synthetic data).
        chain_lengths: ``(min_response, max_response)``, the lengths a valid chain may have.
    """

    reward_table: torch.Tensor
    preference_matrix: torch.Tensor | None = None
    reward_kind: str = "mean"
    chain_lengths: tuple[int, int] = (0, 0)

    def hidden_reward(
        self, prompt: torch.Tensor, response: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Hidden rewards ``[B]`` of responses ``[B, T]`` (``mask``: 1 on content tokens).

        ``prompt`` is the topic (synthetic) or prompt id (tabular, where ``response`` is ``[B]``).
        """
        table = self.reward_table.to(response.device)
        if response.dim() == 1:
            return table[prompt, response]
        if self.reward_kind == "chain":
            from paperhooks.tasks.preference import _chain_reward

            return _chain_reward(table, self.chain_lengths, prompt, response, mask)
        per_token = table[prompt.unsqueeze(1), response] * mask
        total = per_token.sum(1)
        return total / mask.sum(1).clamp_min(1) if self.reward_kind == "mean" else total


__all__ = ["PaperhooksDataModule", "PreferenceDataModule"]
