"""The paper's effect, in direction: LN-DPO samples shorter responses than DPO at equal β.

Length-biased synthetic preferences (``length_bias`` 1.0: the chosen response is the one with
the larger ``reward + 1.0·length``, so chosen responses are longer than their hidden reward
warrants), a 1-layer GPT-2 (width 32), Adam 1e-3, batch 64, 40 steps, β = 0.1 for both.
The same seed gives both runs the same initial policy, reference, data order and sampling
stream; ``sample_eval`` samples 128 validation prompts. Numbers: the method card.
"""

from __future__ import annotations

from pathlib import Path

from paperhooks import recipe as R
from paperhooks.run import fit

RECIPE = Path(__file__).parents[3] / "recipes" / "ln-dpo.yaml"
SEEDS = (0, 1, 2)


def _lengths(tmp_path: Path, seed: int, plugins: str) -> tuple[float, float, float]:
    built, _ = fit(
        R.load(
            RECIPE,
            [
                f"seed={seed}",
                f"name=s{seed}",
                f"run_dir={tmp_path}",
                "trainer.limit_val_batches=0",
                "objective.eval_samples=0",
                f"plugins={plugins}",
            ],
        )  # fmt: skip
    )
    m = built.module
    _, ref_len = m.sample_eval(128, policy=m.reference_model)
    reward, length = m.sample_eval(128)
    return ref_len, length, reward


def test_ln_dpo_samples_shorter_responses_than_dpo(tmp_path):
    gaps = []
    for seed in SEEDS:
        ref, dpo, dpo_reward = _lengths(tmp_path / "dpo", seed, "[]")
        _, ln, ln_reward = _lengths(tmp_path / "ln", seed, "[{name: ln-dpo}]")
        print(
            f"seed {seed}: reference {ref:.2f}  DPO {dpo:.2f} (reward {dpo_reward:.3f})  LN-DPO {ln:.2f} (reward {ln_reward:.3f})"
        )
        assert ln < dpo - 0.5, (seed, dpo, ln)
        gaps.append(dpo - ln)
    assert sum(gaps) / len(gaps) > 1.0, gaps
