"""The sweep behind the card's "Generalization on small-data digits" table (not a test).

Plain training vs the weight compander (fixed a, b; Eq. 5 decay on Ψ(v)) on digits with 10 or
20 training images per class; the rest of the 1797 images are the test set. The training loop is
``test_effect.run`` (the paper's CIFAR recipe scaled to digits; its comment says how), the
one the effect test uses; each row below changes one or two of its settings.

Run from the repository root (about 25 s per MLP row and 160 s per CNN row on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/weight-compander/tests/_sweep.py [ROW ...]
"""

from __future__ import annotations

import dataclasses
import math
import sys

# the training loop and the data draws are the effect test's (this script's folder is on sys.path)
from test_effect import Setting, run

MLP = Setting()
CNN = Setting(model="cnn", seeds=5, shift=True)
ROWS: dict[str, Setting] = {
    # no augmentation: every arm fits its training set (training accuracy 1.0)
    "mlp": MLP,
    "mlp-fresh-seeds": dataclasses.replace(MLP, seeds=20, seed0=10),
    "mlp-dropout": dataclasses.replace(MLP, dropout=0.5),
    "mlp-600-epochs": dataclasses.replace(MLP, epochs=600),
    "mlp-a0.7-b0.7": dataclasses.replace(MLP, a=0.7, b=0.7),
    "mlp-10-per-class": dataclasses.replace(MLP, per_class=10),
    "mlp-10-per-class-fresh-seeds": dataclasses.replace(MLP, per_class=10, seeds=20, seed0=10),
    "mlp-10-per-class-lr0.2": dataclasses.replace(MLP, per_class=10, lr=0.2),
    "mlp-10-per-class-lr0.3": dataclasses.replace(MLP, per_class=10, lr=0.3),
    "mlp-10-per-class-a0.7-b0.7": dataclasses.replace(MLP, per_class=10, a=0.7, b=0.7),
    "mlp-64-64": dataclasses.replace(MLP, hidden=(64, 64)),
    "mlp-64-64-fresh-seeds": dataclasses.replace(MLP, hidden=(64, 64), seeds=20, seed0=10),
    "mlp-64-64-lr0.2": dataclasses.replace(MLP, hidden=(64, 64), lr=0.2),
    "mlp-64-64-lr0.3": dataclasses.replace(MLP, hidden=(64, 64), lr=0.3),
    "mlp-64-64-a0.7-b0.7": dataclasses.replace(MLP, hidden=(64, 64), a=0.7, b=0.7),
    # shift augmentation: the MLP no longer fits its training set
    "mlp-shift": dataclasses.replace(MLP, shift=True),
    "mlp-shift-fresh-seeds": dataclasses.replace(MLP, shift=True, seeds=20, seed0=10),
    "mlp-shift-lr0.05": dataclasses.replace(MLP, shift=True, lr=0.05),
    "mlp-shift-lr0.2": dataclasses.replace(MLP, shift=True, lr=0.2),
    "mlp-shift-lr0.3": dataclasses.replace(MLP, shift=True, lr=0.3),
    "mlp-shift-lr0.5": dataclasses.replace(MLP, shift=True, lr=0.5),
    "mlp-shift-a0.7-b0.7": dataclasses.replace(MLP, shift=True, a=0.7, b=0.7),
    "mlp-shift-wd1e-4": dataclasses.replace(MLP, shift=True, wd=1e-4),
    "mlp-shift-dropout": dataclasses.replace(MLP, shift=True, dropout=0.5),
    "mlp-shift-10-per-class": dataclasses.replace(MLP, shift=True, per_class=10),
    "mlp-shift-64-64": dataclasses.replace(MLP, shift=True, hidden=(64, 64)),
    "mlp-shift-wd1e-4-lr0.2": dataclasses.replace(MLP, shift=True, wd=1e-4, lr=0.2),
    "mlp-shift-dropout-lr0.2": dataclasses.replace(MLP, shift=True, dropout=0.5, lr=0.2),
    "mlp-shift-10-per-class-lr0.2": dataclasses.replace(MLP, shift=True, per_class=10, lr=0.2),
    "mlp-shift-64-64-lr0.2": dataclasses.replace(MLP, shift=True, hidden=(64, 64), lr=0.2),
    "mlp-shift-10-per-class-lr0.3": dataclasses.replace(MLP, shift=True, per_class=10, lr=0.3),
    "mlp-shift-10-per-class-lr0.5": dataclasses.replace(MLP, shift=True, per_class=10, lr=0.5),
    "mlp-shift-10-per-class-fresh-seeds": dataclasses.replace(
        MLP, shift=True, per_class=10, seeds=20, seed0=10
    ),
    # small VGG-BN-like CNN, shift augmentation unless said
    "cnn": CNN,
    "cnn-wd1e-4": dataclasses.replace(CNN, wd=1e-4),
    "cnn-lr0.04": dataclasses.replace(CNN, lr=0.04),
    "cnn-a0.7-b0.7": dataclasses.replace(CNN, a=0.7, b=0.7),
    "cnn-a0.7-b0.7-no-shift": dataclasses.replace(CNN, a=0.7, b=0.7, shift=False),
    "cnn-a0.7-b0.7-10-per-class": dataclasses.replace(CNN, a=0.7, b=0.7, per_class=10),
}

