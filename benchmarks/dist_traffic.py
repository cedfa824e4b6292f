"""Distributed cost: bytes communicated per training step under 2-process DDP (gloo, CPU).

Counted, not timed, so the numbers are exact and the same on any machine:

- DDP's own gradient traffic: a communication hook registered with
  ``DistributedDataParallel.register_comm_hook`` adds up the size of every gradient bucket it
  is handed, then calls the default all-reduce hook;
- paperhooks' collectives: ``paperhooks.dist.traffic``, the payload bytes this process hands
  to each collective of ``paperhooks.dist`` (all-reduce, all-gather, reduce-scatter).

The model is an MLP trunk with K linear heads (one cross-entropy loss per head). Arms, per K:
no plugin (``Σ_k L_k``, DDP all-reduces the gradients); ``loss-reweighting`` (its global
weights need one all-gather of the per-sample losses, the core one all-reduce of their sum);
the built-in magnitude pruning (masks from replicated weights: no collective); gradient
surgery (MGDA through ``paperhooks.gradients.Engine``, DDP kept out with ``no_sync`` as
``HookedModule`` does) in the ``full`` and the ``columns`` layout.

Part of ``benchmarks/run_all.py``; alone: ``python benchmarks/dist_traffic.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _common import Settings
from torch import nn

WORLD = 2
KS = (2, 4, 8)
BATCH = 16  # per rank
D_IN, HIDDEN, FEATURES, CLASSES = 64, 128, 32, 10


class Net(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES), nn.ReLU()
        )
        self.heads = nn.ModuleList(nn.Linear(FEATURES, CLASSES) for _ in range(k))

    def forward(self, x):
        f = self.trunk(x)
        return [h(f) for h in self.heads]


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.buckets = 0


def counting_hook(state: Counter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    buf = bucket.buffer()
    state.bytes += buf.numel() * buf.element_size()
    state.buckets += 1
    return default_hooks.allreduce_hook(None, bucket)


def _mgda(grads, ctx):
    from paperhooks.gradients import min_norm_weights

    return grads.combine(min_norm_weights(grads.gram().cpu()))


def _arm_step(arm: str, ddp, x, y, hooks, engine) -> None:
    """One training step of ``arm`` on this rank's batch (gradients only; no optimizer)."""
    from paperhooks.gradients import write_grads

    net = ddp.module
    for p in net.parameters():
        p.grad = None
    if arm in ("no plugin", "pruning (built-in magnitude)"):
        outs = ddp(x)
        sum(F.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)).backward()
        if arm.startswith("pruning"):
            module, ctx = hooks
            ctx.step += 1
            module._prune(ctx)  # the core's pruning step (HookedModule._after_optimizer_step)
    elif arm == "loss-reweighting":
        outs = ddp(x)
        per_sample = sum(F.cross_entropy(o, y[:, i], reduction="none") for i, o in enumerate(outs))
        w = hooks.sample_weights(per_sample, {"input": x, "target": y})
        loss = hooks.reduce({"loss": per_sample}, w)["loss"]
        loss.backward()
    else:  # gradient surgery, "surgery full" / "surgery columns"
        layout = arm.split()[-1]
        with ddp.no_sync():
            outs = ddp(x)
            values = {f"task{i}": F.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)}
            named = list(net.named_parameters())
            trunk = {n for n, _ in named if n.startswith("trunk.")}
            d = engine.run(values, named, trunk, [_mgda], ctx=None, layout=layout)
            write_grads(d.vector, [p for _, p in named])


ARMS = (
    "no plugin",
    "loss-reweighting",
    "pruning (built-in magnitude)",
    "surgery full",
    "surgery columns",
)


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from paperhooks import dist
    from paperhooks.functional import Hooks
    from paperhooks.gradients import Engine
    from paperhooks_loss_reweighting import LossReweighting, LossReweightingConfig

    results = []
    try:
        for k in KS:
            for arm in ARMS:
                torch.manual_seed(0)
                net = Net(k)
                hooks = None
                if arm == "loss-reweighting":
                    plugin = LossReweighting(LossReweightingConfig(burnin_steps=0))
                    plugin.name = "loss-reweighting"
                    hooks = Hooks([plugin], strategy="ddp")
                elif arm.startswith("pruning"):
                    from families import pruning_plugin

                    from paperhooks import HookedModule

                    module = HookedModule(net, [pruning_plugin()], strategy="ddp")
                    module.configure_model()  # registers the masks
                    ctx = module.hooks.ctx
                    ctx.max_steps, ctx.step = (
                        10,
                        2,
                    )  # warm-up: steps 3, 4; measured: step 5 (prunes)
                    hooks = (module, ctx)
                    net = module.model
                ddp = DDP(net)
                counter = Counter()
                ddp.register_comm_hook(counter, counting_hook)
                engine = Engine("batched")
                g = torch.Generator().manual_seed(100 + rank)
                x, y = (
                    torch.randn(BATCH, D_IN, generator=g),
                    torch.randint(0, CLASSES, (BATCH, k), generator=g),
                )
                for _ in range(2):  # warm-up (DDP rebuilds its buckets after the first step)
                    _arm_step(arm, ddp, x, y, hooks, engine)
                counter.bytes = counter.buckets = 0
                dist.traffic.clear()
                _arm_step(arm, ddp, x, y, hooks, engine)
                params = sum(p.numel() for p in net.parameters())
                trunk = sum(p.numel() for n, p in net.named_parameters() if n.startswith("trunk."))
                results.append(
                    {
                        "k": k,
                        "arm": arm,
                        "params": params,
                        "trunk_params": trunk,
                        "ddp_bytes": counter.bytes,
                        "ddp_buckets": counter.buckets,
                        "paperhooks": dict(dist.traffic),
                        "sparsity": hooks[0].sparsity if arm.startswith("pruning") else None,
                    }
                )
        topk = _topk_traffic(rank, world)
        with open(Path(out) / f"rank{rank}.json", "w") as f:
            json.dump({"rows": results, "topk": topk}, f)
    finally:
        tdist.destroy_process_group()


