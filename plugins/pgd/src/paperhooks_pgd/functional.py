"""ℓ∞ projected gradient descent (PGD) of Madry et al., ICLR 2018, as pure torch functions.

"Towards Deep Learning Models Resistant to Adversarial Attacks" (arXiv 1706.06083), §2.1.
Adversarial training solves the saddle-point problem

    min_θ ρ(θ),    ρ(θ) = E_(x,y) [ max_{δ ∈ S} L(θ, x + δ, y) ],    S = {δ : ‖δ‖∞ ≤ ε}

and approximates the inner maximum with K steps of projected sign-gradient ascent from a
random point of the ε-ball::

    x⁰     = x + U(−ε, ε)                                       (random start)
    x^{t+1} = Π_{[lo, hi]} Π_{x+S} ( x^t + α · sign(∇ₓ L(θ, x^t, y)) ),   t = 0 … K−1

Π_{x+S} clips to [x − ε, x + ε] per coordinate, then Π_{[lo, hi]} to the valid pixel range.
The order of operations follows ``LinfPGDAttack.perturb`` of the official code
(``MadryLab/mnist_challenge`` and ``MadryLab/cifar10_challenge``, ``pgd_attack.py``): the
random start is *not* clipped to the pixel range before the first gradient; every step clips
to the ball and then to the range. The loss is summed over the batch (the official
``model.xent`` is ``reduce_sum``): each sample's input gradient is its own, whatever the
batch, and only its sign is used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PLUGIN = "pgd"

LossFn = Callable[[torch.Tensor], torch.Tensor]
"""x' ↦ losses of the samples at x' (any shape whose sum is Σ_i L(θ, x'_i, y_i))."""


def uniform_start(
    shape: tuple[int, ...], epsilon: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """δ⁰ ~ U(−ε, ε) elementwise, float32 on the generator's device (the official random start)."""
    device = generator.device if generator is not None else None
    u = torch.rand(shape, generator=generator, device=device)  # U[0, 1)
    return (2.0 * u - 1.0) * epsilon


def project(
    x_adv: torch.Tensor, x: torch.Tensor, epsilon: float, bounds: tuple[float, float] | None
) -> torch.Tensor:
    """Π_{[lo, hi]} Π_{x+S}(x_adv): clip to the ε-ball around x, then to the valid range."""
    x_adv = torch.minimum(torch.maximum(x_adv, x - epsilon), x + epsilon)
    if bounds is not None:
        x_adv = x_adv.clamp(bounds[0], bounds[1])
    return x_adv


def linf_pgd(
    loss_fn: LossFn,
    x: torch.Tensor,
    epsilon: float,
    step_size: float,
    steps: int,
    *,
    delta0: torch.Tensor | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    on_loss: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """x^K: K steps of ℓ∞ PGD from x + δ⁰ (Madry et al. 2018, §2.1).

    :param loss_fn: x' ↦ per-sample losses L(θ, x', y) (summed here; the sign of each
        sample's input gradient does not depend on the other samples).
    :param x: the natural inputs, shape ``[B, ...]``, floating point.
    :param epsilon: ε, radius of the ℓ∞ ball, in input units.
    :param step_size: α, the size of each signed step.
    :param steps: K ≥ 1.
    :param delta0: δ⁰, the random start (shape of ``x``), or ``None`` to start at x.
    :param bounds: (lo, hi), the valid input range, or ``None`` for no range clip.
    :param on_loss: called as ``on_loss(t, losses)`` with the detached losses at x^t, e.g.
        to log how much the attack raised the loss.
    :return: x^K, detached, shape and dtype of ``x``, within ε of x and inside ``bounds``.

    Only the input receives a gradient (``torch.autograd.grad``): no parameter's ``.grad``
    is touched, and under DDP the caller wraps this in ``no_sync``. Runs with gradients
    enabled even when called under ``torch.no_grad()`` (e.g. during evaluation).
    """
    if steps < 1:
        raise ValueError(f"{PLUGIN}: steps must be >= 1, got {steps}")
    x_nat = x.detach()
    x_adv = x_nat.clone() if delta0 is None else x_nat + delta0.to(x_nat.dtype)
    with torch.enable_grad():
        for t in range(steps):
            x_adv.requires_grad_(True)
            losses = loss_fn(x_adv)
            if on_loss is not None:
                on_loss(t, losses.detach())
            (grad,) = torch.autograd.grad(losses.sum(), x_adv)  # ∇ₓ Σ_i L(θ, x_i^t, y_i)
            x_adv = project(x_adv.detach() + step_size * grad.sign(), x_nat, epsilon, bounds)
    return x_adv.detach()


def class_means(values: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Mean of ``values`` over the samples of each class, shape ``[C]`` (float64; NaN for an absent class).

    With ``values = (pred == target)`` this is each class's accuracy; its minimum over the
    classes present is the worst-class accuracy.
    """
    sums = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    sums.index_add_(0, target, values.to(torch.float64))
    counts.index_add_(0, target, torch.ones_like(values, dtype=torch.float64))
    return sums / counts


__all__ = ["class_means", "linf_pgd", "project", "uniform_start"]
