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


# -- scores_from: training, the authors' procedure -------------------------------------------------
#: the domain fine-tuning of lomo.py scaled to the toy: SGD at η = 0.03 (the code's lr), batch 8,
#: 5 epochs, clip-grad-norm 1.0, on the training digits 5-9 the general model never saw
FT_EPOCHS, FT_BATCH, FT_LR = 5, 8, 0.03


@functools.cache
def fine_tuned(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(fine-tuned weights, S) after the domain fine-tuning with D-Pruner's hook before each step."""
    model = _model_dense(seed)
    module = HookedModule(model)
    module.masks = pruning.add_masks(model)  # all kept, as the pruning family sets up in a fit
    plugin = DPruner(DPrunerConfig(scores_from="training"))
    x, y, _, _ = _digits()
    domain = (y >= 5) & ~_seen()
    plugin.attach({"input": x[y < 5], "target": y[y < 5]}, {"input": x[:0], "target": y[:0]})
    xd, yd = x[domain], y[domain]
    opt = torch.optim.SGD(model.parameters(), lr=FT_LR)
    order = torch.Generator().manual_seed(seed)
    ctx = StepContext(seed=seed)
    for _ in range(FT_EPOCHS):
        perm = torch.randperm(len(yd), generator=order)
        for i in range(0, len(yd), FT_BATCH):
            b = perm[i : i + FT_BATCH]
            opt.zero_grad()
            F.cross_entropy(model(xd[b]), yd[b]).backward()
            plugin.lifecycle_before_optimizer_step(module=module, ctx=ctx)  # S += ..., g ← g̃
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # after the hook, as in fits
            opt.step()
    params = pruning.local_weights(model, module.masks)
    S = plugin.pruning_scores(params=params, module=module, ctx=ctx)
    return {k: v.clone() for k, v in model.state_dict().items()}, S


def pruned_after_fine_tuning(seed: int, sparsity: float, criterion: str) -> tuple[float, float]:
    """(domain, general) accuracy of the fine-tuned model pruned to ``sparsity`` per layer by
    ``criterion``: ``d-pruner`` (S) or ``magnitude`` (|W| of the same weights)."""
    state, S = fine_tuned(seed)
    model = _net()
    masks = pruning.add_masks(model)
    model.load_state_dict(state)  # the fine-tuned weights, every mask still all-kept
    params = pruning.local_weights(model, masks)
    scores = S if criterion == "d-pruner" else pruning.magnitude_scores(params)
    pruning.set_masks(model, masks, pruning.uniform_allocation(scores, sparsity))
    return _accs(model)


def test_with_scores_from_training_the_domain_is_kept_better_than_by_magnitude():
    """The authors' procedure: S summed over the domain fine-tuning (``scores_from: training``),
    against magnitude pruning of the same fine-tuned weights, per layer, no retraining.
    Measured on this machine (seeds 0-5; the card has seeds 0-9), domain accuracy D-Pruner −
    magnitude: at 50% +0.020 (behind on 1 seed), at 60% +0.037 (behind on none); general
    accuracy at 50%: 0.672 vs 0.650. At 60% and above D-Pruner keeps less of the general
    digits than magnitude (see the card), which this test does not cover."""
    seeds = range(6)
    gains, general = {}, []
    for sparsity in (0.5, 0.6):
        rows = [
            (
                pruned_after_fine_tuning(s, sparsity, "d-pruner"),
                pruned_after_fine_tuning(s, sparsity, "magnitude"),
            )
            for s in seeds
        ]
        gains[sparsity] = [a[0] - b[0] for a, b in rows]
        if sparsity == 0.5:
            general = [a[1] - b[1] for a, b in rows]
        print(sparsity, [(round(a[0], 3), round(b[0], 3)) for a, b in rows])
    for sparsity, g in gains.items():
        assert sum(g) / len(g) > 0, (sparsity, g)
        assert sum(x < 0 for x in g) <= 1, (sparsity, g)  # behind on one seed at most
    both = gains[0.5] + gains[0.6]
    assert sum(both) / len(both) >= 0.015, both
    # at the code's ~half sparsity the general digits are not paid for it
    assert sum(general) / len(general) >= -0.02, general
