"""The paper's effects, in direction, on small-data digits.

Two training loops. ``_train`` (the first three tests): five seeds side by side, 200 training
digits, full-batch SGD, for the mechanism (bounded weights, fewer near-zero weights). ``run``
(the last test and ``_sweep.py``): the paper's minibatch recipe with a step schedule, for the
generalization claim over 30 seeds; its comment below says how it is set up.

In ``_train``, each seed has its own stratified draw of 20 training digits per class (the
other 1597 are the test set) and its own initialization; the five models are trained at once
as batched tensors (``bmm``), which is exactly five independent runs of full-batch SGD
(momentum 0.9, 200 steps) on an MLP 64-32-10, plain or with every weight companded (a = 0.8, b = 0.5). The
weight decay of the plain model is (λ/2)‖w‖² (PyTorch's ``weight_decay``); with the compander
it is the paper's (λ/2)‖Ψ(v)‖² (Eq. 5), or (λ/2)‖v‖² in the learnable version; biases get
(λ/2)‖b‖² in both.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from paperhooks_weight_compander import Compander, decay_term

SEEDS = range(5)
A, B = 0.8, 0.5


def _digits(per_class: int = 20, seeds=SEEDS):
    """The test set is all of digits; seed s draws ``per_class`` training images per class.

    ``_sweep.py`` uses the same draws for its rows."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32) / 16.0
    y = torch.tensor(raw.target)
    train = []
    for s in seeds:
        g = torch.Generator().manual_seed(1000 + s)
        train.append(
            torch.cat(
                [
                    (y == k)
                    .nonzero()
                    .flatten()[torch.randperm(int((y == k).sum()), generator=g)[:per_class]]
                    for k in range(10)
                ]
            )
        )
    return x, y, torch.stack(train)  # [1797, 64], [1797], [S, 200]


