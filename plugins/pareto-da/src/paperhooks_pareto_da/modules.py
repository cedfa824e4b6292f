"""The discriminators ParetoDA trains next to the model, and calls with parameters held fixed.

- ``domain``: DANN's domain discriminator D(f) (one logit of "source"), dalib's
  ``DomainDiscriminator``: Linear–ReLU–Linear–ReLU–Linear, hidden width 1024 in the official
  script. The official one has BatchNorm after each hidden Linear; it is left out here
  because per-rank batch statistics would break "N processes = 1 process".
- ``classes``: one discriminator per class k (official ``Class_Domaindiscri``: the same
  architecture, BatchNorm included, 2 domain logits), here one logit of
  ``P(d = target | f, y = k)`` each (a softmax over two logits is a sigmoid of their
  difference); the C networks are evaluated together as batched matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call


def _mlp(dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, 1),
    )


class ClassDiscriminators(nn.Module):
    """C independent Linear–ReLU–Linear–ReLU–Linear(1) networks, weights ``[C, in, out]``.

    Initialized as ``nn.Linear`` is: weights and biases ~ U(−1/√in, 1/√in).
    """

    def __init__(self, dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        shapes = [(dim, hidden), (hidden, hidden), (hidden, 1)]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_classes, i, o)) for i, o in shapes
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_classes, 1, o)) for _, o in shapes
        )
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C]`` of ``P(d = target | f, y = k)`` for features ``[B, d]``."""
        h = f.unsqueeze(0)  # [1, B, d], broadcast over the C networks
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(b, h.expand(w.shape[0], -1, -1), w)  # [C, B, out]
            if i < last:
                h = torch.relu(h)
        return h.squeeze(-1).T


class Discriminators(nn.Module):
    """DANN's domain discriminator and C per-class domain discriminators over features ``[B, d]``."""

    def __init__(self, dim: int, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.domain = _mlp(dim, hidden)
        self.classes = ClassDiscriminators(dim, num_classes, hidden)

    def domain_logit(self, f: torch.Tensor) -> torch.Tensor:
        """Logit of "source" ``[B]``."""
        return self.domain(f).squeeze(-1)

    def class_logits(self, f: torch.Tensor) -> torch.Tensor:
        """Logits of ``P(d = target | f, y = k)``, ``[B, C]``."""
        return self.classes(f)


def frozen(module: nn.Module, template: nn.Module | None = None) -> Callable[..., torch.Tensor]:
    """``module``'s forward with its parameters detached: gradients reach the inputs only.

    An objective computed through it moves the shared features but not ``module``; the
    official code gets the same by zeroing the head's and the discriminator's gradients of the
    weighted sum before it adds their own losses.

    Under FSDP2 ``module``'s parameters are shards (DTensors), and calling the module runs
    FSDP2's pre-forward hook, which puts its own unsharded, trainable parameters back in place
    of the detached ones. So sharded parameters are gathered whole (``full_tensor``; every rank
    calls this alike) and the forward runs on ``template``, an unsharded copy of the module
    made before sharding, which has no such hook. Unsharded modules run as themselves.
    """
    from torch.distributed.tensor import DTensor

    params = {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach()
        for k, v in module.named_parameters()
    }
    buffers = {
        k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.named_buffers()
    }
    sharded = any(isinstance(v, DTensor) for v in module.parameters())
    if sharded and template is None:
        raise ValueError(
            "frozen: the module's parameters are sharded (FSDP2); pass an unsharded copy of it "
            "as template"
        )
    target = template if sharded else module

    def call(*args: torch.Tensor) -> torch.Tensor:
        return functional_call(target, {**params, **buffers}, args)

    return call


__all__ = ["ClassDiscriminators", "Discriminators", "frozen"]
