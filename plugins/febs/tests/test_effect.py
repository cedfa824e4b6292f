"""What FEBS does in training, measured: the paper's claimed fairness gain does not show here.

What is tested exactly: an MLP 64-32-10 on the 8×8 digits, where a random 5% of the training
images (half of the validation images) form identity group 1 and are rotated by 90° (see
``_group_digits.py``); 15 epochs of SGD (lr 0.05, momentum 0.9, batch 64) on cross-entropy +
the FEBS Dice term, through the core's ``Hooks``. FEBS with the official γ = 1 against the
same loss with γ = 0 (every group scaled by tanh 1: the Dice term without the fairness
scaling). Metrics: validation worst-group accuracy and ES-Acc (``GroupPerformance``). 5 seeds.

The official formula gives the higher-error group the *smaller* scale w, which in the Dice
gives it a smaller gradient (``test_plugin.py``); here that lowers the rotated group's accuracy
on every seed. The test pins these measured facts so that the method card's figures stay true.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from paperhooks_febs import FEBS, FEBSConfig

SEEDS = range(5)


@pytest.fixture(scope="module")
def experiment():
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        return importlib.import_module("_group_digits")
    finally:
        sys.path.remove(str(Path(__file__).parent))


def _febs(gamma: float) -> list[FEBS]:
    p = FEBS(FEBSConfig(gamma=gamma))
    p.name = "febs"
    return [p]


@pytest.mark.slow
def test_febs_scales_the_rotated_group_down_and_does_not_raise_its_accuracy(experiment):
    uniform = [experiment.train_and_eval(s, _febs(0.0)) for s in SEEDS]
    febs = [experiment.train_and_eval(s, _febs(1.0)) for s in SEEDS]
    # measured (torch 2.14.1, CPU): mean w over training, group 0 / group 1: 0.750 / 0.222
    # (γ = 0: 0.762 both); worst-group accuracy 0.585 → 0.560, lower on every seed;
    # ES-Acc 0.566 → 0.546; overall 0.774 → 0.762.
    assert all(r["w1"] < 0.5 < r["w0"] for r in febs), febs
    worst_u, worst_f = (sum(r["worst"] for r in runs) / len(SEEDS) for runs in (uniform, febs))
    es_u, es_f = (sum(r["es"] for r in runs) / len(SEEDS) for runs in (uniform, febs))
    assert worst_f < worst_u, (worst_f, worst_u)
    assert es_f < es_u, (es_f, es_u)
