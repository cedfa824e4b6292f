"""The paper's claim, tested in direction: Bone's training loss after N steps vs LoRA's.

Setup:
- Pretraining: for each of five seeds, an MLP body 64-64-64 (ReLU) with a 5-way head is
  pretrained on the digits 0-4 (all 901 of them, full-batch Adam, lr 0.01, 100 steps).
- Adaptation: the body is adapted to the digits 5-9 (896, labels 5-9 → 0-4) with a fresh
  5-way head (trainable, the same initialization for every method). The two hidden Linear
  layers get Bone (r = 8, the plugin), BAT (r = 8, the plugin) or LoRA (rank 4, W + B A,
  B = 0, A ~ PEFT's kaiming-uniform, scale 1).
- Equal trainable-parameter count: 2·8·64 = 2·4·(64 + 64) = 1024 adapter parameters, plus
  the head's 325.
- Measured: the full-batch cross-entropy after 100 Adam steps.
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from paperhooks.reparam import Layers, trainable_parameters
from paperhooks_bone import Bone, BoneConfig

SEEDS = range(5)


class LoRA(nn.Module):
    """W ↦ W + B A (rank k, B = 0 at init): the baseline, as a parametrization."""

    def __init__(self, rank: int, out_features: int, in_features: int, gen: torch.Generator) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=√5), PEFT's init of A
        self.A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound, generator=gen))
        self.B = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.B @ self.A


class _Module:
    def __init__(self, model: nn.Module) -> None:
        self.model = model


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    raw = load_digits()
    return torch.tensor(raw.data, dtype=torch.float32) / 16.0, torch.tensor(raw.target)


@functools.cache
def _pretrained_body(seed: int) -> nn.Sequential:
    """Shared by both tests (each adaptation deep-copies it)."""
    x, y = _digits()
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    old = y < 5
    for _ in range(100):
        loss = F.cross_entropy(model(x[old]), y[old])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return body


def _adapt(body: nn.Sequential, method: str, seed: int, x: torch.Tensor, y: torch.Tensor, lr: float, steps: int = 100) -> float:
    torch.manual_seed(10_000 + seed)
    model = nn.Sequential(copy.deepcopy(body), nn.Linear(64, 5))
    if method == "lora":
        gen = torch.Generator().manual_seed(seed)
        model.requires_grad_(False)
        model[1].requires_grad_(True)
        for i in (0, 2):
            parametrize.register_parametrization(model[0][i], "weight", LoRA(4, 64, 64, gen))
    else:
        layers = Layers(types=("Linear",), include=("0.*",), skip_head=False)
        Bone(BoneConfig(variant=method, r=8, layers=layers, trainable=("1.*",))).reparam_setup(module=_Module(model), ctx=None)
    assert trainable_parameters(model) == 1024 + 325
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    new = y >= 5
    for _ in range(steps):
        loss = F.cross_entropy(model(x[new]), y[new] - 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return F.cross_entropy(model(x[new]), y[new] - 5).item()


def _losses(lr: float, methods: tuple[str, ...] = ("lora", "bone", "bat")) -> dict[str, list[float]]:
    x, y = _digits()
    return {m: [_adapt(_pretrained_body(s), m, s, x, y, lr) for s in SEEDS] for m in methods}


def test_at_the_best_learning_rate_lora_fits_faster_than_bat_and_bat_faster_than_bone():
    """lr 0.01 was the best of {1e-3, 3e-3, 1e-2, 3e-2} for all three methods.

    Measured loss after 100 steps (torch 2.14.1, CPU), seeds 0-4:
    LoRA 0.0534 0.0232 0.0347 0.0150 0.0398 (mean 0.033), BAT 0.1174 0.1236 0.0907 0.1171
    0.1492 (mean 0.120), Bone 0.2485 0.2401 0.3072 0.2251 0.3424 (mean 0.273). The paper's
    direction (Bone below LoRA) does not hold here; the test pins what was measured:
    LoRA < BAT < Bone on every seed.
    """
    got = _losses(1e-2)
    assert all(lo < ba < bo for lo, ba, bo in zip(got["lora"], got["bat"], got["bone"], strict=True)), got


@pytest.mark.slow
def test_at_a_small_learning_rate_bat_fits_faster_than_lora():
    """lr 1e-3 (every method far from converged after 100 steps): BAT below LoRA on every seed.

    Measured: LoRA 1.0771 1.0614 1.0191 1.0278 0.8053 (mean 0.998), BAT 0.9380 0.9415 0.9662
    0.9058 0.6479 (mean 0.880). Plain Bone, measured once with this code and not run here:
    0.9764 1.0061 1.0650 0.9976 0.8270 (mean 0.974; below LoRA on 3 of 5 seeds).
    """
    got = _losses(1e-3, ("lora", "bat"))
    assert all(ba < lo for lo, ba in zip(got["lora"], got["bat"], strict=True)), got
