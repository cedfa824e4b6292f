"""Covariates x of user-item pairs: embeddings of a matrix factorization of the observed data.

The paper balances kernel functions of the pairs' covariates. Its code uses pretrained user
and item embeddings, concatenated (``get_embedding`` of ``MF_KBIPS_Gau``, loading
``data/<dataset>/<dataset>_user.pth`` and ``_item.pth``); how those were trained is not in
the repository. Here they are fitted once, on the observed ratings every process holds, by a
rank-``dim`` matrix factorization with user and item biases, and standardized column-wise.
"""

from __future__ import annotations

import torch


def all_pairs(num_users: int, num_items: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every (user, item) pair, user-major: ``[U·I, 2]`` int64."""
    return torch.cartesian_prod(
        torch.arange(num_users, device=device), torch.arange(num_items, device=device)
    )


def _standardize(t: torch.Tensor) -> torch.Tensor:
    # a constant column (e.g. a single user) stays at 0 instead of dividing by zero
    return (t - t.mean(dim=0)) / t.std(dim=0, unbiased=False).clamp_min(1e-12)


def fit_embeddings(
    pairs: torch.Tensor,
    ratings: torch.Tensor,
    num_users: int,
    num_items: int,
    *,
    dim: int = 4,
    steps: int = 300,
    lr: float = 0.05,
    weight_decay: float = 1e-3,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """User and item covariates from a full-batch fit of r̂_ui = p_u·q_i + b_u + c_i + μ.

    Minimizes (1/n) Σ_O (r̂ − r)² + λ (mean p² + mean q²) with Adam from p, q ~ N(0, 0.1²)
    (drawn from ``generator``, so the fit is deterministic), in float64.

    :param pairs: ``[n, 2]`` observed (user, item) ids; :param ratings: ``[n]``.
    :return: ``[U, dim + 1]`` and ``[I, dim + 1]``: (p_u, b_u) and (q_i, c_i), each column
        standardized to mean 0 and variance 1.
    """
    dt = torch.float64
    p = (0.1 * torch.randn(num_users, dim, generator=generator, dtype=dt)).requires_grad_()
    q = (0.1 * torch.randn(num_items, dim, generator=generator, dtype=dt)).requires_grad_()
    b = torch.zeros(num_users, dtype=dt, requires_grad=True)
    c = torch.zeros(num_items, dtype=dt, requires_grad=True)
    mu = torch.zeros((), dtype=dt, requires_grad=True)
    u, i = pairs[:, 0].cpu(), pairs[:, 1].cpu()
    r = ratings.detach().cpu().to(dt)
    opt = torch.optim.Adam([p, q, b, c, mu], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            pred = (p[u] * q[i]).sum(-1) + b[u] + c[i] + mu  # [n]
            loss = (pred - r).pow(2).mean() + weight_decay * (p.pow(2).mean() + q.pow(2).mean())
            opt.zero_grad()
            loss.backward()
            opt.step()
    users = torch.cat([p.detach(), b.detach().unsqueeze(1)], dim=1)  # [U, dim + 1]
    items = torch.cat([q.detach(), c.detach().unsqueeze(1)], dim=1)  # [I, dim + 1]
    return _standardize(users), _standardize(items)


def pair_features(users: torch.Tensor, items: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """x_ui = (user covariates, item covariates): ``[N, d_u + d_i]`` for ``pairs`` ``[N, 2]``."""
    pairs = pairs.to(users.device)
    return torch.cat([users[pairs[:, 0]], items[pairs[:, 1]]], dim=1)


__all__ = ["all_pairs", "fit_embeddings", "pair_features"]
