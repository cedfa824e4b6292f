"""Kernel balancing weights of Li et al., ICLR 2024, as pure torch functions.

"Debiased Collaborative Filtering with Kernel-Based Causal Balancing" (arXiv 2404.19596),
the KBIPS estimator with randomly drawn kernel functions (the paper's random kernel balancing).
The formulas were checked against the official code, ``matrix_factorization_coat.py`` of
haoxuanli-pku/ICLR24-Kernel-Balancing (class ``MF_KBIPS_Gau`` / ``MF_KBIPS_Exp``: ``gau_kernel``,
``exp_kernel``, ``h_all``, ``h_obs``, ``loss_ker_bal`` and ``loss_weight_model``).

Notation::

    D        all user-item pairs (the population the prediction error is wanted on), |D| = M
    O ⊂ D    the observed pairs, |O| = n; w_i ≥ 0 the weight of observed pair i
    x        the covariates of a pair (pretrained user and item embeddings, concatenated)
    k(a, b)  a kernel: Gaussian exp(−σ‖a − b‖²) or exponential exp(−σ‖a − b‖)
    x_j      J kernel centers drawn from D: the balanced functions are h_j(x) = k(x_j, x)

    h_all_j = (1/M) Σ_{m ∈ D} k(x_j, x_m)          (code: h_all)
    h_obs_j = (1/n) Σ_{i ∈ O} w_i k(x_j, x_i)      (code: h_obs)

    minimize   (1/n) Σ_{i ∈ O} w_i log w_i  +  γ · penalty(h_obs − h_all; C)      (code: loss_weight_model)

Balanced weights make the weighted observed average of every h_j equal to its average over
all pairs, so the weighted training loss estimates the loss over all pairs (the IPS identity
with the balancing weights in place of 1/p). The entropy term keeps the weights as close to
uniform as the constraints allow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PLUGIN = "kernel-balancing"


# -- kernels ----------------------------------------------------------------------------------
def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_j − b_i‖ as ``[J, N]``, computed directly: the |a|² + |b|² − 2ab shortcut the code
    uses loses precision for close points, and nothing here needs its speed."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def gaussian_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 0.1) -> torch.Tensor:
    """k(a, b) = exp(−σ‖a − b‖²), the code's ``gau_kernel`` (σ = ``gamma`` = 0.1 there).

    :param a: ``[J, d]`` kernel centers; :param b: ``[N, d]`` points. :return: ``[J, N]``.
    """
    return torch.exp(-bandwidth * _distances(a, b).pow(2))  # [J, N]


def exponential_kernel(a: torch.Tensor, b: torch.Tensor, bandwidth: float = 0.1) -> torch.Tensor:
    """k(a, b) = exp(−σ‖a − b‖), the code's ``exp_kernel``. Shapes as :func:`gaussian_kernel`."""
    return torch.exp(-bandwidth * _distances(a, b))  # [J, N]


KERNELS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "gaussian": gaussian_kernel,
    "exponential": exponential_kernel,
}
"""Kernel name → k(centers, points, σ). The code's ``_Gau`` and ``_Exp`` model classes."""


# -- the objective ----------------------------------------------------------------------------
def kernel_means(
    centers: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor | None = None,
    kernel: str = "gaussian",
    bandwidth: float = 0.1,
) -> torch.Tensor:
    """(1/N) Σ_i w_i k(x_j, x_i) for every center j (w = 1 when ``None``): h_obs or h_all.

    :param centers: ``[J, d]``; :param x: ``[N, d]``; :param w: ``[N]`` or ``None``.
    :return: ``[J]``.
    """
    k = KERNELS[kernel](centers, x, bandwidth)  # [J, N]
    if w is None:
        return k.mean(dim=1)
    return (k * w.unsqueeze(0)).mean(dim=1)


def balance_penalty(
    h_obs: torch.Tensor, h_all: torch.Tensor, tolerance: float, hinge: str = "each"
) -> torch.Tensor:
    """The hinge on the imbalance h_obs − h_all of the J functions, zero within tolerance C.

    ``each``: Σ_j max(0, |h_obs_j − h_all_j| − C), one constraint |h_obs_j − h_all_j| ≤ C per
    function. ``sum``: the official code's ``loss_ker_bal``, max(0, Σ_j (h_all_j − h_obs_j) − C)
    + max(0, Σ_j (h_obs_j − h_all_j) − C), one constraint on the summed imbalance (imbalances
    of opposite sign cancel).
    """
    diff = h_obs - h_all  # [J]
    if hinge == "each":
        return torch.relu(diff.abs() - tolerance).sum()
    if hinge == "sum":
        total = diff.sum()
        return torch.relu(-total - tolerance) + torch.relu(total - tolerance)
    raise ValueError(f"{PLUGIN}: hinge must be 'each' or 'sum', got {hinge!r}")


