"""Sparsity of the learned mask and sample reward against the learning rate (not a test).

Per seed, ``recipes/sparse-po.yaml`` (learned common mask) and its DPO baseline (``plugins=[]``) at
the given Adam learning rate and epochs. Printed: the mean hidden reward of 256 sampled validation
responses, and for SparsePO the mask on the response tokens of the 256 validation pairs (chosen and
rejected), the official code's sparsity measure (share exactly 0), the share below 0.1 and the mean.

    OMP_NUM_THREADS=1 .venv/bin/python plugins/sparse-po/tests/_sweep.py 0,1,2 --lr 1e-4 --epochs 6
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from paperhooks import recipe as R
from paperhooks.preference import pair_inputs
from paperhooks.run import fit
from paperhooks_sparse_po import SparsePo

RECIPE = Path(__file__).parents[3] / "recipes" / "sparse-po.yaml"


@torch.no_grad()
def mask_stats(built) -> tuple[float, float, float]:
    """(share of response-token mask values exactly 0, share below 0.1, mean) on the validation pairs."""
    module = built.module.eval()
    plugin = next(p for p in module.plugins if isinstance(p, SparsePo))
    rows = built.datamodule.val_set.tensors
    ids, attention, response = pair_inputs(rows)
    ref = module.reference_model.lm(
        input_ids=ids, attention_mask=attention, output_hidden_states=True, use_cache=False
    )
    m, _ = plugin.masks(module, ref.hidden_states[1:], response)
    on = response.bool()
    values = m[on]
    return (
        float((values == 0).float().mean()),
        float((values < 0.1).float().mean()),
        float(values.mean()),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--arms", default="dpo,sparse-po")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = []
            for arm in a.arms.split(","):
                over = [
                    f"name={arm}{seed}", f"seed={seed}", f"run_dir={tmp}/runs", "trainer.enable_progress_bar=false",
                    "objective.eval_samples=0", f"trainer.max_epochs={a.epochs}", "trainer.limit_val_batches=0",
                    f"optimizer.lr={a.lr}", "plugins=[]" if arm == "dpo" else "plugins.0.mask=learned",
                ]  # fmt: skip
                built, _ = fit(R.load(RECIPE, over))
                built.module.eval()
                reward = built.module.sample_eval(256)[0]
                stats = (
                    ""
                    if arm == "dpo"
                    else " mask zeros {:.1%} <0.1 {:.1%} mean {:.3f}".format(*mask_stats(built))
                )
                out.append(f"{arm} reward {reward:.3f}{stats}")
            print(f"seed {seed} lr {a.lr} epochs {a.epochs}: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
