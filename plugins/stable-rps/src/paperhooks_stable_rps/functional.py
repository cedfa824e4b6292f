"""STABLE-RPS as pure torch: the RANDOMFOLD map, the shared-array weight and the gradient scaler.

Desai & Shrivastava, "In defense of parameter sharing for model-compression" (ICLR 2024,
arXiv 2310.11611). Every selected weight is read from one shared trainable array z of size m::

    ℓ          global position of a weight: its flat index in its layer + the sizes of the
               selected layers before it (module order)          ℓ ∈ [0, n)
    RANDOMFOLD h(ℓ) = (H(⌊ℓ/m⌋) + ℓ mod m) mod m                     each partition of m
               consecutive positions is one random cyclic shift of z
    HashedNet  h(ℓ) = H(ℓ) mod m                                    (the baseline it replaces)
    H(x)       = ((a₀·x + a₁·x² + a₂) mod P) mod m,  P = 2038074743, a odd random
    w_ℓ        = λ_layer · g_ℓ · z[h(ℓ)],     g_ℓ ∈ {±1} random,  λ_layer = std(W₀)/σ_init

RANDOMFOLD gives every slot ⌊n/m⌋ or ⌈n/m⌉ weights and, at m = n, a bijection: the model is
the uncompressed one. z starts at N(0, σ_init²), so w starts with its layer's own std.

Gradient scaling: per slot k, with c_k = #{ℓ → k}, A_k = Σ_{ℓ→k} λ_ℓ, B_k = Σ_{ℓ→k} λ_ℓ²,
the gradient of z[k] is divided by s_k before the optimizer step (mode ``v1``: s_k = A_k²/c_k).
With SGD a slot holding weights of one λ then moves its weights by −η·mean_{ℓ→k} g_ℓ g_j ∂L/∂w_j,
whatever σ_init is; at m = n this is exactly SGD on the uncompressed model.

Checked against ``apd10/FakeRoast`` (``Mapper_v2.py``: ``UHasher``, ``ParetoCyclicMapper``,
``HashedNetMapper``; ``FakeRoastUtil_v2.py``: ``ModelRoaster``, ``ModelRoasterGradScaler``,
``RoastGradScaler``; ``FakeRoast.py``: ``FakeRoast``, ``FakeRoastLinear``); see the method card.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

P = 2038074743
"""The prime of the universal hash (``Mapper_v2.UHasher``)."""

Mapping = Literal["randomfold", "hashednet"]
Scaler = Literal["v1", "v2", "v3", "v4", "v5", "none"]
SCALERS: tuple[str, ...] = ("v1", "v2", "v3", "v4", "v5", "none")
MAPPINGS: tuple[str, ...] = ("randomfold", "hashednet")


def hash_coefficients(generator: torch.Generator) -> torch.Tensor:
    """a₀, a₁, a₂ of H: odd integers in [3, P), drawn as ``UHasher`` draws them; ``[3]`` int64."""
    return 2 * torch.randint(1, P // 2 - 1, (3,), generator=generator, dtype=torch.int64) + 1


def universal_hash(x: torch.Tensor, a: torch.Tensor, m: int) -> torch.Tensor:
    """H(x) = ((a₀x + a₁x² + a₂) mod P) mod m, for int64 ``x ≥ 0`` of any shape.

    Every product is reduced mod P first, so no intermediate exceeds P² < 2⁶³: the value is
    exact for any x (the official code multiplies unreduced and wraps for x ≳ 3·10⁴; it
    only hashes partition numbers there, which stay far below that).
    """
    if not 1 <= m < P:
        raise ValueError(f"the hash range m must be in [1, {P}), got {m}")
    x = x.to(torch.int64) % P
    t1 = (x * a[0]) % P
    t2 = (((x * x) % P) * a[1]) % P
    return ((t1 + t2 + a[2]) % P) % m


def randomfold_index(positions: torch.Tensor, m: int, a: torch.Tensor) -> torch.Tensor:
    """RANDOMFOLD: slot of each global position, (H(⌊ℓ/m⌋) + ℓ mod m) mod m (``ParetoCyclicMapper``)."""
    chunk = positions // m
    return (universal_hash(chunk, a, m) + positions - m * chunk) % m


def hashednet_index(positions: torch.Tensor, m: int, a: torch.Tensor) -> torch.Tensor:
    """HashedNet: an independent hash of every position, H(ℓ) mod m (``HashedNetMapper``)."""
    return universal_hash(positions, a, m)


INDEX = {"randomfold": randomfold_index, "hashednet": hashednet_index}


def slot_statistics(
    index: torch.Tensor, scale: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per slot: c_k (count), A_k = Σ λ, B_k = Σ λ² over the positions mapped to k; each ``[m]`` float64.

    :param index: ``[n]`` slot of every position; :param scale: ``[n]`` λ of every position.
    """
    ones = torch.ones_like(scale, dtype=torch.float64)
    lam = scale.to(torch.float64)
    c = torch.zeros(m, dtype=torch.float64).index_add_(0, index, ones)
    a = torch.zeros(m, dtype=torch.float64).index_add_(0, index, lam)
    b = torch.zeros(m, dtype=torch.float64).index_add_(0, index, lam * lam)
    return c, a, b


