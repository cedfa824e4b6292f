"""The sweep behind the card's 10-seed table (not a test).

Per seed, the effect test's runs (``test_effect._train``: ``recipes/srpo.yaml``, DPO with
``plugins=[]``) and its sampling (4 drafts for each of the 256 validation prompts, then two
revisions, one seeded generator). This script also prints each own-draft gain's paired standard
error over the 1024 samples.

Run from the repository root (about 30–60 s per seed on one shared core)::

    OMP_NUM_THREADS=1 .venv/bin/python plugins/srpo/tests/_sweep.py 0,1,2,3,4,5,6,7,8,9
    OMP_NUM_THREADS=1 .venv/bin/python plugins/srpo/tests/_sweep.py 0,1,2 --copy-epochs 8
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from srpo_copy_stage import copy_logratio, register, stages
from test_effect import _per_sample_rewards as per_sample  # this script's folder is on sys.path
from test_effect import _train


def main(seeds: list[int], copy_epochs: int = 0) -> None:
    """With ``copy_epochs`` > 0 both arms train after a copy stage of that many epochs
    (``srpo_copy_stage``), and the reference's copy log-ratio is printed too."""
    fmt = lambda r: " → ".join(f"{x.mean():.3f}" for x in r)  # noqa: E731
    se = lambda d: d.std().item() / math.sqrt(d.numel())  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        over = {"srpo": [], "dpo": ["plugins=[]"]}
        if copy_epochs:
            site = register(Path(tmp) / "site")
            sys.path.insert(0, str(site))
            over = {arm: [stages(arm, copy_epochs)] for arm in over}
        for seed in seeds:
            srpo = _train(Path(tmp) / "srpo", seed, *over["srpo"])
            m = srpo.module
            own = per_sample(srpo, m.model, m.model, seed)
            of_ref = per_sample(srpo, m.reference_model, m.model, seed)
            dpo = _train(Path(tmp) / "dpo", seed, *over["dpo"])
            d = dpo.module
            dpo_own = per_sample(dpo, d.model, d.model, seed)
            g1, g2 = own[1] - own[0], own[2] - own[0]
            copying = (
                f" | reference copy log-ratio {copy_logratio(srpo, m.reference_model, seed):+.2f}"
                if copy_epochs
                else ""
            )
            print(
                f"seed {seed}: SRPO own {fmt(own)} (gains {g1.mean():+.3f} ± {se(g1):.3f}, {g2.mean():+.3f} ± {se(g2):.3f}) | "
                f"SRPO on reference drafts {fmt(of_ref)} | DPO own {fmt(dpo_own)}{copying}",
                flush=True,
            )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds", nargs="?", default="0,1,2,3,4,5,6,7,8,9")
    ap.add_argument("--copy-epochs", type=int, default=0, help="train after a copy stage (0: none)")
    a = ap.parse_args()
    main([int(s) for s in a.seeds.split(",")], a.copy_epochs)
