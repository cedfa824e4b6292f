"""Worker for the 2-process test; a module of its own so that spawned processes can import it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from paperhooks.context import StepContext
from paperhooks_done import DONE, DONEConfig


def run_steps(batches: list[torch.Tensor], part: tuple[int, list[int]] | None) -> dict[str, Any]:
    """Three weighting steps of DONE (r = 0.5, β = 0.3) on the batches, or on rank ``part[0]``'s shard."""
    plugin = DONE(DONEConfig(kl_reg=0.5, beta=0.3))
    ctx = StepContext()
    weights = []
    for s, losses in enumerate(batches):
        ctx.step = s
        shard = losses if part is None else losses.split(part[1])[part[0]]
        weights.append(plugin.weighting_sample_weights(losses=shard, ctx=ctx))
    return {"weights": weights, "state": plugin.state_dict(), "logged": dict(ctx.logged)}


def steps_on_shard(
    rank: int, world_size: int, port: int, batches: list[torch.Tensor], sizes: list[int], out: str
) -> None:
    """Join a gloo group, run :func:`run_steps` on this rank's shard, save what it gave."""
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.save(run_steps(batches, (rank, sizes)), Path(out) / f"rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
