"""The ``per-step-dpo`` plugin: MC step advantages, the first pit, DPO on (y⁺, ŷ_{1:c}); replaces DPO."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_per_step_dpo import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "per-step-dpo"

BIBTEX = """\
@inproceedings{setlur2024rl,
  title     = {{RL} on Incorrect Synthetic Data Scales the Efficiency of {LLM} Math Reasoning by Eight-Fold},
  author    = {Setlur, Amrith and Garg, Saurabh and Geng, Xinyang and Garg, Naman and Smith, Virginia and
               Kumar, Aviral},
  booktitle = {Advances in Neural Information Processing Systems (NeurIPS)},
  year      = {2024},
  eprint    = {2406.14532},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2406.14532}
}"""


@dataclass(frozen=True)
class PerStepDpoConfig:
    """Hyper-parameters; β is the recipe's ``objective.beta`` (shared with DPO).

    :ivar best_of: K of the rollout policy π̃ = BoK(π_sft): a prefix is worth the best of K
        completions (the paper: K = 5).
    :ivar rollouts: M, independent BoK draws averaged per prefix (not given in the paper; 1).
    :ivar rollout_policy: ``reference`` (π_sft, the frozen reference, as in the paper) or
        ``policy`` (the current policy, no gradient: on-policy advantages).
    :ivar success_threshold: τ: rewards become the paper's binary verifier ``1[r ≥ τ]``;
        ``None`` keeps the hidden reward itself (continuous Q). Pairs whose rejected response
        succeeds are not negatives in the paper's sense and keep the whole response (c = L).
    """

    best_of: int = 5
    rollouts: int = 1
    rollout_policy: Literal["reference", "policy"] = "reference"
    success_threshold: float | None = None

    def __post_init__(self) -> None:
        for f in ("best_of", "rollouts"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"PerStepDpoConfig.{f} must be an integer >= 1, got {v!r}")
        if self.rollout_policy not in ("reference", "policy"):
            raise ValueError(
                f"PerStepDpoConfig.rollout_policy must be 'reference' or 'policy', got {self.rollout_policy!r}"
            )
        t = self.success_threshold
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t)
        ):
            raise ValueError(
                f"PerStepDpoConfig.success_threshold must be a finite number or null, got {t!r}"
            )


class PerStepDpo(Plugin):
    """Per-step DPO (Setlur et al., NeurIPS 2024, §5 and Theorem 6.1): replaces DPO's loss.

    Each step, for every pair: Q of every step prefix of the rejected (negative) response by
    Monte-Carlo rollouts of π̃ = BoK(rollout policy), scored by the task's hidden reward; the
    step advantages (Eq. 3); the first pit c; DPO on (x, y⁺, ŷ_{1:c}) with π_ref = π_sft.

    The rollouts of a pair draw their uniforms from
    ``step_generator(seed, step, "per-step-dpo/<index>")``: a pair's advantages depend on its
    dataset index and the step only, never on the rank or the other pairs of the batch, so N
    processes compute what 1 process computes on the global batch, and a resumed run redraws
    the same rollouts. The loss is per pair; the core averages it over the global batch.
    """

    Config = PerStepDpoConfig
    name = NAME
    family: ClassVar[str] = "objective"
    tasks: ClassVar[tuple[str, ...]] = ("preference",)
    replaces_task_loss: ClassVar[bool] = True
    paper: ClassVar[Paper] = Paper(
        title="RL on Incorrect Synthetic Data Scales the Efficiency of LLM Math Reasoning by Eight-Fold",
        authors=(
            "Amrith Setlur",
            "Saurabh Garg",
            "Xinyang Geng",
            "Naman Garg",
            "Virginia Smith",
            "Aviral Kumar",
        ),
        year=2024,
        venue="NeurIPS 2024",
        arxiv="2406.14532",
        bibtex=BIBTEX,
        code="https://github.com/ars22/scaling-LLM-math-synthetic-data",
        checked_against=(
            "shared/papers/resolved.md §48, a detailed secondary excerpt of the paper's v1 (§4, §6.1, Algorithm 1, "
            "Eq. 3, Theorem 6.1, Fig. 7): π̃ = BoK(π_sft) with K = 5, first pit = first step with the lowest Q, "
            "DPO on (y⁺, ŷ_{1:c}) with π_ref = π_sft; the official repository holds only a README; the arXiv "
            "text itself was not readable beyond its front matter and abstract in two searches (β, the number "
            "of rollouts, the choice of y⁺ and the loss as written remain unverified)"
        ),
        verified=False,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: PerStepDpoConfig

    def __init__(self, config: PerStepDpoConfig | None = None) -> None:
        super().__init__(config)
        #: ``(topic, tokens, content) → rewards``; default: the datamodule's hidden reward
        self.reward_fn: Any = None

    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        if getattr(module, "reference_model", None) is None:
            raise ValueError(
                f"{NAME}: needs objective.reference 'model' (per-token reference log-probs of the "
                "rejected prefix, and π_sft for the rollouts)"
            )

    def _reward(self, module: Any) -> Any:
        if self.reward_fn is not None:
            return self.reward_fn
        dm = getattr(getattr(module, "_trainer", None), "datamodule", None)
        if dm is None or not hasattr(dm, "hidden_reward"):
            raise ValueError(
                f"{NAME}: needs a preference datamodule with hidden_reward (data synthetic-preferences)"
            )
        return dm.hidden_reward

    @torch.no_grad()
    def advantages(
        self, module: Any, batch: Mapping[str, torch.Tensor], ctx: StepContext
    ) -> dict[str, torch.Tensor]:
        """``q`` ``[B, L + 1]`` (``q[:, 0] = V(x)``, ``q[:, L] = r(x, ŷ)``), ``advantages``
        ``[B, L]`` (Eq. 3) and the first pit ``c`` ``[B]`` (1-based) of every rejected response."""
        c = self.config
        steps = batch["rejected_steps"]
        n_steps = int(steps.max()) + 1
        if n_steps < 1:
            raise ValueError(
                f"{NAME}: the responses have no steps (data.steps: 0); set data.steps >= 1"
            )
        ids = batch["rejected_ids"]
        prompt_length = int((batch["rejected_mask"][0] == 0).long().cumprod(0).sum())
        max_response = ids.shape[1] - prompt_length - 1
        policy = module.reference_model if c.rollout_policy == "reference" else module.model
        lm = getattr(policy, "lm", None)
        if lm is None:
            raise ValueError(
                f"{NAME}: rollouts need a causal-LM policy (model causal-lm); got {type(policy).__name__}"
            )
        r = c.rollouts * c.best_of
        u = torch.stack(
            [
                torch.rand(n_steps, r, max_response, generator=ctx.generator(f"{NAME}/{i}"))
                for i in batch["index"].tolist()
            ]
        )
        was_training = policy.training
        policy.eval()
        try:
            tokens, content = F.prefix_rollouts(
                lambda x: lm(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False).logits,
                ids, steps, prompt_length, max_response, u,
            )  # fmt: skip
        finally:
            policy.train(was_training)
        reward = self._reward(module)
        b, n = ids.shape[0], ids.shape[0] * n_steps * r
        topic = batch["prompt"].to(ids.device)
        rew = reward(
            topic[:, None, None].expand(b, n_steps, r).reshape(-1),
            tokens.reshape(n, -1),
            content.reshape(n, -1),
        )
        rew = rew.reshape(b, n_steps, r)
        resp = slice(prompt_length, prompt_length + max_response)
        own = reward(
            topic, ids[:, resp], (steps[:, resp] >= 0).float()
        )  # r(x, ŷ): Q of the whole response
        if c.success_threshold is not None:
            rew = (rew >= c.success_threshold).float()
            own = (own >= c.success_threshold).float()
        q = torch.cat([F.q_values(rew, c.best_of), own[:, None]], 1)  # [B, L + 1]
        crit = F.first_pit(q)
        if c.success_threshold is not None:
            crit = torch.where(own > 0, n_steps, crit)  # a correct "negative": the whole response
        return {"q": q, "advantages": F.step_advantages(q), "c": crit}

    @hookimpl
    def objective_terms(
        self,
        module: Any,
        batch: Mapping[str, torch.Tensor],
        outputs: Mapping[str, torch.Tensor],
        ctx: StepContext,
    ) -> Mapping[str, torch.Tensor] | None:
        """``{"loss": −log σ(β h_c)}`` per pair, ``h_c`` the log-ratio margin of y⁺ against ŷ_{1:c}."""
        if "ref_rejected_token_logps" not in outputs or "rejected_steps" not in batch:
            raise ValueError(
                f"{NAME}: needs a preference task with step boundaries and objective.reference 'model' "
                f"(outputs with ref_rejected_token_logps, batch with rejected_steps); got outputs {sorted(outputs)}"
            )
        est = self.advantages(module, batch, ctx)
        n_steps = est["advantages"].shape[1]
        mask = F.prefix_mask(batch["rejected_steps"], outputs["rejected_mask"], est["c"], n_steps)
        loss = F.per_step_dpo_loss(
            outputs["chosen_logps"], outputs["ref_chosen_logps"], outputs["rejected_token_logps"],
            outputs["ref_rejected_token_logps"], mask, module.objective.beta,
        )  # fmt: skip
        a_c = est["advantages"].gather(1, (est["c"] - 1)[:, None]).squeeze(1)
        ctx.log(f"{NAME}/critical_step", est["c"].float().mean())
        ctx.log(f"{NAME}/truncated", (est["c"] < n_steps).float().mean())
        ctx.log(f"{NAME}/pit_advantage", a_c.mean())
        return {"loss": loss}
