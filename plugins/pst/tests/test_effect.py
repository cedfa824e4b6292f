"""The paper's claim, in direction: learned scores keep more accuracy than |W'| when pruning to 90%
while transferring a trained model to a new task (PST's setting: fine-tuning a pre-trained model).

Setup (plain torch; the plugin's hooks driven the way the core's ``_prune`` drives them):
- Pretraining ("general" task): for each seed, an MLP 64-128-64-5 (ReLU) trained dense on the
  digits 0-4 of an 80% split (full-batch Adam, lr 0.01, 150 steps).
- Downstream task: the digits 5-9 (labels 5-9 → 0-4), with a fresh random head (same for every
  method). All weights frozen (the head's too, as in PST every Linear gets U V); the head's
  bias trains. 150 full-batch Adam steps (lr 0.01), PST's cubic schedule to 90% (t_w = 0.1,
  t_f = 0.3), every layer at s_t, ranks r_w = r_m = 4 (4082 trained scalars of 17 285):
  * ``pst``: the plugin as configured (S = |W'| + AB + (R1ᵀ + 1Cᵀ));
  * ``magnitude``: the same run with α₁ = α₂ = 0 (S = |W'|, the data-free criterion; U V and
    the bias still train): PST without its data-driven score, at the same budget.
- Measured: accuracy on the held-out digits 5-9.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paperhooks import pruning
from paperhooks.context import StepContext
from paperhooks_pst import Pst, PstConfig

SEEDS = range(5)
STEPS = 150


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


@functools.cache
def _all_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    x, y = torch.tensor(raw.data, dtype=torch.float32) / 16.0, torch.tensor(raw.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(y))
    return x[perm[:cut]], y[perm[:cut]], x[perm[cut:]], y[perm[cut:]]


def _general():
    x, y, _, _ = _all_digits()
    return x[y < 5], y[y < 5]


def _digits():
    """The downstream task: digits 5-9 as classes 0-4 (train, train, held-out, held-out)."""
    x, y, xv, yv = _all_digits()
    return x[y >= 5], y[y >= 5] - 5, xv[yv >= 5], yv[yv >= 5] - 5


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 5)
    )


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@functools.cache
def _pretrained(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = _net()
    x, y = _general()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(STEPS):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(100 + seed)
    head = nn.Linear(64, 5)  # a fresh head for the downstream task
    state["4.weight"], state["4.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    return state


def _model(seed: int) -> nn.Sequential:
    model = _net()
    model.load_state_dict(_pretrained(seed))
    return model


def run_pst(seed: int, **config) -> tuple[float, int]:
    """Held-out accuracy after PST fine-tuning, and the number of trained scalars."""
    x, y, xv, yv = _digits()
    model = _model(seed)
    plugin = Pst(
        PstConfig(final_sparsity=0.9, weight_rank=4, mask_rank=4, trainable=("4.bias",), **config)
    )
    module = _Module(model)
    plugin.reparam_setup(module=module, ctx=StepContext(seed=seed))
    masks = pruning.add_masks(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.01)
    current = 0.0
    for t in range(STEPS + 1):
        if t > 0:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        ctx = StepContext(step=t, max_steps=STEPS, seed=seed)
        s = plugin.pruning_schedule(ctx=ctx)
        if s is None or s == current:
            continue
        with torch.no_grad():  # the core's _prune
            scores = plugin.pruning_scores(
                params=pruning.local_weights(model, masks), module=module, ctx=ctx
            )
            scores = {k: torch.where(m.mask, scores[k], -torch.inf) for k, m in masks.items()}
            pruning.set_masks(
                model, masks, plugin.pruning_allocate(scores=scores, sparsity=s, ctx=ctx)
            )
        current = s
    assert pruning.sparsity_of(masks) == pytest.approx(plugin.config.final_sparsity, abs=1e-3)
    return _acc(model, xv, yv), sum(p.numel() for p in params)


def test_learned_scores_beat_magnitude_at_90_percent_sparsity():
    rows = []
    for seed in SEEDS:
        pst, n_pst = run_pst(seed)
        mag, n_mag = run_pst(seed, mask_alpha1=0.0, mask_alpha2=0.0)
        assert n_pst == n_mag == 4082
        rows.append((pst, mag))
    print(
        "seed pst magnitude",
        *[f"{s}: {p:.3f} {m:.3f}" for s, (p, m) in zip(SEEDS, rows, strict=True)],
        sep="\n",
    )
    mean_pst, mean_mag = (sum(r[i] for r in rows) / len(rows) for i in (0, 1))
    assert mean_pst > mean_mag + 0.005
    # Ties are common (one held-out image is 0.0053), and which side of a tie a seed lands on
    # depends on the CPU's floating-point path: seed 4 tied on one machine and was one image
    # behind on another (the card). So: behind on at most one seed, by at most one image.
    behind = [m - p for p, m in rows if p < m]
    assert len(behind) <= 1 and all(b < 0.006 for b in behind), rows