def _train(
    compander: str, wd: float, *, lr: float = 0.1, steps: int = 200, sizes=(64, 32, 10)
) -> list[dict]:
    """compander: "none", "fixed" or "learnable". Returns per seed: test accuracy, the fraction
    of effective weights with |w| < 0.01, and max |w| (all layers)."""
    x, y, train = _digits()
    n_seeds = len(train)
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default initialization
        gens = [torch.Generator().manual_seed(100 * s + 7 * fan_in + fan_out) for s in SEEDS]
        w0 = torch.stack([(2 * torch.rand(fan_out, fan_in, generator=g) - 1) * bound for g in gens])
        b0 = torch.stack([(2 * torch.rand(fan_out, generator=g) - 1) * bound for g in gens])
        c = None
        if compander == "fixed":
            c = Compander(A, B)
        elif compander == "learnable":
            c = Compander(0.5, 1.0, learnable=True)
        v = torch.nn.Parameter(c.right_inverse(w0) if c is not None else w0)
        if compander == "learnable":  # one (a, b) per layer and seed
            c.a = torch.nn.Parameter(torch.full((n_seeds, 1, 1), 0.5))
            c.b = torch.nn.Parameter(torch.full((n_seeds, 1, 1), 1.0))
        layers.append((v, torch.nn.Parameter(b0), c))
    params = [p for v, b, c in layers for p in (v, b, *(c.parameters() if c is not None else ()))]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)

    def forward(h: torch.Tensor) -> torch.Tensor:
        for i, (v, b, c) in enumerate(layers):
            h = torch.baddbmm(b[:, None, :], h, (c(v) if c is not None else v).transpose(1, 2))
            h = torch.relu(h) if i < len(layers) - 1 else h
        return h

    xt, yt = x[train], y[train]
    for _ in range(steps):
        ce = F.cross_entropy(forward(xt).flatten(0, 1), yt.flatten(), reduction="none").view(
            n_seeds, -1
        )
        vs = [v for v, _, _ in layers]
        if compander == "none":
            decay = 0.5 * wd * sum(v.square().sum() for v in vs)
        else:
            decay = decay_term(vs, [c for *_, c in layers], wd)
        loss = ce.mean(1).sum() + decay + 0.5 * wd * sum(b.square().sum() for _, b, _ in layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = []
    with torch.no_grad():
        logits = forward(x.expand(n_seeds, -1, -1))
        for i in range(n_seeds):
            test = torch.ones(len(y), dtype=torch.bool)
            test[train[i]] = False
            w = torch.cat([(c(v) if c is not None else v)[i].flatten() for v, _, c in layers])
            out.append(
                {
                    "acc": (logits[i][test].argmax(1) == y[test]).float().mean().item(),
                    "near": (w.abs() < 1e-2).float().mean().item(),
                    "max": w.abs().max().item(),
                    "a": [c.a[i].item() for *_, c in layers] if compander == "learnable" else None,
                }
            )
    return out


def _col(runs: list[dict], key: str) -> list[float]:
    return [r[key] for r in runs]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def test_compander_bounds_the_weights_and_keeps_fewer_near_zero_without_decay():
    """The mechanism (Eq. 3): Ψ'(0) = a/b = 1.6 moves small weights faster, so fewer stay near zero.

    Measured (torch 2.14.1, CPU), λ = 0, per seed: near-zero fraction plain 0.0503 0.0532
    0.0532 0.0503 0.0515, compander 0.0435 0.0456 0.0456 0.0384 0.0376; max |w| plain
    1.62 1.50 1.90 1.44 1.73, compander 0.905 0.893 0.958 0.899 0.921 (bound aπ/2 = 1.2566).
    """
    plain, wc = _train("none", 0.0), _train("fixed", 0.0)
    assert all(w < 0.95 * p for w, p in zip(_col(wc, "near"), _col(plain, "near"), strict=True)), (
        plain,
        wc,
    )
    assert all(
        w < A * math.pi / 2 and w < p
        for w, p in zip(_col(wc, "max"), _col(plain, "max"), strict=True)
    )


def test_with_eq5_decay_the_bound_holds_and_the_near_zero_effect_is_gone():
    """Eq. 5 decay (λ = 5e-4) on both: the test accuracy on 1597 digits barely moves.

    Measured per seed: plain 0.9267 0.8992 0.9230 0.9286 0.9386 (mean 0.9232), compander
    0.9261 0.9004 0.9249 0.9280 0.9411 (mean 0.9241): +0.1 point, 3 of 5 seeds ahead. The
    near-zero fractions are 0.0536-0.0574 (plain) and 0.0477-0.0617 (compander): with the decay
    on Ψ(v), which Ψ'(v)² amplifies near zero, the "fewer near-zero weights" effect is gone.
    Asserted: the mean accuracies within 1 point, the bound held, and no better than a tie
    on the near-zero fraction (the pinned measurement, not the paper's claim). Five
    seeds are too few to tell a gain of a few tenths of a point from noise; the last test
    here measures it over 30 seeds.
    """
    plain, wc = _train("none", 5e-4), _train("fixed", 5e-4)
    assert abs(_mean(_col(wc, "acc")) - _mean(_col(plain, "acc"))) < 0.01, (plain, wc)
    assert all(m < A * math.pi / 2 for m in _col(wc, "max"))
    assert _mean(_col(wc, "near")) > 0.9 * _mean(_col(plain, "near")), (plain, wc)


@pytest.mark.slow
def test_learnable_version_leaves_few_weights_near_zero():
    """Learnable a, b per layer (from 0.5, 1.0; decay on v), SGD lr 0.01 for all parameters.

    At lr 0.1 (the other tests') a and b diverge on this BN-free MLP (a turns negative, the
    accuracy falls to chance); at 0.01, a grows to about 1.45 and b falls to 0.06-0.26.
    Measured per seed: near-zero fraction plain 0.0676 0.0600 0.0659 0.0633 0.0612, learnable
    0.0068 0.0021 0.0017 0.0046 0.0038; accuracy mean 0.8852 (plain) vs 0.8786 (learnable).
    """
    plain, learn = _train("none", 5e-4, lr=0.01), _train("learnable", 5e-4, lr=0.01)
    assert all(
        w < 0.2 * p for w, p in zip(_col(learn, "near"), _col(plain, "near"), strict=True)
    ), (plain, learn)
    assert all(a > 0.5 for r in learn for a in r["a"])
    assert abs(_mean(_col(learn, "acc")) - _mean(_col(plain, "acc"))) < 0.02


# The paper's CIFAR training recipe scaled to digits, with minibatches, a step schedule and
# shift augmentation: the loop behind the effect test below and every row of ``_sweep.py``
# (the card's "Generalization on small-data digits" table). All seeds of a setting train side
# by side as batched tensors (``bmm`` for the MLP, a grouped convolution with one group per
# seed for the CNN), which is exactly that many independent runs. Both arms share the seeds'
# data draws, initial weights (Ψ⁻¹ of the same w₀, Eq. 4), batch order, shifts and dropout
# masks. SGD, momentum 0.9, lr 0.1, batch 100, 200 epochs, lr ×0.1 at 45 % and 68 % of
# training (the paper's epochs 90 and 136 of 200), weight decay 5e-4 on every parameter (Eq. 5
# on Ψ(v) for companded weights). ``shift`` is the digits analog of CIFAR's random crop: each
# image moved by −1, 0 or +1 pixel per axis.


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


def test_compander_generalizes_better_than_plain_at_plains_best_lr():
    """The paper's claim: added to weight decay at a recipe tuned for the plain network, the
    compander raises test accuracy. Both arms use ``Setting`` (the paper's SGD recipe scaled
    to digits; Eq. 5 decay λ = 5e-4) with 10 training digits per class and no augmentation,
    the overfitting regime: both reach training accuracy 1.0. Seeds 0-29, side by side.

    Plain's lr is tuned on a grid: 0.03 0.05 0.1 0.15 0.2 0.3 gave mean test accuracy
    .8714 .8845 .8878 .8869 .8860 .8838, so its best is the paper's 0.1. The compander at
    0.1 gave .8910: +0.32 ± 0.43 points per seed, ahead on 25, tied on 1, behind on 4; at
    any lr of the grid it gave .8869-.8916. Fresh seeds 30-59 (``_sweep.py
    lr-grid-10-per-class-fresh-seeds``): plain's best is again 0.1 (.8914), the compander
    at 0.1 gives +0.21 ± 0.39, ahead on 18, tied on 2, behind on 10. So the gain is not the
    larger step Ψ'(0) = a/b = 1.6 gives small weights: plain at a larger (or smaller) lr does
    not reach it. It is small, about 5 of the ~1700 test images; the seed count makes it
    measurable.

    Asserted: the compander at lr 0.1 beats plain at lr 0.05, 0.1 and 0.2 in the mean, by
    at least 0.1 point over plain at 0.1, and is ahead on at least 20 of the 30 seeds.
    """
    st = Setting(per_class=10, seeds=30)
    wc, wc_train = run(st, True)
    runs = {lr: run(dataclasses.replace(st, lr=lr), False) for lr in (0.05, 0.1, 0.2)}
    plain = {lr: test for lr, (test, _) in runs.items()}
    gain = [w - p for w, p in zip(wc, plain[0.1], strict=True)]
    assert min(wc_train) == min(runs[0.1][1]) == 1.0  # the overfitting regime
    assert _mean(wc) > max(_mean(p) for p in plain.values()), (wc, plain)
    assert _mean(gain) >= 0.001 and sum(g > 0 for g in gain) >= 20, gain
