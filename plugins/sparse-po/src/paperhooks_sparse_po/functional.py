"""SparsePO as pure torch functions (Christopoulou, Cardenas, Lampouras, Bou-Ammar, Wang;
Findings of EMNLP 2025, arXiv 2410.05102).

SparsePO weights every response token's contribution to DPO's implicit reward and to a
token-level KL term with masks ``m^u`` (reward) and ``m^d`` (KL). For a pair ``(x, y_w, y_l)``
and response tokens ``t`` (never the prompt, never padding)::

    r_t  = log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)                  token reward
    k_t  = Σ_v π_ref(v | x, y_<t) [log π_θ(v | x, y_<t) − log π_ref(v | x, y_<t)]
         = −KL(π_ref(·|x,y_<t) ‖ π_θ(·|x,y_<t))                               token KL term
    u    = Σ_t m^u_t(y_w) r_t(y_w) − Σ_t m^u_t(y_l) r_t(y_l)
    d    = Σ_t m^d_t(y_w) k_t(y_w) − Σ_t m^d_t(y_l) k_t(y_l)
    L    = −log σ(β (u − d)) + λ_u (‖m^u(y_w)‖₁ + ‖m^u(y_l)‖₁) + λ_d (‖m^d(y_w)‖₁ + ‖m^d(y_l)‖₁)

as in the official code (huawei-noah/HEBO ``SparsePO/src/trainers/sparse_trainer.py``,
``get_batch_loss_metrics``: ``losses = -F.logsigmoid(self.beta * (u - d))`` plus the L1 norms of
the masks over the loss mask). With one *common* mask for reward and KL the code halves
``λ_u`` and ``λ_d`` (the norm would otherwise count twice). ``m^u ≡ 1, m^d ≡ 0`` is DPO.

Masks (one value per response token, computed from the reference model's forward, so the
mask of token ``t`` comes from the state at ``t − 1`` that predicts it, as the code's
``[:, :-1]`` alignment with the shifted logits):

- *learned* (``mask_model: simple_all``, ``src/masks/mask_models.py::SimpleMaskAllLayers``):
  per layer ``ℓ`` ``a_ℓ = Dropout(ReLU(w_ℓ · LayerNorm(h_ℓ) + b_ℓ))`` (one LayerNorm shared
  by the layers), then ``m = Dropout(ReLU(Σ_ℓ c_ℓ a_ℓ))`` (a bias-free mixer), trained with
  the policy by the same loss; ``h_ℓ`` are the reference's hidden states of every layer.
- *derived* (the code's MaPO trainer, ``activation_mapping: zn_rescale``): per layer the
  activation's mean over the hidden size, z-normalized over the response tokens, rescaled to
  ``[0, 1]`` by min-max per sequence, then averaged over layers; no parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def token_kl_terms(policy_logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """``k_t = Σ_v π_ref(v) (log π_θ(v) − log π_ref(v))`` (≤ 0) per token, ``[N, T]``.

    ``*_logits`` ``[N, T, V]`` are next-token logits (position ``t`` predicts ``t + 1``); the
    result is aligned with the per-token log-probabilities of the core (position ``t`` holds
    the term of token ``t``, position 0 holds 0).
    """
    lp = policy_logits[:, :-1].float().log_softmax(-1)
    lr = ref_logits[:, :-1].float().log_softmax(-1)
    k = (lr.exp() * (lp - lr)).sum(-1)
    return F.pad(k, (1, 0))


def sparse_po_loss(
    token_reward_w: torch.Tensor,
    token_reward_l: torch.Tensor,
    token_kl_w: torch.Tensor,
    token_kl_l: torch.Tensor,
    response_w: torch.Tensor,
    response_l: torch.Tensor,
    mu_w: torch.Tensor,
    mu_l: torch.Tensor,
    md_w: torch.Tensor,
    md_l: torch.Tensor,
    beta: float,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
) -> torch.Tensor:
    """The SparsePO loss per pair, ``[B]`` (see the module doc).

    :param token_reward_w: ``r_t(y_w)`` ``[B, T]``; ``token_reward_l`` likewise for ``y_l``.
    :param token_kl_w: ``k_t(y_w)`` ``[B, T]`` (:func:`token_kl_terms`); ``token_kl_l`` for ``y_l``.
    :param response_w: ``[B, T]``, 1 on the response tokens of ``y_w`` (never prompt or padding).
    :param mu_w: ``m^u(y_w)`` ``[B, T]``; ``mu_l``, ``md_w``, ``md_l`` likewise.
    :param beta: β.
    :param l1_reward: λ_u, the weight of the L1 norm of the reward masks.
    :param l1_kl: λ_d, that of the KL masks.
    """
    mw, ml = response_w.to(token_reward_w.dtype), response_l.to(token_reward_l.dtype)
    u = (mu_w * token_reward_w * mw).sum(1) - (mu_l * token_reward_l * ml).sum(1)
    d = (md_w * token_kl_w * mw).sum(1) - (md_l * token_kl_l * ml).sum(1)
    loss = -F.logsigmoid(beta * (u - d))
    if l1_reward:
        loss = loss + l1_reward * ((mu_w * mw).abs().sum(1) + (mu_l * ml).abs().sum(1))
    if l1_kl:
        loss = loss + l1_kl * ((md_w * mw).abs().sum(1) + (md_l * ml).abs().sum(1))
    return loss


def shift_to_tokens(per_position: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` values computed at position ``t − 1`` moved to the token ``t`` they predict (0 at 0)."""
    return F.pad(per_position[:, :-1], (1, 0))


