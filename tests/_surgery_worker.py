"""Worker for tests/test_gradients.py: the surgery engine on 2 gloo processes (spawned by name)."""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist

from paperhooks import dist
from paperhooks.gradients import Engine


def model_and_batch(rank: int | None):
    """A 2-layer net and 8 samples; rank r takes rows [4r, 4r+4), ``None`` takes all 8."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
    if rank is not None:
        x, y = x[4 * rank : 4 * rank + 4], y[4 * rank : 4 * rank + 4]
    return net, x, y


def objectives(net, x, y):
    out = net(x)
    return {
        "a": (out[:, 0] - y[:, 0]).pow(2).mean(),
        "b": (out[:, 1] - y[:, 1]).abs().mean(),
        "c": out.pow(2).mean(),
    }


def mgda_chain():
    from paperhooks.gradients import min_norm_weights

    def f(grads, ctx):
        return grads.combine(min_norm_weights(grads.gram()))

    return [f]


def run(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {}
        for layout in ("full", "columns"):
            for surgery in ("all", "head"):
                net, x, y = model_and_batch(rank)
                named = list(net.named_parameters())
                chosen = {n for n, _ in named} if surgery == "all" else {"2.weight", "2.bias"}
                named = [x for x in named if x[0] in chosen] + [
                    x for x in named if x[0] not in chosen
                ]
                dist.traffic.clear()
                seen = {}

                def record(grads, ctx, seen=seen):
                    seen["gram"] = grads.gram().clone()
                    seen["width"] = torch.tensor(grads.rows.shape[1])
                    return None

                d = Engine().run(
                    objectives(net, x, y),
                    named,
                    chosen,
                    [record, *mgda_chain()],
                    ctx=None,
                    layout=layout,
                )
                result[f"{layout}/{surgery}"] = {
                    "direction": d.vector,
                    "weights": d.weights,
                    "gram": seen["gram"],
                    "width": seen["width"],
                    "traffic": dict(dist.traffic),
                }
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        tdist.destroy_process_group()
