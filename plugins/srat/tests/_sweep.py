"""The sweep behind the card's "SRAT against reweighting alone" table (not a test).

Four arms on the effect test's experiment (``_at_digits.train_and_eval``: PGD-5 adversarial
training of an MLP on 8×8 digits with a 10:1 long tail, 30 epochs, the switch at epoch 20),
seeds 0-9, every arm with the same data, initial weights, batch order and PGD noise per seed:

- ``uniform``: no plugin;
- ``reweight``: SRAT with ``sep_weight: 0`` (the deferred class weights alone);
- ``srat``: SRAT with its defaults (λ = 1);
- ``srat_l0.3``: SRAT with λ = 0.3.

The paper's claim is that SRAT beats plain reweighting on the rare classes while costing the
frequent ones less; the per-seed differences to ``reweight`` are what the card reports.

Run from the repository root (about 3 min on one core)::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/srat/tests/_sweep.py

``--seeds 10 29 --arms reweight srat_l0.3`` runs other seeds (first and last) and arms; the
card's fresh-seed check of λ = 0.3 (session 10) is that command.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from _at_digits import train_and_eval  # this script's folder is on sys.path

from paperhooks.plugin import Plugin
from paperhooks_srat import SRAT, SRATConfig

SEEDS = range(10)
METRICS = ("tail_robust", "head_robust", "tail_clean", "head_clean")


def _srat(**overrides: float) -> Callable[[], list[Plugin]]:
    def build() -> list[Plugin]:
        plugin = SRAT(SRATConfig(switch_at=20, **overrides))
        plugin.name = "srat"
        return [plugin]

    return build


ARMS: dict[str, Callable[[], list[Plugin]]] = {
    "uniform": list,
    "reweight": _srat(sep_weight=0.0),
    "srat": _srat(),
    "srat_l0.3": _srat(sep_weight=0.3),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs=2, default=[SEEDS[0], SEEDS[-1]])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args()
    seeds = range(args.seeds[0], args.seeds[1] + 1)
    runs = {
        arm: [train_and_eval(seed, ARMS[arm](), epochs=30) for seed in seeds]
        for arm in dict.fromkeys(["reweight", *args.arms])
    }
    print("arm          " + "  ".join(f"{m:>11}" for m in METRICS))
    for arm, rows in runs.items():
        print(
            f"{arm:<12} "
            + "  ".join(f"{sum(r[m] for r in rows) / len(rows):11.3f}" for m in METRICS)
        )
    for arm in [a for a in ("srat", "srat_l0.3") if a in runs]:
        for m in METRICS:
            diff = [a[m] - b[m] for a, b in zip(runs[arm], runs["reweight"], strict=True)]
            wins = sum(d > 0 for d in diff)
            per_seed = ", ".join(f"{d:+.3f}" for d in diff)
            print(
                f"{arm} − reweight, {m}: mean {sum(diff) / len(diff):+.3f}, ahead on {wins}/{len(diff)}: {per_seed}"
            )


if __name__ == "__main__":
    main()
