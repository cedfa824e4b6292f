"""The paper's effect, in direction, on 200 training digits: five seeds trained side by side.

Each seed has its own stratified draw of 20 training digits per class (the other 1597 are the
test set) and its own initialization; the five models are trained at once as batched tensors
(``bmm``), which is exactly five independent runs of full-batch SGD (momentum 0.9, 200
steps) on an MLP 64-32-10, plain or with every weight companded (a = 0.8, b = 0.5). The
weight decay of the plain model is (λ/2)‖w‖² (PyTorch's ``weight_decay``); with the compander
it is the paper's (λ/2)‖Ψ(v)‖² (Eq. 5), or (λ/2)‖v‖² in the learnable version; biases get
(λ/2)‖b‖² in both.
"""

from __future__ import annotations

import math

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


def test_with_eq5_decay_the_generalization_gain_does_not_show_on_digits():
    """Eq. 5 decay (λ = 5e-4) on both: the test accuracy on 1597 digits barely moves.

    Measured per seed: plain 0.9267 0.8992 0.9230 0.9286 0.9386 (mean 0.9232), compander
    0.9261 0.9004 0.9249 0.9280 0.9411 (mean 0.9241): +0.1 point, within seed noise. The
    near-zero fractions are 0.0536-0.0574 (plain) and 0.0477-0.0617 (compander): with the decay
    on Ψ(v), which Ψ'(v)² amplifies near zero, the "fewer near-zero weights" effect is gone.
    Asserted: the mean accuracies within 1 point, the bound held, and no better than a tie
    on the near-zero fraction (the pinned measurement, not the paper's claim). The sweep in
    ``_sweep.py`` (the paper's SGD recipe scaled to digits: MLPs and a BN CNN, 10 or 20 digits
    per class, 5-20 seeds; the card's table) finds no consistent gain over weight decay alone
    either: the gains above the seed spread (shifted digits, lr 0.1) come with a better fit
    of the training set and are matched by plain training at a higher lr.
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
