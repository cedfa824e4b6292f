"""Worker for the 2-process test; a module of its own so that spawned processes can import it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as tdist

from paperhooks.context import StepContext
from paperhooks_loss_reweighting import LossReweighting, LossReweightingConfig


def hook_on_shard(
    rank: int, world_size: int, port: int, losses: torch.Tensor, sizes: list[int], out: str
) -> None:
    """Join a gloo group, call the hook on this rank's shard of ``losses``, save what it gave."""
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        plugin = LossReweighting(LossReweightingConfig(burnin_steps=10))
        ctx = StepContext(step=10)
        shard = losses.split(sizes)[rank]  # [sizes[rank]]
        w = plugin.weighting_sample_weights(losses=shard, batch={}, ctx=ctx)
        torch.save({"w": w, "logged": dict(ctx.logged)}, Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
