"""Adversarial training on long-tailed digits, through the core's Hooks: the experiment of
the effect test and of the method card's table (a module of its own so both can import it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from paperhooks.functional import Hooks
from paperhooks.plugin import Plugin
from paperhooks.tasks import DigitsConfig, build_datamodule

EPS, STEP_SIZE, TRAIN_STEPS, EVAL_STEPS = 0.1, 0.025, 5, 10
TAIL = range(5, 10)  # imbalance 10: class c keeps 10^(−c/9) of its images; 5-9 are the rarest half


class Net(nn.Module):
    """MLP 64 → 64 → 64 → 10; the ReLU output before the head is the feature z."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU()
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x)
        return self.head(z), z


def pgd(net: Net, x: torch.Tensor, y: torch.Tensor, steps: int, g: torch.Generator) -> torch.Tensor:
    """L∞ PGD (Madry et al.): random start in the ε-ball, ``steps`` signed steps, inputs in [0, 1]."""
    delta = (torch.rand(x.shape, generator=g) * 2 - 1) * EPS
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(net((x + delta).clamp(0, 1))[0], y)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + STEP_SIZE * grad.sign()).clamp(-EPS, EPS)
    return (x + delta).clamp(0, 1).detach()


def train_and_eval(
    seed: int, plugins: list[Plugin], epochs: int = 24, batch_size: int = 64
) -> dict[str, float]:
    """One run (see :func:`_train_and_eval`) on one CPU thread: faster for this small network and
    steady on a busy machine; the caller's thread count is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_eval(seed, plugins, epochs, batch_size)
    finally:
        torch.set_num_threads(threads)


def _train_and_eval(
    seed: int, plugins: list[Plugin], epochs: int = 24, batch_size: int = 64
) -> dict[str, float]:
    """PGD-5 adversarial training with SGD; per-class clean and PGD-10 accuracy on balanced val.

    Returns the mean over the tail classes (5-9) and the head classes (0-4) of the clean and
    robust per-class accuracies. The same seed gives the same data, init and batch order.
    """
    dm = build_datamodule("digits", DigitsConfig(imbalance=10.0), seed)
    xt, yt = dm.train_set.tensors["input"], dm.train_set.tensors["target"]
    xv, yv = dm.val_set.tensors["input"], dm.val_set.tensors["target"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    hooks = Hooks(plugins, seed=seed)
    step = 0
    for epoch in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for b in range(len(yt) // batch_size):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            batch = {"input": pgd(net, xt[idx], yt[idx], TRAIN_STEPS, g), "target": yt[idx]}
            hooks.begin_step(step, epoch, b)
            logits, z = net(batch["input"])
            outputs = {"logits": logits, "features": z}
            # what HookedModule.training_step does: objectives, weights, global reduction
            objectives = hooks.objectives(
                net, batch, outputs, F.cross_entropy(logits, batch["target"], reduction="none")
            )
            weights = hooks.sample_weights(sum(objectives.values()), batch, outputs, net)
            loss = hooks.total(hooks.reduce(objectives, weights))
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    with torch.no_grad():
        clean = net(xv)[0].argmax(1)
    robust_x = pgd(net, xv, yv, EVAL_STEPS, g)
    with torch.no_grad():
        robust = net(robust_x)[0].argmax(1)

    def acc(pred: torch.Tensor, classes: range) -> float:
        return float(torch.stack([(pred[yv == c] == c).float().mean() for c in classes]).mean())

    head = range(0, 5)
    return {
        "tail_clean": acc(clean, TAIL),
        "tail_robust": acc(robust, TAIL),
        "head_clean": acc(clean, head),
        "head_robust": acc(robust, head),
    }
