"""Per-step DPO as pure torch functions (Setlur et al., NeurIPS 2024, arXiv 2406.14532).

The paper's per-step credit assignment on a negative (incorrect) response ŷ = (ŷ_1 … ŷ_L)
of a prompt x, its steps ŷ_i (§5, "Algorithm 1"; equations as in the paper's v1 text,
summarized in ``shared/papers/resolved.md`` §48):

1. Q-values by Monte-Carlo rollouts of a rollout policy π̃ from every step prefix. The paper
   uses π̃ = BoK(π_sft), best-of-K with K = 5: a prefix is worth the success of the best of K
   completions. With ``M`` independent BoK draws::

       Q(x, ŷ_{1:i}) = (1/M) Σ_m max_{k ≤ K} r(x, ŷ_{1:i} ∘ y_{m,k}),   y_{m,k} ~ π̃(· | x, ŷ_{1:i})

   ``Q_0 = V(x)`` (rollouts from the prompt alone), and ``Q_L = r(x, ŷ)`` is the outcome of
   the complete response.
2. Step advantages (Eq. 3; deterministic dynamics: appending a step is the transition)::

       A(x, ŷ_{1:i−1}; ŷ_i) = Q(x, ŷ_{1:i}) − Q(x, ŷ_{1:i−1}),   i = 1 … L

3. The critical step: the "first pit" c, the first step with the lowest Q (``argmin`` over
   ``i = 1 … L``, first occurrence), i.e. where the cumulative advantage
   Σ_{j ≤ i} A_j is lowest.
4. The per-step pair (x, y⁺, ŷ_{1:c}) trained with DPO against π_ref = π_sft::

       L = −log σ( β [log π_θ(y⁺|x) − log π_ref(y⁺|x)] − β [log π_θ(ŷ_{1:c}|x) − log π_ref(ŷ_{1:c}|x)] )

   Theorem 6.1: this has the optimum of advantage-weighted RL,
   max_π E_{y ~ π_sft} Σ_i log π(y_i | x, y_{1:i−1}) · exp(A^{π̃}(x, y_{1:i−1}; y_i) / β).

Rewards are the hidden reward of the task; with ``success_threshold`` τ they become the
paper's binary verifier ``1[r ≥ τ]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

PAD, EOS = 0, 1


def q_values(rewards: torch.Tensor, best_of: int) -> torch.Tensor:
    """Q per prefix from rollout rewards ``[..., M·K]``: the mean over M of the max over K."""
    *lead, n = rewards.shape
    if n % best_of:
        raise ValueError(f"the number of rollouts ({n}) must be a multiple of best_of ({best_of})")
    return rewards.reshape(*lead, n // best_of, best_of).amax(-1).mean(-1)


def step_advantages(q: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``A_i = Q_i − Q_{i−1}``, ``[B, L]`` from ``q`` ``[B, L + 1]`` (``q[:, 0] = V(x)``)."""
    return q[:, 1:] - q[:, :-1]


def first_pit(q: torch.Tensor) -> torch.Tensor:
    """The critical step ``c ∈ 1..L`` (1-based): the first step with the lowest Q.

    ``q``: ``[B, L + 1]`` with ``q[:, 0] = V(x)``, which is not a step and never chosen.
    """
    return q[:, 1:].argmin(1) + 1  # torch.argmin returns the first minimal index


def prefix_mask(
    steps: torch.Tensor, mask: torch.Tensor, c: torch.Tensor, n_steps: int
) -> torch.Tensor:
    """``[B, T]`` mask of the tokens of ŷ_{1:c}: response tokens of steps ``0..c−1`` (0-based).

    The end-of-response token (in ``mask``, step index −1) counts only when ``c = L``, the whole
    response. Prompt and padding never count (``mask`` is 0 there).
    """
    in_prefix = (steps >= 0) & (steps < c[:, None])
    eos = (steps < 0) & (c[:, None] == n_steps)
    return mask * (in_prefix | eos).to(mask.dtype)


def per_step_dpo_loss(
    chosen_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    rejected_token_logps: torch.Tensor,
    ref_rejected_token_logps: torch.Tensor,
    rejected_prefix_mask: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair DPO loss of ``(x, y⁺, ŷ_{1:c})`` ``[B]``: the rejected side summed over the prefix."""
    m = rejected_prefix_mask.to(rejected_token_logps.dtype)
    rej = (rejected_token_logps * m).sum(1)
    ref_rej = (ref_rejected_token_logps * m).sum(1)
    h = (chosen_logps - ref_chosen_logps) - (rej - ref_rej)
    return -F.logsigmoid(beta * h)


def prefix_rollouts(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    steps: torch.Tensor,
    prompt_length: int,
    max_response: int,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete every step prefix of the responses ``ids`` ``[B, T]`` by sampling.

    :param logits_fn: ``ids [N, T] → next-token logits [N, T, V]`` of the rollout policy
        (causal, so tokens after a row's end do not change its logits).
    :param steps: ``[B, T]`` step index of each response token (-1 elsewhere).
    :param uniforms: ``[B, S, R, max_response]`` in [0, 1): rollout ``r`` of prefix ``i``
        (steps ``0..i−1`` kept, ``i = 0 … S−1``) draws its ``g``-th token by inverse CDF at
        ``uniforms[b, i, r, g]``. Drawn per pair, they make a pair's rollouts independent of
        the other pairs of the batch (and so of the number of processes).
    :return: ``(tokens [B, S, R, max_response], content [B, S, R, max_response])``: the
        completed responses (prefix + continuation, PAD after) and 1 on their content tokens.

    Always runs ``max_response`` forwards (no early exit), so every rank calls the policy the
    same number of times.
    """
    b, t = ids.shape
    _, s, r, g_max = uniforms.shape
    i = torch.arange(s, device=ids.device)
    keep = (steps[:, None, :] >= 0) & (steps[:, None, :] < i[None, :, None])  # [B, S, T]
    keep[:, :, :prompt_length] = True
    buf = (
        torch.where(keep, ids[:, None, :], PAD)[:, :, None, :]
        .expand(b, s, r, t)
        .reshape(-1, t)
        .clone()
    )
    n_content = (keep[:, :, prompt_length:]).sum(-1)[:, :, None].expand(b, s, r).reshape(-1).clone()
    u = uniforms.reshape(-1, g_max).to(ids.device)
    done = n_content >= max_response
    rows = torch.arange(buf.shape[0], device=ids.device)
    for g in range(max_response):
        pos = prompt_length + n_content  # next position to write
        logits = logits_fn(buf)[rows, (pos - 1).clamp_max(t - 1)].double()
        logits[:, PAD] = -float("inf")
        cdf = logits.softmax(-1).cumsum(-1)
        tok = (
            torch.searchsorted(cdf, u[:, g : g + 1].double()).squeeze(1).clamp_max(cdf.shape[1] - 1)
        )
        write = ~done & (tok != EOS)
        buf[rows[write], pos[write]] = tok[write]
        n_content = n_content + write.long()
        done = done | (tok == EOS) | (n_content >= max_response)
    tokens = buf[:, prompt_length : prompt_length + max_response]
    content = (tokens >= 2) & (
        torch.arange(max_response, device=ids.device)[None] < n_content[:, None]
    )
    shape = (b, s, r, max_response)
    return torch.where(content, tokens, PAD).reshape(shape), content.reshape(shape).float()


__all__ = [
    "first_pit",
    "per_step_dpo_loss",
    "prefix_mask",
    "prefix_rollouts",
    "q_values",
    "step_advantages",
]
