"""Worker for tests/test_pruning.py: distributed top-k on 2 gloo processes (spawned by name)."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from paperhooks import dist


def shards(rank: int) -> dict[str, list[torch.Tensor]]:
    """Each rank's scores, per case: uneven sizes, many ties, an empty shard, float64."""
    g = torch.Generator().manual_seed(11)
    ties = [
        torch.randint(0, 4, (7, 3), generator=g).float(),
        torch.randint(0, 4, (5,), generator=g).float(),
    ]
    ties_1 = [
        torch.randint(0, 4, (2, 4), generator=g).float(),
        torch.randint(0, 4, (9,), generator=g).float(),
    ]
    wide = [torch.randn(13, generator=g, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)]
    wide_1 = [
        torch.randn(4, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64),
    ]
    # signed zeros, infinities and subnormals: -0.0 ties with +0.0, -inf ranks last
    odd = [torch.tensor([0.0, -0.0, 1e-40, -1e-40, float("-inf"), 2.0, -2.0, float("inf")])]
    odd_1 = [torch.tensor([-0.0, 0.0, 2.0, float("-inf")])]
    return {"ties": (ties, ties_1)[rank], "wide": (wide, wide_1)[rank], "odd": (odd, odd_1)[rank]}


#: k for each case (the totals are 38, 23 and 12 elements)
KS = {"ties": (0, 1, 9, 17, 20, 37, 38), "wide": (0, 5, 11, 23), "odd": (1, 3, 4, 6, 9, 11)}


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: dict[str, torch.Tensor] = {}
        for case, local in shards(rank).items():
            for k in KS[case]:
                dist.traffic.clear()
                masks = dist.topk_mask(local, k)
                result[f"{case}/{k}"] = (
                    torch.cat([m.reshape(-1) for m in masks])
                    if masks
                    else torch.zeros(0, dtype=torch.bool)
                )
                result[f"{case}/{k}/all_reduce"] = torch.tensor(dist.traffic["all_reduce"])
                result[f"{case}/{k}/all_gather"] = torch.tensor(dist.traffic["all_gather"])
        stats = dist.sum_over_ranks(
            {
                "n": torch.tensor([rank + 1, 10 * rank], dtype=torch.int64),
                "x": torch.full((2, 2), 0.5 * (rank + 1)),
            }
        )
        result["stats/n"], result["stats/x"] = stats["n"], stats["x"]
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
