"""The effect SRAT is for, in direction: better accuracy on the rare classes than uniform weights.

What is tested exactly: PGD-5 adversarial training (ε = 0.1, step 0.025, random start) of an
MLP 64-64-64-10 on the 8×8 digits with a 10:1 long tail (``DigitsConfig(imbalance=10)``),
30 epochs of SGD (lr 0.05, momentum 0.9, batch 64), through the core's ``Hooks`` exactly as
``HookedModule`` runs a step. SRAT: the defaults with the switch at epoch 20 (2/3 of training,
DRW's 160/200 ratio). Uniform: no plugin. Metric: mean per-class accuracy over the rare half
(classes 5-9) of the balanced validation set, clean and under PGD-10. 5 seeds.

This checks the plugin's direction against uniform training only. The paper's own claim, a gain
over plain reweighting, does not show with the defaults (10 seeds, ``_sweep.py``; see the card).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from paperhooks_srat import SRAT, SRATConfig

SEEDS = range(5)


@pytest.fixture(scope="module")
def experiment():
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        return importlib.import_module("_at_digits")
    finally:
        sys.path.remove(str(Path(__file__).parent))


@pytest.mark.slow
def test_srat_raises_tail_accuracy_over_uniform_adversarial_training(experiment):
    def srat():
        p = SRAT(SRATConfig(switch_at=20))
        p.name = "srat"
        return [p]

    uniform = [experiment.train_and_eval(s, [], epochs=30) for s in SEEDS]
    treated = [experiment.train_and_eval(s, srat(), epochs=30) for s in SEEDS]
    gain_robust = [
        t["tail_robust"] - u["tail_robust"] for t, u in zip(treated, uniform, strict=True)
    ]
    gain_clean = [t["tail_clean"] - u["tail_clean"] for t, u in zip(treated, uniform, strict=True)]
    # measured (torch 2.14.1, CPU): tail robust 0.575 → 0.694 (+0.119; per seed +0.019 … +0.218),
    # tail clean 0.858 → 0.912 (+0.054; one seed −0.005). Asserted with margin: robust +0.06 on
    # the mean and better on at least 4 of 5 seeds; clean +0.02 on the mean.
    assert sum(gain_robust) / len(SEEDS) > 0.06, gain_robust
    assert sum(g > 0 for g in gain_robust) >= 4, gain_robust
    assert sum(gain_clean) / len(SEEDS) > 0.02, gain_clean
