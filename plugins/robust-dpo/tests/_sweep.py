"""The β sweep behind the card's table (not a test).

Per seed and β, the effect test's two runs (``recipes/robust-dpo.yaml``: 30 % flipped training
labels, 8 epochs; DPO with ``plugins=[]``, rDPO with ε = 0.3), printing the clean validation
ranking accuracy (``val/reward_acc``), the mean validation margin β·h (``val/reward_margin``) and
the last training ``reward_acc`` (agreement with the noisy labels; 0.70 is the share that is right).

    OMP_NUM_THREADS=1 .venv/bin/python plugins/robust-dpo/tests/_sweep.py 0,1,2 0.1,0.2,0.3,0.5,1,2
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from paperhooks import recipe as R
from paperhooks.run import fit

RECIPE = Path(__file__).parents[3] / "recipes" / "robust-dpo.yaml"


def main(seeds: list[int], betas: list[float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for beta in betas:
            for seed in seeds:
                out = []
                for method, plugins in (("dpo", "plugins=[]"), ("rdpo", "plugins.0.epsilon=0.3")):
                    over = [
                        f"name={method}{seed}", f"seed={seed}", f"run_dir={tmp}/runs", f"objective.beta={beta}",
                        "trainer.enable_progress_bar=false", "trainer.check_val_every_n_epoch=8", plugins,
                    ]  # fmt: skip
                    _, m = fit(R.load(RECIPE, over))
                    out.append(
                        f"{method} val acc {m['val/reward_acc']:.3f} margin {m['val/reward_margin']:.2f} "
                        f"train acc {m['train/reward_acc']:.3f}"
                    )
                print(f"beta {beta} seed {seed}: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    seeds = [int(s) for s in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2").split(",")]
    betas = [
        float(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "0.1,0.2,0.3,0.5,1,2").split(",")
    ]
    main(seeds, betas)
