"""The paper's claim, tested in direction: NOT reproduced on the toy (see the card).

Setup (plain torch; the plugin's hook called the way the core's ``_prune`` calls it):
- For each seed, an MLP 64-128-64-10 (ReLU) trained on a "general" split: every digit 0-4 of
  an 80% training split and a random 10% of its digits 5-9 (full-batch Adam, lr 0.01, 150
  steps), so the domain (5-9) is learnt only partly and its loss is not ~0.
- One-shot pruning to 70% per layer, no retraining, by (a) magnitude |W|, (b) D-Pruner with
  the training digits 0-4 as the general calibration set and the 90% of training digits 5-9
  the model never saw as the domain set (128 rows each, batches of 8, λ = 0.1, η = 0.03 as in
  the code), (c) the same with λ = 0 (domain importance alone).
- Measured: held-out accuracy on the domain (digits 5-9) and on the general digits 0-4.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks.module import HookedModule
from paperhooks_d_pruner import DPruner, DPrunerConfig

SEEDS = range(3)
SPARSITY = 0.7


@functools.cache
def _digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = torch.tensor(raw.data, dtype=torch.float32) / 16.0, torch.tensor(raw.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)
    )


@functools.cache
def _seen() -> torch.Tensor:
    """Training rows of the general model: all digits 0-4, a random 10% of the digits 5-9."""
    _, y, _, _ = _digits()
    few = torch.rand(len(y), generator=torch.Generator().manual_seed(1)) < 0.1
    return (y < 5) | few


@functools.cache
def _trained(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _net()
    x, y, _, _ = _digits()
    seen = _seen()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x[seen]), y[seen]).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _accs(model) -> tuple[float, float]:
    _, _, xv, yv = _digits()
    with torch.no_grad():
        right = model(xv).argmax(1) == yv
    return float(right[yv >= 5].float().mean()), float(right[yv < 5].float().mean())


def pruned(seed: int, plugin: DPruner | None) -> tuple[float, float]:
    """(domain accuracy, general accuracy) after one-shot pruning to SPARSITY per layer."""
    model = _net()
    model.load_state_dict(_trained(seed))
    module = HookedModule(model)
    masks = pruning.add_masks(model)
    params = pruning.local_weights(model, masks)
    ctx = StepContext(seed=seed)
    if plugin is None:
        scores = pruning.magnitude_scores(params)
    else:
        x, y, _, _ = _digits()
        domain = (y >= 5) & ~_seen()
        plugin.attach(
            {"input": x[y < 5], "target": y[y < 5]}, {"input": x[domain], "target": y[domain]}
        )
        scores = plugin.pruning_scores(params=params, module=module, ctx=ctx)
    pruning.set_masks(model, masks, pruning.uniform_allocation(scores, SPARSITY))
    assert abs(pruning.sparsity_of(masks) - SPARSITY) < 1e-3
    return _accs(model)


def test_dual_importance_does_not_beat_magnitude_on_the_toy():
    rows = []
    for seed in SEEDS:
        dual, domain_only = DPruner(DPrunerConfig()), DPruner(DPrunerConfig(lam=0.0))
        rows.append(
            (
                _accs(_model_dense(seed)),
                pruned(seed, None),
                pruned(seed, dual),
                pruned(seed, domain_only),
            )
        )
        # at the code's λ = 0.1, η = 0.03 the general term 2λη²·G·g²/1000 barely moves S: the
        # 70% masks are those of the domain importance alone
        for k, s in dual.last_scores.items():
            a, b = (
                pruning.uniform_allocation({k: t}, SPARSITY)[k]
                for t in (s, domain_only.last_scores[k])
            )
            assert torch.equal(a, b), k
    print("seed: dense | magnitude | d-pruner | lambda=0   (domain acc, general acc)")
    for seed, r in zip(SEEDS, rows, strict=True):
        print(seed, " | ".join(f"{a:.3f} {b:.3f}" for a, b in r))
    mean = [[sum(r[i][j] for r in rows) / len(rows) for j in (0, 1)] for i in range(4)]
    print("mean", [[round(v, 3) for v in m] for m in mean])
    # the measured outcome, asserted so that a change shows: no domain gain over magnitude
    # (if this fails, D-Pruner now beats magnitude here: update the card)
    assert mean[2][0] <= mean[1][0] + 0.02


def _model_dense(seed: int) -> nn.Sequential:
    model = _net()
    model.load_state_dict(_trained(seed))
    return model
