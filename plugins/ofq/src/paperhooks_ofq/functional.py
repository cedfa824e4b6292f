"""OFQ as pure torch: StatsQ, the CGA freeze mask and the oscillation tracker.

"Oscillation-free Quantization for Low-bit Vision Transformers" (Liu, Liu and Cheng, ICML
2023, arXiv 2302.02210), §4.1 (StatsQ) and §4.2 (confidence-guided annealing). Formulas and
defaults checked against nbasyl/OFQ: ``src/quantization/quantizer/statsq.py``
(``StatsQuantizer``, ``TrackOscillation``) and ``cga.py`` (``freeze_outside_boundary_weight_idx``
and the freeze/restore around ``optimizer.step()``), commit e1c8d1d (statsq.py) / 75a719b (cga.py).

Notation, for a weight W of shape ``[out, ...]`` and b bits (n = 2^{b−1})::

    s   = 2 · mean_j |W_{o,j}|          per output row o, detached (no gradient through s)
    c   = clamp(W / s, −1, 1 − 1e-6)
    u   = c · n − 0.5                    the pre-round value
    q   = round(u) ∈ {−n, …, n − 1}      the integer code (round half to even; b ≥ 2)
    W_q = s · (q + 0.5) / n              symmetric levels ±0.5/n·s, …, ±(n−0.5)/n·s, no zero

Straight-through estimator: the forward value is W_q and ∂W_q/∂W = 1 (the code writes
``W_q.detach() − W.detach() + W``; here ``W_q + (W − W.detach())``, the same gradient with a
forward value exactly on the grid). CGA (§4.2): in the final phase a weight stays trainable only
when its u lies within ±r (``boundaryRange`` = 0.005) of a rounding boundary i + 0.5; the others
are frozen: zero gradient, and restored after the optimizer step (so momentum and weight decay
do not move them either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def statsq_scale(w: torch.Tensor) -> torch.Tensor:
    """s = 2·mean|W| over every dim but the first (per output row / channel), ``[out, 1, …]``, detached."""
    if w.dim() < 2:
        raise ValueError(
            f"StatsQ quantizes weights of shape [out, ...] with at least 2 dims, got {tuple(w.shape)}"
        )
    return 2 * w.detach().abs().mean(dim=tuple(range(1, w.dim())), keepdim=True)


def pre_round(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u, s)``: u = clamp(W/s, −1, 1 − 1e-6)·n − 0.5 (detached) and the scale s.

    An all-zero row has s = 0 (the code divides by it and gets NaN): here it divides by 1
    instead, so that row's W_q = s·(…) is 0.
    """
    s = statsq_scale(w)
    n = float(2 ** (bits - 1))
    c = torch.clamp(
        w.detach() / torch.where(s > 0, s, torch.ones_like(s)), min=-1.0, max=1.0 - 1e-6
    )
    return c * n - 0.5, s


def statsq_codes(w: torch.Tensor, bits: int) -> torch.Tensor:
    """q = round(u), the integer code of each weight, in {−n, …, n − 1} (float tensor)."""
    return torch.round(pre_round(w, bits)[0])


def statsq(w: torch.Tensor, bits: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """W_q = s·(round(u) + 0.5)/n with the straight-through gradient.

    :param w: the stored weight, ``[out, …]``.
    :param bits: b ≥ 1.
    :param keep: CGA's trainable mask (same shape, bool); frozen entries get no gradient.
    """
    u, s = pre_round(w, bits)
    n = float(2 ** (bits - 1))
    wq = s * ((torch.round(u) + 0.5) / n)
    ste = w - w.detach()  # value 0, gradient 1
    return wq + (ste if keep is None else ste * keep)


def cga_keep_mask(w: torch.Tensor, bits: int, boundary_range: float = 0.005) -> torch.Tensor:
    """CGA's trainable set: ``True`` where 0.5 − r ≤ u − i ≤ 0.5 + r for an integer i in
    [min q, max q) of the tensor (``freeze_outside_boundary_weight_idx`` of cga.py), i.e. u is
    within r of the boundary between two levels the layer uses. Everything else is frozen."""
    u, _ = pre_round(w, bits)
    q = torch.round(u)
    keep = torch.zeros_like(u, dtype=torch.bool)
    for i in range(int(q.min()), int(q.max())):
        d = u - i
        keep |= (d <= 0.5 + boundary_range) & (d >= 0.5 - boundary_range)
    return keep


# -- oscillations ------------------------------------------------------------------------------------
@dataclass
class Oscillations:
    """State of TrackOscillation for one tensor (statsq.py), all tensors of the weight's shape.

    :ivar codes: the previous integer codes q_{t−1}.
    :ivar direction: sign of the last change of each code (0 before its first change);
        ``sign(q_prev − q)`` as in the code, so only its agreement between flips matters.
    :ivar ema: EMA of "oscillated at this step" with momentum m (0.01 in the code).
    """

    codes: torch.Tensor
    direction: torch.Tensor
    ema: torch.Tensor

    @classmethod
    def start(cls, codes: torch.Tensor) -> Oscillations:
        return cls(
            codes.to(torch.int8),
            torch.zeros_like(codes, dtype=torch.int8),
            torch.zeros_like(codes, dtype=torch.float32),
        )


def track_oscillations(
    state: Oscillations, codes: torch.Tensor, momentum: float = 0.01
) -> tuple[Oscillations, int, int]:
    """One step of TrackOscillation: ``(new state, oscillated count, flipped count)``.

    A code *flips* when it changes; it *oscillates* when it flips in the direction opposite to
    its previous flip (``prev_switch_dir · switch_dir == −1``). ema ← m·oscillated + (1 − m)·ema.
    """
    new = codes.to(torch.int8)
    switch = torch.sign(state.codes.to(torch.int16) - new.to(torch.int16)).to(
        torch.int8
    )  # {−1, 0, 1}
    flipped = switch != 0
    oscillated = (state.direction * switch) == -1
    ema = momentum * oscillated.float() + (1 - momentum) * state.ema
    direction = torch.where(flipped, switch, state.direction)
    return Oscillations(new, direction, ema), int(oscillated.sum()), int(flipped.sum())


class StatsQ(nn.Module):
    """The parametrization W ↦ W_q (StatsQ), with CGA's gradient mask when :attr:`anneal` is on.

    While annealing in a training forward (grad enabled, ``training``), it keeps what the
    optimizer step must not move: :attr:`frozen` (bool mask) and :attr:`before` (the weight
    before the step), both whole tensors, read by the plugin after the step.
    """

    def __init__(self, bits: int, boundary_range: float = 0.005) -> None:
        super().__init__()
        self.bits = bits
        self.boundary_range = boundary_range
        self.anneal = False
        self.frozen: torch.Tensor | None = None
        self.before: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not (self.anneal and self.training and torch.is_grad_enabled()):
            return statsq(w, self.bits)
        keep = cga_keep_mask(w, self.bits, self.boundary_range)
        self.frozen, self.before = ~keep, w.detach().clone()
        return statsq(w, self.bits, keep)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, boundary_range={self.boundary_range}"


__all__ = [
    "Oscillations",
    "StatsQ",
    "cga_keep_mask",
    "pre_round",
    "statsq",
    "statsq_codes",
    "statsq_scale",
    "track_oscillations",
]
