"""Core overhead: a HookedModule with no plugins vs a plain LightningModule doing the same work.

Both train the same network on the same batches inside Lightning (same optimizer, same
logging); arms alternate in rounds so machine noise hits both alike. Each round gives one
median step time per arm (after warm-up steps) and one ratio; the result is the median ratio
over rounds with its min–max. Goal: ratio ≤ 1.02.

Part of ``benchmarks/run_all.py``; alone::

    python benchmarks/core_overhead.py [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _common import Settings, bench_trainer, paired_ratios, quiet, summary, sync
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

GOAL = 1.02
LR = 0.1  # HookedModule's built-in optimizer: SGD, lr 0.1, no momentum


class Plain(L.LightningModule):
    """What a user writes by hand: cross-entropy, mean, log, SGD."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch["input"]), batch["target"], reduction="none").mean()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class Timer(L.Callback):
    """Wall time from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
    optimizer step and every hook in between), the device synchronized at both ends."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        sync(self.device)
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self.t0)


def loader(
    shape: tuple[int, ...], n: int, batch: int, classes: int = 10, seed: int = 0
) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)

    def collate(rows):
        xs, ys = zip(*rows, strict=True)
        return {"input": torch.stack(xs), "target": torch.stack(ys)}

    return DataLoader(TensorDataset(x, y), batch_size=batch, collate_fn=collate)


def step_time(
    module: L.LightningModule, data: DataLoader, steps: int, warmup: int, device: str
) -> float:
    """Median seconds per training step of one fit, the first ``warmup`` steps left out."""
    timer = Timer(device)
    trainer = bench_trainer(steps + warmup, device, timer)
    trainer.fit(module, data)
    return statistics.median(timer.times[warmup:])


def compare(
    arms: dict[str, Callable[[], L.LightningModule]],
    data: DataLoader,
    *,
    rounds: int,
    steps: int,
    warmup: int,
    device: str,
    seed: int = 0,
) -> dict[str, list[float]]:
    """Per-round median step time of each arm; arms alternate (order rotated every round)."""
    names = list(arms)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            torch.manual_seed(seed)
            out[name].append(step_time(arms[name](), data, steps, warmup, device))
    return out


def row(name: str, times: dict[str, list[float]], base: str, other: str, goal: float) -> dict:
    ratios = paired_ratios(times[other], times[base])
    return {
        "model": name,
        "base": base,
        "arm": other,
        "base_ms": 1e3 * statistics.median(times[base]),
        "arm_ms": 1e3 * statistics.median(times[other]),
        "ratio": summary(ratios),
        "goal": goal,
    }


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


def resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def mlp_case(s: Settings) -> tuple:
    """(name, model factory, input shape, batch, rounds, steps, warm-up) of the tiny MLP."""
    return (
        "MLP 64-256-10, batch 64",
        mlp,
        (64,),
        64,
        s.pick_rounds(5, 9, 7),
        s.pick(40, 120),
        s.pick(10, 20),
    )


def resnet_case(s: Settings) -> tuple:
    """The same for timm's resnet18 on 3×32×32 inputs (smaller under --quick)."""
    batch = s.pick(8, 32, 128)
    return (
        f"timm resnet18, batch {batch} of 3×32×32",
        resnet18,
        (3, 32, 32),
        batch,
        s.pick_rounds(3, 7, 5),
        s.pick(4, 20, 40),
        s.pick(2, 5, 10),
    )


def run(s: Settings) -> dict:
    from paperhooks import HookedModule

    quiet()
    cases = [mlp_case(s), resnet_case(s)]
    rows = []
    for name, make, shape, batch, rounds, steps, warmup in cases:
        data = loader(shape, batch * (steps + warmup), batch, seed=s.seed)
        times = compare(
            {
                "plain LightningModule": lambda make=make: Plain(make()),
                "HookedModule, no plugin": lambda make=make: HookedModule(make()),
            },
            data,
            rounds=rounds,
            steps=steps,
            warmup=warmup,
            device=s.device,
            seed=s.seed,
        )
        r = row(name, times, "plain LightningModule", "HookedModule, no plugin", GOAL)
        r.update(rounds=rounds, steps=steps, warmup=warmup)
        rows.append(r)
        print(
            f"  core overhead {name}: {r['base_ms']:.2f} ms vs {r['arm_ms']:.2f} ms, "
            f"ratio {r['ratio']['median']:.3f} [{r['ratio']['min']:.3f}, {r['ratio']['max']:.3f}]",
            flush=True,
        )
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available here (torch.cuda.is_available() is False)"
        )
    run(Settings(device=args.device, quick=args.quick))


if __name__ == "__main__":
    main()