def grad_divisor(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, mode: Scaler) -> torch.Tensor:
    """s_k by which the gradient of z[k] is divided (``ModelRoasterGradScaler``), ``[m]``.

    v1 A²/c (the code's default) · v2 A · v3 A/c · v4 √B · v5 B · none 1. Empty slots (c = 0,
    possible with HashedNet) get s = 1: their gradient is zero anyway. The code's guards
    (+1e-3 on c, +1e-6 on s) are left out, so at m = n the v1 step is exactly plain SGD.
    """
    safe_c = c.clamp_min(1.0)
    s = {
        "v1": a * a / safe_c,
        "v2": a,
        "v3": a / safe_c,
        "v4": b.sqrt(),
        "v5": b,
        "none": torch.ones_like(a),
    }[mode]
    return torch.where(c > 0, s, torch.ones_like(s))


def scale_grad(z: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """z in the forward pass (bit-exact), ``factor ⊙ ∂L/∂z`` in the backward pass."""
    return z.detach() + (z - z.detach()) * factor


def shared_weight(
    z: torch.Tensor, index: torch.Tensor, sign: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """w = λ · g ⊙ z[h]: ``index`` and ``sign`` have the weight's shape, ``z`` is ``[m]``."""
    return scale * sign * z[index]


def project(
    weight: torch.Tensor, index: torch.Tensor, sign: torch.Tensor, scale: float, m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_{ℓ→k} g_ℓ W_ℓ/λ and the counts c_k, both ``[m]``: their ratio is the z whose weights are
    closest to W in least squares (one layer's share; the plugin sums the layers')."""
    flat_i = index.reshape(-1)
    total = torch.zeros(m, dtype=torch.float64).index_add_(
        0, flat_i, (sign * weight).reshape(-1).double() / scale
    )
    count = torch.zeros(m, dtype=torch.float64).index_add_(
        0, flat_i, torch.ones(flat_i.numel(), dtype=torch.float64)
    )
    return total, count


class SharedWeight(nn.Module):
    """The parametrization of one layer's weight: W = λ · g ⊙ z[h], z read from the owner.

    The stored ``original`` weight is not used (the plugin empties it); z is the parameter
    ``owner.<attr>`` looked up at every call, so sharding wrappers that swap it in and out
    (FSDP2) are respected. ``index``, ``sign`` and ``grad_factor`` (1/s of every slot) are
    non-persistent buffers rebuilt from the hash seed; λ is kept as a plain float.
    """

    def __init__(
        self,
        owner: nn.Module,
        attr: str,
        index: torch.Tensor,
        sign: torch.Tensor,
        scale: float,
        grad_factor: torch.Tensor,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "_owner", owner)  # not a submodule: the owner holds this module
        self.attr = attr
        self.scale = float(scale)
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("sign", sign, persistent=False)
        self.register_buffer("grad_factor", grad_factor, persistent=False)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        z = getattr(self._owner, self.attr)
        z = scale_grad(z, self.grad_factor.to(z.dtype))
        return shared_weight(z, self.index, self.sign.to(z.dtype), self.scale)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored tensor: empty, since the weight lives in the shared array."""
        return weight.new_empty(0)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.index.shape)}, array={self.attr}, scale={self.scale:.4g}"


__all__ = [
    "INDEX",
    "MAPPINGS",
    "P",
    "SCALERS",
    "Mapping",
    "Scaler",
    "SharedWeight",
    "grad_divisor",
    "hash_coefficients",
    "hashednet_index",
    "project",
    "randomfold_index",
    "scale_grad",
    "shared_weight",
    "slot_statistics",
    "universal_hash",
]
