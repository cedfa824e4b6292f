"""Seeds and settings of the chain task beyond the test (not a test): the card's figures.

Per seed, the test's fits (``chain_run``: a 1-layer GPT-2, Adam 3e-3, β = 0.1, K = 5, M = 1) for
three arms with the same data, order and initial policy:

- ``dpo``: plain DPO (``plugins: []``);
- ``psd``: per-step DPO, truncating the rejected response at the first pit c;
- ``random``: the same, with c replaced by a step drawn uniformly from 1..4 (seeded), which
  keeps the truncation and drops the credit assignment.

It prints the success rate of 256 sampled validation responses, P(invalid step | valid prefix)
(``pit``, lower is better) and P(EOS | a whole valid chain) (``eos``). ``--tail valid`` makes
the rejected responses' steps after the pit valid again (``chain_tail: valid``), so that DPO on
the whole rejected response pushes down valid steps, the paper's case for per-step credit.

    OMP_NUM_THREADS=1 .venv/bin/python plugins/per-step-dpo/tests/_sweep.py 0,1,2 --tail valid --steps 64
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from test_paperhooks_per_step_dpo import (
    CHAIN_CFG,
    chain_metrics,
    chain_run,
    random_pits,
)  # this folder is on sys.path

from paperhooks_per_step_dpo import PerStepDpo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("seeds")
    ap.add_argument("--tail", default="uniform", choices=("uniform", "valid"))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--arms", default="dpo,psd,random")
    a = ap.parse_args()
    torch.set_num_threads(1)
    psd = [{"name": "per-step-dpo", **CHAIN_CFG}]
    with tempfile.TemporaryDirectory() as tmp:
        for seed in [int(s) for s in a.seeds.split(",")]:
            out = []
            for arm in a.arms.split(","):
                original = PerStepDpo.advantages
                if arm == "random":
                    PerStepDpo.advantages = random_pits(seed)
                try:
                    built = chain_run(Path(tmp), seed, arm, [] if arm == "dpo" else psd,
                                      max_steps=a.steps, chain_tail=a.tail)  # fmt: skip
                finally:
                    PerStepDpo.advantages = original
                success, pit, eos = chain_metrics(built)
                out.append(f"{arm} success {success:.3f} pit {pit:.3f} eos {eos:.3f}")
            print(f"seed {seed} tail {a.tail} steps {a.steps}: " + " | ".join(out), flush=True)


if __name__ == "__main__":
    main()
