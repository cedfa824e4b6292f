"""The sweep behind the card's "Generalization on small-data digits" table (not a test).

Plain training vs the weight compander (fixed a, b; Eq. 5 decay on Ψ(v)) on digits with 10 or
20 training images per class; the rest of the 1797 images are the test set. All seeds of a
row train side by side as batched tensors (``bmm`` for the MLP, a grouped convolution with
one group per seed for the CNN), which is exactly that many independent runs. Both arms of a
row share the seeds' data draws, initial weights (Ψ⁻¹ of the same w₀, Eq. 4), batch order,
shifts and dropout masks.

Training follows the paper's CIFAR recipe scaled to digits: SGD, momentum 0.9, lr 0.1,
batch 100, 200 epochs, lr ×0.1 at 45 % and 68 % of training (the paper's epochs 90 and 136
of 200), weight decay 5e-4 on every parameter (on Ψ(v) for companded weights). ``shift`` is
the digits analog of CIFAR's random crop: each image moved by −1, 0 or +1 pixel per axis.

Run from the repository root (about 25 s per MLP row and 160 s per CNN row on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/weight-compander/tests/_sweep.py [ROW ...]
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from test_effect import _digits  # the same training draws (this script's folder is on sys.path)

from paperhooks_weight_compander import Compander, decay_term


@dataclass(frozen=True)
class Setting:
    model: str = "mlp"  # "mlp" or "cnn"
    hidden: tuple[int, ...] = (32,)  # MLP 64-hidden-10
    chans: tuple[int, ...] = (16, 16, 32, 32)  # CNN: 3x3 conv-BN-ReLU, max-pool after 2nd and 4th
    per_class: int = 20
    seeds: int = 10
    seed0: int = 0
    epochs: int = 200
    batch: int = 100
    lr: float = 0.1
    wd: float = 5e-4
    a: float = 0.8
    b: float = 0.5
    dropout: float = 0.0  # before the last linear layer
    shift: bool = False


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


def _uniform(shape, fan_in: int, gens) -> torch.Tensor:  # nn.Linear's default initialization
    bound = 1 / math.sqrt(fan_in)
    return torch.stack([(2 * torch.rand(shape, generator=g) - 1) * bound for g in gens])


def run(st: Setting, compander: bool) -> tuple[list[float], list[float]]:
    """Test and training accuracy per seed (training accuracy on the unshifted images)."""
    seeds = list(range(st.seed0, st.seed0 + st.seeds))
    S = len(seeds)
    x, y, train = _digits(st.per_class, seeds)
    torch.manual_seed(12345)  # batch order, shifts, dropout: the same stream for both arms
    c = Compander(st.a, st.b) if compander else None
    W = c if c is not None else (lambda v: v)
    ws: list[torch.Tensor] = []  # the trained tensors of the weights: v (compander) or w (plain)
    others: list[torch.Tensor] = []  # biases and BN affine parameters, never companded

    def weight(w0: torch.Tensor) -> torch.Tensor:
        v = torch.nn.Parameter(c.right_inverse(w0) if c is not None else w0)  # Eq. 4
        ws.append(v)
        return v

    def bias(n: int, fan_in: int, tag: int) -> torch.Tensor:
        b = torch.nn.Parameter(
            _uniform(
                (n,), fan_in, [torch.Generator().manual_seed(100 * s + tag + 50) for s in seeds]
            )
        )
        others.append(b)
        return b

    if st.model == "mlp":
        sizes = [64, *st.hidden, 10]
        layers = [
            (
                weight(
                    _uniform(
                        (o, i),
                        i,
                        [torch.Generator().manual_seed(100 * s + 7 * i + o) for s in seeds],
                    )
                ),
                bias(o, i, 7 * i + o),
            )
            for i, o in zip(sizes[:-1], sizes[1:], strict=True)
        ]

        def forward(h: torch.Tensor, training: bool) -> torch.Tensor:  # [S, N, 64] -> [S, N, 10]
            for k, (v, b) in enumerate(layers):
                if k == len(layers) - 1 and st.dropout and training:
                    h = F.dropout(h, st.dropout, True)
                h = torch.baddbmm(b[:, None, :], h, W(v).transpose(1, 2))
                h = torch.relu(h) if k < len(layers) - 1 else h
            return h
    else:
        chans, convs = [1, *st.chans], []
        for k, (i, o) in enumerate(zip(chans[:-1], chans[1:], strict=True)):
            # torchvision's ResNet/VGG initialization: kaiming_normal_(mode="fan_out", relu)
            gens = [torch.Generator().manual_seed(100 * s + 13 * k + 1) for s in seeds]
            v = weight(
                torch.stack(
                    [torch.randn((o, i, 3, 3), generator=g) * math.sqrt(2 / (9 * o)) for g in gens]
                )
            )
            gamma, beta = (
                torch.nn.Parameter(torch.ones(S * o)),
                torch.nn.Parameter(torch.zeros(S * o)),
            )
            others.extend([gamma, beta])
            convs.append((v, gamma, beta, torch.zeros(S * o), torch.ones(S * o), o))
        feat = chans[-1] * 2 * 2
        head_v = weight(
            _uniform(
                (10, feat), feat, [torch.Generator().manual_seed(100 * s + 999) for s in seeds]
            )
        )
        head_b = bias(10, feat, 999)

        def forward(h: torch.Tensor, training: bool) -> torch.Tensor:  # [S, N, 64] -> [S, N, 10]
            n = h.shape[1]
            h = h.permute(1, 0, 2).reshape(n, S, 8, 8)  # one channel group per seed
            for k, (v, gamma, beta, mean, var, o) in enumerate(convs):
                h = F.conv2d(h, W(v).reshape(S * o, -1, 3, 3), padding=1, groups=S)
                h = torch.relu(F.batch_norm(h, mean, var, gamma, beta, training, 0.1, 1e-5))
                h = F.max_pool2d(h, 2) if k in (1, 3) else h
            h = h.reshape(n, S, -1).permute(1, 0, 2)
            if st.dropout and training:
                h = F.dropout(h, st.dropout, True)
            return torch.baddbmm(head_b[:, None, :], h, W(head_v).transpose(1, 2))

    opt = torch.optim.SGD(ws + others, lr=st.lr, momentum=0.9)
    n = train.shape[1]
    steps_per_epoch = math.ceil(n / st.batch)
    total = st.epochs * steps_per_epoch
    milestones = (int(0.45 * total), int(0.68 * total))
    padded = F.pad(x.view(-1, 8, 8), (1, 1, 1, 1))
    shifted = torch.stack(
        [padded[:, dy : dy + 8, dx : dx + 8].reshape(-1, 64) for dy in range(3) for dx in range(3)]
    )
    step = 0
    for _ in range(st.epochs):
        perm = torch.stack([torch.randperm(n) for _ in range(S)])
        for j in range(steps_per_epoch):
            rows = torch.gather(train, 1, perm[:, j * st.batch : (j + 1) * st.batch])  # [S, batch]
            xb, yb = x[rows], y[rows]
            if st.shift:
                xb = shifted[torch.randint(0, 9, rows.shape), rows]
            for group in opt.param_groups:
                group["lr"] = st.lr * 0.1 ** sum(step >= m for m in milestones)
            ce = F.cross_entropy(
                forward(xb, True).flatten(0, 1), yb.flatten(), reduction="none"
            ).view(S, -1)
            if c is not None:
                decay = decay_term(ws, [c] * len(ws), st.wd)  # Eq. 5: (λ/2)‖Ψ(v)‖²
            else:
                decay = 0.5 * st.wd * sum(w.square().sum() for w in ws)
            loss = ce.mean(1).sum() + decay + 0.5 * st.wd * sum(p.square().sum() for p in others)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        pred = forward(x.expand(S, -1, -1), False).argmax(-1)
    test_acc, train_acc = [], []
    for i in range(S):
        test = torch.ones(len(y), dtype=torch.bool)
        test[train[i]] = False
        test_acc.append((pred[i][test] == y[test]).float().mean().item())
        train_acc.append((pred[i][~test] == y[~test]).float().mean().item())
    return test_acc, train_acc


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def main(names: list[str]) -> None:
    for name in names or list(ROWS):
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