# Each arm at each lr of LR_GRID; gains against plain at its own best lr of the grid.
LR_GRID = (0.03, 0.05, 0.1, 0.15, 0.2, 0.3)
GRIDS: dict[str, Setting] = {
    "lr-grid-10-per-class": dataclasses.replace(MLP, per_class=10, seeds=30),
    "lr-grid-10-per-class-fresh-seeds": dataclasses.replace(MLP, per_class=10, seeds=30, seed0=30),
    "lr-grid": dataclasses.replace(MLP, seeds=30),
    "lr-grid-fresh-seeds": dataclasses.replace(MLP, seeds=30, seed0=30),
}


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _gain(wc: list[float], plain: list[float]) -> str:
    gain = [100 * (w - p) for w, p in zip(wc, plain, strict=True)]
    sd = math.sqrt(sum((g - _mean(gain)) ** 2 for g in gain) / (len(gain) - 1))
    ahead, behind = sum(g > 0 for g in gain), sum(g < 0 for g in gain)
    return f"{_mean(gain):+.2f} ± {sd:.2f} points, ahead {ahead} / tied {len(gain) - ahead - behind} / behind {behind}"


def grid(name: str, st: Setting) -> None:
    acc = {
        (lr, wc): run(dataclasses.replace(st, lr=lr), wc)[0]
        for lr in LR_GRID
        for wc in (False, True)
    }
    for lr in LR_GRID:
        print(
            f"{name} lr {lr}: plain {_mean(acc[lr, False]):.4f}  compander {_mean(acc[lr, True]):.4f}"
        )
    best = max(LR_GRID, key=lambda lr: _mean(acc[lr, False]))
    for lr in LR_GRID:
        print(
            f"{name} compander at lr {lr} vs plain at its best lr {best}: {_gain(acc[lr, True], acc[best, False])}"
        )


def main(names: list[str]) -> None:
    for name in names or [*ROWS, *GRIDS]:
        if name in GRIDS:
            grid(name, GRIDS[name])
            continue
        st = ROWS[name]
        plain, plain_train = run(st, False)
        wc, wc_train = run(st, True)
        gain = [w - p for w, p in zip(wc, plain, strict=True)]
        sd = math.sqrt(sum((g - _mean(gain)) ** 2 for g in gain) / (len(gain) - 1))
        print(
            f"{name:24s} plain {_mean(plain):.4f}  compander {_mean(wc):.4f}  gain {_mean(gain):+.4f} ± {sd:.4f}"
            f"  ({sum(g > 0 for g in gain)}/{len(gain)} seeds > 0)  train {_mean(plain_train):.3f} / {_mean(wc_train):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main(sys.argv[1:])
