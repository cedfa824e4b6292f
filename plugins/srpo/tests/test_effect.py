"""The paper's effect (its Fig. 3): revisions sampled from the trained policy, conditioned on a
previous response, have a higher hidden reward than what they revise. With the recipe as it is, it
shows for weak drafts (the reference's), not for the policy's own drafts; once the reference can
copy its context (a first stage, ``srpo_copy_stage``), it shows for the policy's own drafts too, as
the closed form says (``test_paperhooks_srpo.py``). See the tests' docstrings and the card.

``recipes/srpo.yaml``: a 1-layer GPT-2 (width 32, 16 positions) on 1024 synthetic pairs, Adam 3e-3,
batch 64, 4 epochs, β = 0.05; DPO is the same recipe with ``plugins=[]`` (same seed: same initial policy,
reference, data order). Each trained policy samples 4 drafts y ∼ π(·|x) for each of the 256
validation prompts, then revises them twice, y' ∼ π(·|x, y) (:func:`paperhooks_srpo.revise`,
one generator for everything, seeded). Numbers: the method card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.tasks.preference import sample
from paperhooks.tasks.sampler import generator
from paperhooks_srpo import response_rows, revise

RECIPE = Path(__file__).parents[3] / "recipes" / "srpo.yaml"
SEEDS = (0, 1, 2)
REPS = 4


def _per_sample_rewards(built, policy, reviser, seed: int) -> list[torch.Tensor]:
    """Hidden reward of each draft from ``policy``, then of two successive revisions by ``reviser``."""
    dm = built.datamodule
    rows = dm.val_set.tensors
    L, W = dm.prompt_length, rows["chosen_ids"].shape[1]
    prompts = rows["chosen_ids"][:, :L].repeat(REPS, 1)
    topic = rows["prompt"].repeat(REPS)
    g = generator(seed, "srpo.effect")
    tokens, lengths = sample(policy, prompts, W - L - 1, g)
    out = [dm.hidden_reward(topic, tokens, (tokens >= 2).float())]
    ids, attention = response_rows(prompts, tokens, lengths, W)
    for _ in range(2):
        ids, attention, tokens, _ = revise(reviser, ids, g, prompt_length=L, attention=attention)
        out.append(dm.hidden_reward(topic, tokens, (tokens >= 2).float()))
    return out


def _rewards(built, policy, reviser, seed: int) -> list[float]:
    """Mean hidden reward of drafts from ``policy``, then of two successive revisions by ``reviser``."""
    return [r.mean().item() for r in _per_sample_rewards(built, policy, reviser, seed)]


def _train(tmp_path: Path, seed: int, *over: str):
    built, _ = fit(R.load(RECIPE, [f"seed={seed}", f"name=s{seed}", f"run_dir={tmp_path}", "trainer.enable_progress_bar=false",
                                   "trainer.limit_val_batches=0", *over]))  # fmt: skip
    built.module.eval()
    return built


def test_revisions_lift_weak_drafts_but_not_the_policys_own(tmp_path):
    """Measured (seeds 0, 1, 2; draft → 1st → 2nd revision, mean hidden reward of 1024 samples):

    - SRPO revising the reference's drafts: −0.120 → 0.738 → 0.745, 0.064 → 0.777 → 0.786,
      −0.010 → 0.603 → 0.625: a large gain (asserted per seed: > +0.3; it held on all 10 seeds
      of ``_sweep.py``, the smallest +0.31);
    - SRPO revising its own drafts: 0.697 → 0.729 → 0.747, 0.766 → 0.783 → 0.788,
      0.614 → 0.596 → 0.625. **The paper's effect (its Fig. 3: revisions improve the policy's
      own generations) does not show**: on 10 seeds (``_sweep.py``) the mean gain is +0.002
      after one revision and +0.002 after two, per seed from −0.081 to +0.050 (paired standard
      errors 0.013–0.026). Seeds 0–2 happen to average +0.010 / +0.028; an earlier version of
      this test asserted that mean > 0 and a per-seed loss < 0.05, which seed 5 (−0.081) breaks.
      Asserted now, per seed, what held on all 10: a revision moves the reward by less than 0.1
      either way (no gain, and no collapse like DPO's);
    - DPO's policy used the same way (never trained to revise): 0.576 → 0.110, 0.810 → 0.409,
      0.759 → 0.474: its "revisions" lose on every seed (asserted; 10 of 10 seeds).

    The reviser ends near the same reward whatever it revises (own or the reference's drafts,
    within 0.05 on all 10 seeds): on this toy it learned which tokens are good for the topic,
    not how to use the draft.
    """
    fmt = lambda v: " → ".join(f"{x:.3f}" for x in v)  # noqa: E731
    for seed in SEEDS:
        with torch.no_grad():
            srpo = _train(tmp_path / "srpo", seed)
            m = srpo.module
            own = _rewards(srpo, m.model, m.model, seed)
            of_ref = _rewards(srpo, m.reference_model, m.model, seed)
            dpo = _train(tmp_path / "dpo", seed, "plugins=[]")
            d = dpo.module
            dpo_own = _rewards(dpo, d.model, d.model, seed)
            dpo_ref = _rewards(dpo, d.reference_model, d.model, seed)
        print(f"seed {seed}: SRPO own {fmt(own)} | SRPO on reference drafts {fmt(of_ref)} | "
              f"DPO own {fmt(dpo_own)} | DPO on reference drafts {fmt(dpo_ref)}")  # fmt: skip
        assert of_ref[1] > of_ref[0] + 0.3 and of_ref[2] > of_ref[0] + 0.3, (seed, of_ref)
        assert abs(own[1] - own[0]) < 0.1 and abs(own[2] - own[0]) < 0.1, (seed, own)
        assert dpo_own[1] < dpo_own[0] and dpo_own[2] < dpo_own[0], (seed, dpo_own)


COPY_EPOCHS = 8


def _train_after_copying(tmp_path: Path, seed: int, arm: str = "srpo"):
    """``recipes/srpo.yaml`` as two stages: ``copy-sft`` for ``COPY_EPOCHS`` epochs, then SRPO (or DPO)
    with the copying policy as its reference (``srpo_copy_stage``)."""
    from srpo_copy_stage import stages

    return _train(tmp_path / f"copy-{arm}", seed, stages(arm, COPY_EPOCHS))


def test_with_a_copying_reference_revisions_improve_the_policys_own_drafts(tmp_path, monkeypatch):
    """The paper's effect (its Fig. 3: each revision of the policy's own generation is better) on the
    toy, once the reference can copy its context, as the closed form says it must
    (``test_paperhooks_srpo.py::test_at_the_optimum_own_drafts_improve_only_with_a_draft_dependent_reference``).

    Measured (seeds 0, 1, 2; mean hidden reward of 1024 samples, draft → 1st → 2nd revision, gains
    ± paired standard errors): 0.023 → 0.081 → 0.125 (+0.057 ± 0.006, +0.102 ± 0.008),
    0.340 → 0.380 → 0.407 (+0.040 ± 0.007, +0.067 ± 0.010), 0.306 → 0.392 → 0.439 (+0.085 ± 0.005,
    +0.133 ± 0.006). The reference's copy log-ratio log π_ref(y|x, y) − log π_ref(y|x) is
    +13.0 / +10.5 / +14.1 (about 0 without the copy stage). Seeds 3–14 (``_sweep.py --copy-epochs
    8``): a 1st-revision gain on 12 of 15 seeds by 2 standard errors or more, no loss that large.
    The cost: SRPO's drafts are weaker than without the copy stage (the card).

    Asserted: the reference copies (log-ratio > 5 on every seed); over seeds 0–2, the 1st revision
    gains more than 0.03 on average and the 2nd more than the 1st; no seed loses more than 0.02.
    """
    here = Path(__file__).parent
    monkeypatch.syspath_prepend(str(here))
    from srpo_copy_stage import copy_logratio, register

    monkeypatch.syspath_prepend(str(register(tmp_path / "site")))
    gains = []
    for seed in SEEDS:
        built = _train_after_copying(tmp_path, seed)
        m = built.module
        with torch.no_grad():
            own = _rewards(built, m.model, m.model, seed)
        ratio = copy_logratio(built, m.reference_model, seed)
        print(f"seed {seed}: copy log-ratio of the reference {ratio:+.2f} | SRPO own drafts "
              + " → ".join(f"{x:.3f}" for x in own))  # fmt: skip
        assert ratio > 5, (seed, ratio)
        assert own[1] - own[0] > -0.02, (seed, own)
        gains.append((own[1] - own[0], own[2] - own[0]))
    first, second = (sum(g[i] for g in gains) / len(gains) for i in (0, 1))
    assert first > 0.03 and second > first, gains
