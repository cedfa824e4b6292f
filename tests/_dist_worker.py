"""Worker for tests/test_dist.py (its own module: spawned processes import it by name)."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from paperhooks import dist


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        local = torch.arange(
            rank * 10, rank * 10 + 2 + rank, dtype=torch.float32
        )  # 2 rows, then 3 rows
        glob, mine = dist.all_gather_cat(local)
        g = dist.step_generator(seed=7, step=3, stream="mask")
        result = {
            "global": glob,
            "mine": torch.tensor([mine.start, mine.stop]),
            "sum": dist.global_sum(local),
            "mean": dist.global_mean(local),
            "max": dist.all_reduce_max(local.max()),
            "bcast": dist.broadcast(torch.tensor([float(rank + 1)])),
            "draw": torch.rand(4, generator=g),
            "world": torch.tensor(dist.world_size()),
        }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
