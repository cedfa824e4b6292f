"""Core overhead: a HookedModule with no plugins vs a plain LightningModule doing the same work.

Both train the same network on the same batches inside Lightning; arms alternate in rounds so
machine noise hits both alike. Reports the median step time of each arm and the ratio, with
the spread over rounds. Goal: ratio ≤ 1.02.

    python benchmarks/core_overhead.py [--rounds 7] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings

import lightning.pytorch as L
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from paperhooks import HookedModule

warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)


class Plain(L.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.model(batch["input"]), batch["target"], reduction="none").mean()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)


def loader(shape: tuple[int, ...], n: int, batch: int) -> DataLoader:
    x, y = torch.randn(n, *shape), torch.randint(0, 10, (n,))

    def collate(rows):
        xs, ys = zip(*rows, strict=True)
        return {"input": torch.stack(xs), "target": torch.stack(ys)}

    return DataLoader(TensorDataset(x, y), batch_size=batch, collate_fn=collate)


def step_time(module: L.LightningModule, data: DataLoader, steps: int) -> float:
    timer = Timer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer])
    trainer.fit(module, data)
    return statistics.median(timer.times[5:])  # after warm-up


def bench(name: str, make_model, shape, batch: int, rounds: int, steps: int) -> dict:
    data = loader(shape, batch * steps, batch)
    plain, hooked = [], []
    for _ in range(rounds):
        torch.manual_seed(0)
        plain.append(step_time(Plain(make_model()), data, steps))
        torch.manual_seed(0)
        hooked.append(step_time(HookedModule(make_model(), optimizer=None), data, steps))
    ratios = [h / p for h, p in zip(hooked, plain, strict=True)]
    return {
        "model": name,
        "plain_ms": 1e3 * statistics.median(plain),
        "hooked_ms": 1e3 * statistics.median(hooked),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = [
        bench("mlp 64-256-10, batch 64", lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)),
              (64,), 64, args.rounds, args.steps),
        bench("timm resnet18, batch 32 of 3x32x32", lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
              (3, 32, 32), 32, max(3, args.rounds // 2), max(15, args.steps // 4)),
    ]
    print(f"{'model':40s} {'plain ms':>9s} {'hooked ms':>10s} {'ratio':>7s}  spread")
    for r in rows:
        print(f"{r['model']:40s} {r['plain_ms']:9.3f} {r['hooked_ms']:10.3f} {r['ratio']:7.3f}  [{r['ratio_min']:.3f}, {r['ratio_max']:.3f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