def derived_mask(hidden_states: Sequence[torch.Tensor], response: torch.Tensor) -> torch.Tensor:
    """MaPO's activation-derived mask ``[N, T]`` in ``[0, 1]`` (0 off the response).

    Per layer: ``a_t = mean_H h_{t−1}``; ``z = (a − mean) / (std + 1e-12)`` over the response
    tokens of the sequence (unbiased std, as ``torch.std``); ``(z − min z) / (max z − min z)``;
    then the mean over layers. A response with fewer than 2 tokens, or with equal activations
    on all of them, has no spread to rescale: its mask is 1 on every token (DPO's weight).

    :param hidden_states: the reference model's ``[N, T, H]`` states, one per layer.
    :param response: ``[N, T]``, 1 on response tokens.
    """
    keep = response > 0
    n = keep.sum(1, keepdim=True)
    out = []
    for h in hidden_states:
        a = shift_to_tokens(h.float().mean(-1))
        mean = (a * keep).sum(1, keepdim=True) / n.clamp_min(1)
        var = (((a - mean) * keep) ** 2).sum(1, keepdim=True) / (n - 1).clamp_min(1)
        z = (a - mean) / (var.sqrt() + 1e-12)
        lo = torch.where(keep, z, torch.full_like(z, math.inf)).amin(1, keepdim=True)
        hi = torch.where(keep, z, torch.full_like(z, -math.inf)).amax(1, keepdim=True)
        spread = hi - lo
        flat = (n < 2) | ~(spread > 0)
        m = torch.where(
            flat, torch.ones_like(z), (z - lo) / torch.where(flat, torch.ones_like(spread), spread)
        )
        out.append(m * keep)
    return torch.stack(out, 0).mean(0)


class MaskNet(nn.Module):
    """The learned mask (the code's ``SimpleMaskAllLayers`` with ReLU activations).

    ``m = Dropout(ReLU(Σ_ℓ c_ℓ Dropout(ReLU(w_ℓ · LayerNorm(h_ℓ) + b_ℓ))))``, ``[N, T]`` per
    position (shift with :func:`shift_to_tokens` to the token each position predicts).

    :param hidden: H, the reference's hidden size.
    :param layers: L, the number of hidden-state layers fed in.
    :param dropout: the code's ``mask_dropout`` (default 0.01 in ``SparseConfig``).
    :param eps: the LayerNorm ε (the model's ``layer_norm_epsilon``).
    """

    def __init__(self, hidden: int, layers: int, dropout: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(layers))
        self.mixer = nn.Linear(layers, 1, bias=False)
        self.drop = nn.Dropout(dropout)

    @torch.no_grad()
    def reset(self, generator: torch.Generator, std: float = 0.02) -> None:
        """Per-layer weights ``N(0, std²)`` and zero biases (what the code's host model's
        ``post_init`` gives them, GPT-2's ``initializer_range`` 0.02); LayerNorm (1, 0); the
        mixer at ``1/L`` (see the card: a random mixer can be negative and, behind the ReLU,
        zero every mask of a 1-layer model for good)."""
        for lin in self.per_layer:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) * std)
            lin.bias.zero_()
        self.norm.weight.fill_(1.0)
        self.norm.bias.zero_()
        self.mixer.weight.fill_(1.0 / self.mixer.weight.shape[1])

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        a = [
            self.drop(F.relu(lin(self.norm(h))))
            for lin, h in zip(self.per_layer, hidden_states, strict=True)
        ]
        return self.drop(F.relu(self.mixer(torch.cat(a, -1)))).squeeze(-1)


__all__ = ["MaskNet", "derived_mask", "shift_to_tokens", "sparse_po_loss", "token_kl_terms"]
