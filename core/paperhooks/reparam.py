"""Helpers of the weight-reparameterization family: which layers, merge, trainable count.

A reparameterization plugin registers ``torch.nn.utils.parametrize`` parametrizations in its
``reparam_setup`` hook on the layers a recipe selects::

    @dataclass(frozen=True)
    class Config:
        rank: int = 8
        layers: Layers = Layers()          # recipe: layers: {types: [Linear], exclude: ["head*"]}

    @hookimpl
    def reparam_setup(self, module, ctx):
        for name, layer in select_layers(module.model, self.config.layers, plugin=self.name):
            parametrize.register_parametrization(layer, "weight", MyParametrization(...))

Several plugins stack in recipe order (the first registered acts first on the stored weight);
the pruning family's masks come last, so a pruned entry of the *effective* weight is exactly
zero whatever the reparameterizations compute. :func:`merge` folds everything into plain
weights (what ``paperhooks export`` saves).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from paperhooks.tasks.registry import check_field

#: module types a recipe may name in ``layers.types``
LAYER_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "Embedding": nn.Embedding,
}


@dataclass(frozen=True)
class Layers:
    """Which layers a reparameterization acts on.

    :ivar types: module types, from ``Linear, Conv1d, Conv2d, Conv3d, Embedding``.
    :ivar include: glob patterns over module names (``model.named_modules()``); a layer must
        match one.
    :ivar exclude: glob patterns; a layer matching one is left alone.
    :ivar skip_head: leave out the classifier head (timm's ``get_classifier()``, else the last
        selected layer in module order).
    """

    types: tuple[str, ...] = ("Linear", "Conv2d")
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    skip_head: bool = True

    def __post_init__(self) -> None:
        for t in self.types:
            check_field(t in LAYER_TYPES, "layers.types", f"one of {', '.join(LAYER_TYPES)}", t)
        check_field(
            len(self.types) > 0, "layers.types", "at least one module type", list(self.types)
        )
        check_field(
            len(self.include) > 0, "layers.include", "at least one glob pattern", list(self.include)
        )


def head_name(model: nn.Module, candidates: Sequence[str]) -> str | None:
    """The classifier head's module name: timm's ``get_classifier()``, else the last candidate."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        head = get()
        for name, m in model.named_modules():
            if m is head and name:
                return name
    return candidates[-1] if candidates else None


def select_layers(
    model: nn.Module, layers: Layers, *, plugin: str = ""
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers ``layers`` selects, in module order.

    Raises ``ValueError`` naming the plugin and the available layers when none is selected.
    """
    types = tuple(LAYER_TYPES[t] for t in layers.types)
    typed = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)]
    chosen = [
        (n, m)
        for n, m in typed
        if any(fnmatch.fnmatchcase(n, p) for p in layers.include)
        and not any(fnmatch.fnmatchcase(n, p) for p in layers.exclude)
    ]
    if layers.skip_head:
        head = head_name(model, [n for n, _ in typed])
        chosen = [(n, m) for n, m in chosen if n != head and not n.startswith(f"{head}.")]
    if not chosen:
        who = f"plugin {plugin!r}: " if plugin else ""
        raise ValueError(
            f"{who}layers {{types: {list(layers.types)}, include: {list(layers.include)}, exclude: {list(layers.exclude)}, "
            f"skip_head: {layers.skip_head}}} selects no layer; layers of those types: {[n for n, _ in typed][:20]}"
        )
    return chosen


def merge(model: nn.Module, plugins: Iterable[Any] = ()) -> nn.Module:
    """Fold every parametrization into a plain weight, in place, and return the model.

    Plugins that wrap modules instead of parametrizing them undo their wrappers first
    (``reparam_merge`` hooks, in reverse recipe order); then each parametrization is
    replaced by the tensor it computes (``remove_parametrizations(leave_parametrized=True)``).
    The merged model computes what the parametrized one computed.
    """
    for p in reversed(list(plugins)):
        hook = getattr(p, "reparam_merge", None)
        if callable(hook):
            hook(model=model)
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for name in list(m.parametrizations):
                parametrize.remove_parametrizations(m, name, leave_parametrized=True)
    return model


def trainable_parameters(model: nn.Module) -> int:
    """The number of trainable scalars (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


__all__ = ["LAYER_TYPES", "Layers", "head_name", "merge", "select_layers", "trainable_parameters"]
