"""A copying reference for the effect test and the sweep (test code, not a paperhooks plugin).

The closed form (``test_paperhooks_srpo.py::test_at_the_optimum_own_drafts_improve_only_with_a_draft_dependent_reference``)
says that at SRPO's optimum, revisions raise the reward of the generator's own drafts only when the
reference's revision distribution π_ref(y'|x, y) depends on the draft y, as a pretrained LM's does
(it repeats its context). The toy's randomly initialized 1-layer GPT-2 hardly depends on it. A
first stage with :class:`CopySft` teaches the policy to copy; the next stage (SRPO, or DPO) takes that
policy as its reference (a stage's reference is the policy it starts from).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch

from paperhooks import Plugin
from paperhooks.plugin import hookimpl

NAME = "srpo-copy-stage"


class CopySft(Plugin):
    """−log π(y | row of y) for y = y_w and y = y_l: learn to repeat the context's response."""

    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    strategies: ClassVar[dict[str, str]] = {"single": "tested"}

    @hookimpl
    def objective_terms(self, module, batch, outputs, ctx):
        from paperhooks_srpo import functional as F

        L = F.prompt_length_of(batch["chosen_mask"])
        total = torch.zeros(batch["chosen_ids"].shape[0])
        for side in ("chosen", "rejected"):
            ids, attention, mask = F.revision_sequences(
                batch[f"{side}_ids"], batch[f"{side}_attention"], batch[f"{side}_ids"],
                batch[f"{side}_attention"], batch[f"{side}_mask"].float(), L,
            )  # fmt: skip
            total = total - (module(ids, attention) * mask).sum(1)
        return {"loss": total}


def register(site: Path) -> Path:
    """Make ``site`` hold a distribution whose entry point ``copy-sft`` is :class:`CopySft`; put
    ``site`` and this folder on ``sys.path`` to use it."""
    info = site / "srpo_copy_stage-0.0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {NAME}\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[paperhooks]\ncopy-sft = srpo_copy_stage:CopySft\n")
    return site


def stages(arm: str, copy_epochs: int) -> str:
    """The ``stages`` override: copy for ``copy_epochs`` epochs, then ``srpo`` (the recipe's
    plugin entry) or ``dpo`` (no plugin) with the recipe's trainer settings."""
    plugins = "[]" if arm == "dpo" else "[{name: srpo, alpha: 0.8, preference_prob: 1.0}]"
    return (
        f"stages=[{{name: copy, trainer: {{max_epochs: {copy_epochs}}}, plugins: [{{name: copy-sft}}]}}, "
        f"{{name: {arm}, plugins: {plugins}}}]"
    )


@torch.no_grad()
def copy_logratio(built, policy, seed: int) -> float:
    """Mean, over one sampled draft y per validation prompt, of log π(y | x, y) − log π(y | x): how
    much the policy's revision distribution favours repeating the draft (0: it ignores it)."""
    from paperhooks.tasks.preference import sample
    from paperhooks.tasks.sampler import generator
    from paperhooks_srpo import functional as F

    dm = built.datamodule
    rows = dm.val_set.tensors
    L, W = dm.prompt_length, rows["chosen_ids"].shape[1]
    prompts = rows["chosen_ids"][:, :L]
    tokens, lengths = sample(policy, prompts, W - L - 1, generator(seed, "srpo.copy"))
    ids, attention = F.response_rows(prompts, tokens, lengths, W)
    mask = (attention.bool() & (torch.arange(W)[None] >= L)).float()
    plain = (policy(ids, attention) * mask).sum(1)
    r_ids, r_attention, r_mask = F.revision_sequences(ids, attention, ids, attention, mask, L)
    return float(((policy(r_ids, r_attention) * r_mask).sum(1) - plain).mean())