def entropy_term(w: torch.Tensor) -> torch.Tensor:
    """(1/n) Σ_i w_i log w_i (0 log 0 = 0): the code's ``1/len(w) * torch.dot(w, torch.log(w))``.

    With weights of mean 1 this is KL(w/n ‖ uniform) ≥ 0, zero only for uniform weights.
    """
    return torch.special.xlogy(w, w).mean()


def balancing_objective(
    w: torch.Tensor,
    k_obs: torch.Tensor,
    h_all: torch.Tensor,
    *,
    gamma: float,
    tolerance: float,
    hinge: str = "each",
) -> torch.Tensor:
    """(1/n) Σ w log w + γ · penalty(h_obs − h_all; C), a scalar (code: ``loss_weight_model``).

    :param w: ``[n]`` weights of the observed pairs.
    :param k_obs: ``[J, n]``, k(x_j, x_i) between the J centers and the observed pairs.
    :param h_all: ``[J]``, the centers' kernel means over all pairs (:func:`kernel_means`).
    """
    h_obs = k_obs @ w / w.numel()  # [J] = (1/n) Σ_i w_i k(x_j, x_i)
    return entropy_term(w) + gamma * balance_penalty(h_obs, h_all, tolerance, hinge)


def fit_balancing_weights(
    x_obs: torch.Tensor,
    x_all: torch.Tensor,
    *,
    gamma: float,
    tolerance: float,
    num_centers: int,
    steps: int,
    lr: float,
    generator: torch.Generator,
    kernel: str = "gaussian",
    bandwidth: float = 0.1,
    hinge: str = "each",
    center_pool: int = 2048,
) -> torch.Tensor:
    """Weights of the observed pairs minimizing :func:`balancing_objective`, with mean 1.

    w = n · softmax(θ), θ ∈ ℝⁿ starting at 0 (uniform weights), and ``steps`` Adam steps on θ.
    Each step draws J centers, as the official code draws J centers from a fresh sample of
    all pairs at every mini-batch. Here they are drawn from a pool of ``center_pool`` pairs
    (every pair when M ≤ ``center_pool``) whose kernel rows k(x_j, ·) over the observed
    pairs and means h_all_j over all M pairs are computed once. Weights of mean 1 balance the
    constant function exactly, so the penalty acts on the shape of the weights only.

    :param x_obs: ``[n, d]``; :param x_all: ``[M, d]``, covariates of every pair.
    :param generator: the only source of randomness (pool and centers), so the fit is a
        deterministic function of the data and the generator's seed.
    :return: ``[n]`` non-negative weights, mean 1, detached, in the dtype of ``x_obs``.
    """
    n, m = x_obs.shape[0], x_all.shape[0]
    if gamma == 0:  # the entropy alone is minimized by uniform weights
        return torch.ones(n, dtype=x_obs.dtype, device=x_obs.device)
    pool = x_all
    if m > center_pool:
        pool = x_all[torch.randperm(m, generator=generator)[:center_pool].to(x_all.device)]
    k_pool = KERNELS[kernel](pool, x_obs, bandwidth)  # [P, n]
    # h_all of each pool center, 256 centers at a time to bound the [chunk, M] kernel block
    h_pool = torch.cat(
        [kernel_means(c, x_all, None, kernel, bandwidth) for c in pool.split(256)]
    )  # [P]
    theta = torch.zeros(n, dtype=x_obs.dtype, device=x_obs.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            j = torch.randint(pool.shape[0], (num_centers,), generator=generator).to(x_obs.device)
            w = n * torch.softmax(theta, dim=0)  # [n], Σ w = n
            loss = balancing_objective(
                w, k_pool[j], h_pool[j], gamma=gamma, tolerance=tolerance, hinge=hinge
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
    return n * torch.softmax(theta.detach(), dim=0)


# -- diagnostics ------------------------------------------------------------------------------
def imbalance(
    w: torch.Tensor,
    x_obs: torch.Tensor,
    x_all: torch.Tensor,
    centers: torch.Tensor,
    kernel: str = "gaussian",
    bandwidth: float = 0.1,
) -> torch.Tensor:
    """h_obs − h_all for each center, ``[J]``: zero for perfectly balanced weights."""
    return kernel_means(centers, x_obs, w, kernel, bandwidth) - kernel_means(
        centers, x_all, None, kernel, bandwidth
    )


def effective_sample_size(w: torch.Tensor) -> torch.Tensor:
    """(Σ w)² / Σ w²: n for uniform weights, 1 when one sample holds all the weight."""
    return w.sum() ** 2 / (w**2).sum()


__all__ = [
    "KERNELS",
    "balance_penalty",
    "balancing_objective",
    "effective_sample_size",
    "entropy_term",
    "exponential_kernel",
    "fit_balancing_weights",
    "gaussian_kernel",
    "imbalance",
    "kernel_means",
]
