"""Deterministic global batches, sharded by rank, resumable mid-epoch.

Epoch ``e`` orders the dataset by ``torch.randperm(n)`` seeded with ``seed * 1000003 + e``
(or in order without shuffling). Global batch ``b`` is ``perm[b*G:(b+1)*G]``, and rank ``r``
of ``W`` yields its ``r``-th contiguous slice. The union over ranks of batch ``b``, rank 0's
rows first, is what one process with batch ``G`` gets: that is what makes "N processes
compute what one process computes on the global batch" testable.

:class:`DictDataset` fetches a whole per-rank batch of dict rows in one indexing operation.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

_EPOCH_STRIDE = 1000003


class ShardedBatchSampler:
    """Yields this rank's share of each global batch, as lists of dataset indices.

    Args:
        n: dataset size.
        global_batch_size: ``G``, rows per global batch over all ranks.
        seed: base seed of the per-epoch permutation.
        rank, world_size: this process and the number of processes.
        shuffle: permute each epoch (training) or keep the dataset order (validation).
        drop_last: drop an incomplete last global batch, so every global batch is full. With
            ``drop_last=True``, ``G`` must be divisible by ``world_size``; without it, the
            last batch is split as evenly as possible (a rank may get fewer or no rows).
        progress: called when iteration starts; returns ``(current_epoch, batches_done)``
            where ``batches_done`` counts batches of all epochs already consumed. The epoch
            comes from it and ``batches_done - epoch * len(self)`` batches are skipped (a
            mid-epoch resume yields exactly the remaining batches). Without it, the epoch is
            the one given to :meth:`set_epoch` and nothing is skipped.
    """

    def __init__(
        self,
        n: int,
        global_batch_size: int,
        seed: int,
        rank: int,
        world_size: int,
        shuffle: bool,
        drop_last: bool,
        progress: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
        if drop_last and global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be divisible by world_size ({world_size})"
            )
        self.n = n
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.progress = progress
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch used when no ``progress`` callable is given."""
        self.epoch = epoch

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch_size
        return -(-self.n // self.global_batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The dataset order of ``epoch`` (identical on every rank)."""
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * _EPOCH_STRIDE + epoch)
        return torch.randperm(self.n, generator=gen)

    def shard(self, global_batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of one global batch (uneven sizes allowed)."""
        size = global_batch.numel()
        start = self.rank * size // self.world_size
        stop = (self.rank + 1) * size // self.world_size
        return global_batch[start:stop]

    def global_batches(self, epoch: int) -> list[torch.Tensor]:
        """All global batches of ``epoch``, in order."""
        perm = self.order(epoch)
        g = self.global_batch_size
        return [perm[b * g : (b + 1) * g] for b in range(len(self))]

    def _start(self) -> tuple[int, int]:
        if self.progress is None:
            return self.epoch, 0
        epoch, done = self.progress()
        return epoch, max(0, done - epoch * len(self))

    def __iter__(self) -> Iterator[list[int]]:
        epoch, skip = self._start()
        for batch in self.global_batches(epoch)[skip:]:
            yield self.shard(batch).tolist()


def generator(seed: int, stream: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, stream)``: independent streams, one recipe seed."""
    digest = hashlib.blake2b(f"{seed}:{stream}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


class DictDataset(Dataset[dict[str, torch.Tensor]]):
    """Rows of equally long tensors; adds ``index``. Fetches whole batches at once."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        sizes = {k: v.shape[0] for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"tensors must have the same length, got {sizes}")
        n = next(iter(sizes.values()))
        self.tensors = {**tensors, "index": torch.arange(n, dtype=torch.int64)}

    def __len__(self) -> int:
        return self.tensors["index"].shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return {k: v[idx] for k, v in self.tensors.items()}


def collate(batch: Any) -> dict[str, torch.Tensor]:
    """Pass through a batch fetched whole by ``__getitems__``; collate lists of rows."""
    return batch if isinstance(batch, dict) else default_collate(batch)


def lightning_progress(trainer: Any, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches done in total)`` of a Lightning trainer's fit, for :class:`ShardedBatchSampler`.

    Counted from the batches the fit loop has processed (restored from a checkpoint on
    resume), in epochs of ``limit_train_batches`` of ``batches_per_epoch`` batches. This
    does not depend on optimizer steps (accumulation, manual optimization), and stays right
    where ``trainer.current_epoch`` does not: a run stopped by ``max_steps`` mid-epoch saves
    its epoch as finished, yet the resumed run must first finish that epoch's batches.
    """
    nb, limit = batches_per_epoch, trainer.limit_train_batches
    if isinstance(limit, int):
        nb = min(nb, limit)
    elif isinstance(limit, float):
        nb = int(nb * limit)
    if nb <= 0:
        return trainer.current_epoch, trainer.current_epoch * batches_per_epoch
    epoch, in_epoch = divmod(trainer.fit_loop.epoch_loop.batch_progress.total.processed, nb)
    return epoch, epoch * batches_per_epoch + in_epoch


def per_rank_batch_size(global_batch_size: int, trainer: Any | None) -> int:
    """Rows per process: ``global_batch_size // world_size``; raises naming ``data.batch_size``."""
    world = 1 if trainer is None else trainer.world_size
    if global_batch_size % world:
        raise ValueError(
            f"data.batch_size ({global_batch_size}) must be divisible by the number of processes ({world})"
        )
    return global_batch_size // world


def make_loader(
    dataset: DictDataset,
    global_batch_size: int,
    seed: int,
    trainer: Any | None,
    train: bool,
    num_workers: int = 0,
) -> DataLoader[dict[str, torch.Tensor]]:
    """A loader of this rank's share of each global batch (rank and world from ``trainer``).

    Training shuffles, drops the incomplete last batch and resumes from the trainer's
    progress (:func:`lightning_progress`); validation keeps the order and every row.
    """
    per_rank_batch_size(global_batch_size, trainer)
    rank, world = (0, 1) if trainer is None else (trainer.global_rank, trainer.world_size)
    sampler = ShardedBatchSampler(
        len(dataset), global_batch_size, seed, rank, world, shuffle=train, drop_last=train
    )
    if train and trainer is not None:
        sampler.progress = functools.partial(lightning_progress, trainer, len(sampler))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


__all__ = ["DictDataset", "ShardedBatchSampler", "collate", "generator", "lightning_progress"]
__all__ += ["make_loader", "per_rank_batch_size"]
