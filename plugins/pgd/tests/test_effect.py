"""The paper's effect, in direction: PGD adversarial training raises robust accuracy.

Standard training and PGD-AT of the same MLP on scikit-learn's digits (8×8, inputs in
[0, 1]), same seed, data order and optimizer; the plugin runs through ``paperhooks.Hooks``
(the functional form of the training step). Robust accuracy is measured on the validation
split under a stronger attack than the training one (K = 20 vs 3, random start), at
ε = 0.2 where standard training is almost never robust.
"""

from __future__ import annotations

import torch

from paperhooks import HookedModule, Hooks
from paperhooks.tasks import DigitsConfig, MLPConfig, build_datamodule, build_model
from paperhooks.testing.fixtures import one_thread, quiet_lightning  # noqa: F401
from paperhooks_pgd import PGD, PGDConfig, class_means, linf_pgd, task_losses

EPS = 0.2  # ≈ 3 of the 16 grey levels of a digit pixel


def train(
    seed: int, adversarial: bool, epochs: int = 10
) -> tuple[HookedModule, dict[str, torch.Tensor]]:
    dm = build_datamodule("digits", DigitsConfig(batch_size=64), seed)
    torch.manual_seed(seed)
    module = HookedModule(build_model("mlp", MLPConfig(hidden=(64,)), dm.info))
    # α = 2.5·ε/K, the usual rule (the official MNIST α·K = 0.4 = 1.33·ε with K = 40)
    plugins = [PGD(PGDConfig(epsilon=EPS, step_size=2.5 * EPS / 3, steps=3))] if adversarial else []
    hooks = Hooks(plugins, seed=seed)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    train_set = dm.train_set.tensors
    n, g, step = len(train_set["target"]), torch.Generator().manual_seed(seed), 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        for b in range(n // 64):
            batch = {k: v[order[b * 64 : (b + 1) * 64]] for k, v in train_set.items()}
            hooks.begin_step(step, epoch, b)
            batch = hooks.perturb(batch, module)
            losses = module.losses(batch, module.outputs(batch))
            opt.zero_grad()
            hooks.total(hooks.reduce({"loss": losses}, None)).backward()
            opt.step()
            step += 1
    return module.eval(), dm.val_set.tensors


def robust_accuracy(
    module: HookedModule, val: dict[str, torch.Tensor]
) -> tuple[float, float, float]:
    """Clean accuracy, PGD-20 robust accuracy and worst-class robust accuracy on ``val``."""
    x, y = val["input"], val["target"]
    g = torch.Generator().manual_seed(1234)
    delta0 = (2 * torch.rand(x.shape, generator=g) - 1) * EPS
    x_adv = linf_pgd(
        lambda xa: task_losses(module, {**val, "input": xa}),
        x,
        EPS,
        2.5 * EPS / 20,
        20,
        delta0=delta0,
    )
    with torch.no_grad():
        clean = (module(x).argmax(-1) == y).float()
        robust = (module(x_adv).argmax(-1) == y).float()
    return clean.mean().item(), robust.mean().item(), class_means(robust, y, 10).min().item()


def test_pgd_training_raises_robust_accuracy_over_standard_training():
    results = {}
    for seed in (0, 1):
        for adversarial in (False, True):
            results[seed, adversarial] = robust_accuracy(*train(seed, adversarial))
    # measured (torch 2.14.1, CPU; clean, PGD-20 robust, worst-class robust accuracy):
    #   seed 0: standard 0.964 / 0.031 / 0.000   PGD-AT 0.903 / 0.387 / 0.057
    #   seed 1: standard 0.961 / 0.033 / 0.000   PGD-AT 0.886 / 0.301 / 0.000
    # Asserted with margin: robust accuracy +0.2 on each seed, at a cost in clean accuracy
    # below 0.1 (the paper's robustness/accuracy trade-off).
    for seed in (0, 1):
        (c0, r0, _), (c1, r1, _) = results[seed, False], results[seed, True]
        assert r1 > r0 + 0.2, results
        assert c1 > c0 - 0.1, results
