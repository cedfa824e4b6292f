"""Weight Compander of Cakaj, Mehnert and Yang (IJCNN 2023, arXiv 2306.16993), in pure torch.

Notation of the paper (Sec. III), for one weight tensor of a Linear or Conv layer, trained
through the stored tensor v of the same shape::

    w = Ψ(v) = a·arctan(v / b)                       (Eq. 1)  −aπ/2 < w < aπ/2
    ∂L/∂v = ∂L/∂w · a / (b·(1 + v²/b²))              (Eq. 2-3) Ψ'(0) = a/b, largest at v = 0
    v₀ = Ψ⁻¹(w₀) = b·tan(w₀ / a)                     (Eq. 4)  the usual init of w is kept
    L̄ = L(w) + λ·wᵀw  on w = Ψ(v), not on v          (Eq. 5)  fixed a, b

a bounds the magnitude of every effective weight; a/b > 1 makes the slope at 0 steeper than
1, so small |v| move fast and few effective weights stay near zero. In the learnable
("fine") extension (Sec. III-B) every layer has its own trained a and b, initialized to
a = 0.5, b = 1.0, and the weight decay acts on v instead (never on a or b).

For Adam-type optimizers the paper uses Powerpropagation's modified adaptive step: the
Adam step is computed from the gradient with respect to w and then multiplied by Ψ'(v)
(:class:`CompanderAdam`).

Source: the paper's text (IJCNN camera-ready PDF); no official code was found.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn


def compand(v: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """w = Ψ(v) = a·arctan(v / b), elementwise (Eq. 1)."""
    return a * torch.atan(v / b)


def compand_slope(
    v: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor
) -> torch.Tensor:
    """Ψ'(v) = a / (b·(1 + v²/b²)), elementwise (Eq. 3); always > 0 for a, b > 0."""
    return a / (b * (1.0 + (v / b) ** 2))


def expand(w: torch.Tensor, a: float | torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    """v = Ψ⁻¹(w) = b·tan(w / a) (Eq. 4); needs |w| < aπ/2.

    Raises ``ValueError`` when some |w| ≥ aπ/2: no v gives that weight, and a larger a (the
    paper assumes a ≥ 0.5) or a smaller initialization is needed.
    """
    bound = float(a) * math.pi / 2
    worst = float(w.detach().abs().max()) if w.numel() else 0.0
    if not worst < bound:
        raise ValueError(
            f"weight-compander: an initial weight of magnitude {worst:.4g} is outside Ψ's range "
            f"(−aπ/2, aπ/2) = ±{bound:.4g} for a = {float(a):g}; raise a or shrink the initialization"
        )
    return b * torch.tan(w / a)


class Compander(nn.Module):
    """The parametrization v ↦ w = a·arctan(v/b) for ``torch.nn.utils.parametrize``.

    :param a: a > 0, the magnitude bound is aπ/2.
    :param b: b > 0, stretches Ψ along v.
    :param learnable: a and b become this layer's own trained parameters (the paper's "fine"
        learnable version); otherwise plain floats shared by all layers (the fixed version).
    """

    def __init__(self, a: float, b: float, *, learnable: bool = False) -> None:
        super().__init__()
        self.learnable = learnable
        if learnable:
            # shape [1], not []: FSDP2 shards parameters along dim 0
            self.a = nn.Parameter(torch.tensor([float(a)]))
            self.b = nn.Parameter(torch.tensor([float(b)]))
        else:
            self.a, self.b = float(a), float(b)
        self._seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        w = compand(v, self.a, self.b)
        if torch.is_grad_enabled() and w.requires_grad:
            # kept for the weight-decay term of this step (whole tensors, also under FSDP2,
            # where parametrizations run on all-gathered parameters)
            self._seen = (v, w)
        return w

    def __getstate__(self) -> dict:
        # the kept tensors belong to one step's graph: copies (deepcopy, pickling) leave them
        state = self.__dict__.copy()
        state["_seen"] = None
        return state

    def take_seen(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(v, w) of the last forward with gradients since the last call, then forget them."""
        seen, self._seen = self._seen, None
        return seen

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        """v = b·tan(w/a): registering keeps the layer's initial weight (Eq. 4)."""
        with torch.no_grad():
            return expand(w, float(self.a), float(self.b))

    def extra_repr(self) -> str:
        return "learnable" if self.learnable else f"a={self.a:g}, b={self.b:g}"


def decay_term(
    vs: Iterable[torch.Tensor], companders: Iterable[Compander], weight_decay: float
) -> torch.Tensor:
    """The weight-decay term of one network: (λ/2)·Σ‖Ψ(v)‖² (fixed) or (λ/2)·Σ‖v‖² (learnable).

    Eq. 5 decays w = Ψ(v) in the fixed version; the learnable version decays v and never a, b.
    The factor ½ makes λ the coefficient of PyTorch's ``weight_decay`` (gradient λ·w for a
    plain weight), the sense in which the paper's values 1e-4 and 5e-4 are read.
    """
    total = None
    for v, c in zip(vs, companders, strict=True):
        x = v if c.learnable else c(v)
        sq = (x * x).sum()
        total = sq if total is None else total + sq
    if total is None:
        raise ValueError("weight-compander: no reparameterized weight to decay")
    return 0.5 * weight_decay * total


class CompanderAdam(torch.optim.Optimizer):
    """Adam with Powerpropagation's modified step for companded weights (Sec. III of the paper).

    For a companded tensor v with constants (a, b): the moments are kept for the gradient
    with respect to w, g_w = g_v / Ψ'(v) (Ψ' > 0), and the Adam step is multiplied by Ψ'(v)::

        m ← β₁m + (1−β₁)g_w,   s ← β₂s + (1−β₂)g_w²
        v ← v − η·Ψ'(v)·m̂ / (√ŝ + ε)

    Other tensors get plain Adam. ``weight_decay`` is coupled L2 on the tensor itself (use the
    :func:`decay_term` for Eq. 5 instead). Only the fixed version (float a, b) is supported.

    :param params: parameters or parameter groups.
    :param companded: ``(v, a, b)`` for each companded tensor (the ``original`` of a layer's
        ``parametrizations.weight``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        companded: Sequence[tuple[torch.Tensor, float, float]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self._ab = {id(v): (float(a), float(b)) for v, a, b in companded}

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch.optim's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g + group["weight_decay"] * p
                ab = self._ab.get(id(p))
                slope = compand_slope(p, *ab) if ab is not None else None
                if slope is not None:
                    g = g / slope  # g_w = ∂L/∂w
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                state["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
                m_hat = state["exp_avg"] / (1 - b1**t)
                s_hat = state["exp_avg_sq"] / (1 - b2**t)
                update = m_hat / (s_hat.sqrt() + group["eps"])
                if slope is not None:
                    update = update * slope
                p.sub_(group["lr"] * update)
        return loss


__all__ = ["Compander", "CompanderAdam", "compand", "compand_slope", "decay_term", "expand"]