def _topk_traffic(rank: int, world: int) -> list[dict]:
    """Global magnitude top-k over row shards, as under FSDP2 (``Shard(0)``): rank r holds its
    block of rows of every trunk weight and :func:`paperhooks.dist.topk_mask` selects over all
    of them; the payload is counted, and the masks checked against one process's selection."""
    from paperhooks import dist

    torch.manual_seed(0)
    weights = [
        p.detach() for n, p in Net(8).named_parameters() if n.startswith("trunk.") and p.dim() == 2
    ]
    scores = torch.cat([w.abs().reshape(-1) for w in weights])
    out = []
    for s in (0.5, 0.9):
        local = [w.abs().chunk(world, 0)[rank] for w in weights]
        dist.traffic.clear()
        masks = dist.topk_mask(local, lambda n, s=s: n - round(s * n))
        traffic = dict(dist.traffic)
        whole = torch.zeros(scores.numel(), dtype=torch.bool)
        whole[
            torch.argsort(scores, descending=True, stable=True)[
                : scores.numel() - round(s * scores.numel())
            ]
        ] = True
        mine = torch.cat(
            [
                whole[o : o + w.numel()].reshape(w.shape).chunk(world, 0)[rank].reshape(-1)
                for o, w in zip(_offsets(weights), weights, strict=True)
            ]
        )
        out.append(
            {
                "sparsity": s,
                "scores": scores.numel(),
                "local_scores": sum(t.numel() for t in local),
                "layers": len(weights),
                "traffic": traffic,
                "equals_one_process": bool(
                    torch.equal(torch.cat([m.reshape(-1) for m in masks]), mine)
                ),
            }
        )
    return out


def _offsets(weights: list[torch.Tensor]) -> list[int]:
    out, o = [], 0
    for w in weights:
        out.append(o)
        o += w.numel()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wire_bytes(op: str, payload: int, world: int = WORLD) -> float:
    """Bytes one rank sends for ``payload`` bytes handed to ``op`` with a ring algorithm."""
    if op == "all_reduce":
        return 2 * (world - 1) / world * payload
    if op == "reduce_scatter":
        return (world - 1) / world * payload
    if op == "all_gather":  # the payload is this rank's part; it goes to the world - 1 others
        return (world - 1) * payload
    if op == "broadcast":
        return payload
    raise ValueError(f"unknown collective {op!r}")


def run(s: Settings) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(WORLD, free_port(), tmp), nprocs=WORLD, join=True)
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(WORLD)]
    rows = ranks[0]["rows"]
    same = all(r["rows"] == rows for r in ranks[1:])
    topk = []
    for case in zip(*(r["topk"] for r in ranks), strict=True):
        first = case[0]
        payload = sum(first["traffic"].values())
        topk.append(
            {
                "sparsity": first["sparsity"],
                "scores": first["scores"],
                "layers": first["layers"],
                "traffic": first["traffic"],
                "payload": payload,
                "wire": sum(wire_bytes(op, b) for op, b in first["traffic"].items()),
                # the alternative: all-gather every rank's float32 scores, then select locally
                "gather_payload": 4 * first["local_scores"],
                "gather_wire": wire_bytes("all_gather", 4 * first["local_scores"]),
                "ranks_agree": all(c["traffic"] == first["traffic"] for c in case),
                "equals_one_process": all(c["equals_one_process"] for c in case),
            }
        )
        t = topk[-1]
        print(
            f"  top-k over shards at sparsity {t['sparsity']}: {t['traffic']} ({t['payload']} B) vs gathering the "
            f"scores {t['gather_payload']} B; masks equal one process: {t['equals_one_process']}",
            flush=True,
        )
    for r in rows:
        r["paperhooks_bytes"] = sum(r["paperhooks"].values())
        r["total_bytes"] = r["ddp_bytes"] + r["paperhooks_bytes"]
        r["wire_bytes"] = wire_bytes("all_reduce", r["ddp_bytes"]) + sum(
            wire_bytes(op, b) for op, b in r["paperhooks"].items()
        )
    for r in rows:
        base = next(b for b in rows if b["k"] == r["k"] and b["arm"] == "no plugin")
        r["ratio"] = r["total_bytes"] / base["total_bytes"]
        r["wire_ratio"] = r["wire_bytes"] / base["wire_bytes"]
        print(
            f"  traffic K={r['k']} {r['arm']}: DDP {r['ddp_bytes']} B, paperhooks {r['paperhooks']} "
            f"-> {r['total_bytes']} B ({r['ratio']:.3f}× no plugin)",
            flush=True,
        )
    return {
        "rows": rows,
        "world": WORLD,
        "batch_per_rank": BATCH,
        "ranks_agree": same,
        "topk": topk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="ignored: always gloo on CPU"
    )
    args = ap.parse_args()
    run(Settings(quick=args.quick))


if __name__ == "__main__":
    main()
