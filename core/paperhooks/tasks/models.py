"""The built-in models: any ``timm`` architecture, an MLP, and a linear model.

Each builder takes its frozen config and the data's :class:`~.registry.DataInfo`: the
number of outputs is ``num_classes`` for classification and 1 for regression, where the
module's output is squeezed to shape ``[B]``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch
from torch import nn

from paperhooks.tasks.registry import DataInfo, check_field, register_model


class SqueezeLast(nn.Module):
    """Wraps a module with one output per sample and returns shape ``[B]`` instead of ``[B, 1]``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x).squeeze(-1)


def _num_outputs(info: DataInfo) -> int:
    return info.num_classes if info.task == "classification" else 1


def _finish(module: nn.Module, info: DataInfo) -> nn.Module:
    return SqueezeLast(module) if info.task == "regression" else module


@dataclass(frozen=True)
class TimmConfig:
    """A ``timm`` architecture trained from scratch (``pretrained=False``)."""

    arch: str = "resnet18"
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        check_field(bool(self.arch), "arch", "a timm model name", self.arch)
        check_field(0 <= self.drop_rate < 1, "drop_rate", "in [0, 1)", self.drop_rate)


@dataclass(frozen=True)
class MLPConfig:
    """A ReLU MLP over the flattened input."""

    hidden: tuple[int, ...] = (64,)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_field(
            all(isinstance(h, int) and h >= 1 for h in self.hidden),
            "hidden",
            "a tuple of ints >= 1",
            self.hidden,
        )
        check_field(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)


@dataclass(frozen=True)
class LinearConfig:
    """A single linear layer over the flattened input (no options)."""


@register_model("timm", TimmConfig)
def build_timm(config: TimmConfig, info: DataInfo) -> nn.Module:
    """Any ``timm`` image model, with ``in_chans`` from the data and a fresh head."""
    import timm

    if len(info.input_shape) != 3:
        raise ValueError(
            f"model timm needs image inputs [C, H, W], but the data gives {info.input_shape}"
        )
    names = timm.list_models()
    if config.arch not in names:
        close = difflib.get_close_matches(config.arch, names, n=5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ValueError(f"arch {config.arch!r} is not a timm model{hint}")
    model = timm.create_model(
        config.arch,
        pretrained=False,
        num_classes=_num_outputs(info),
        in_chans=info.input_shape[0],
        drop_rate=config.drop_rate,
    )
    return _finish(model, info)


@register_model("mlp", MLPConfig)
def build_mlp(config: MLPConfig, info: DataInfo) -> nn.Module:
    """Flatten, then ``Linear -> ReLU (-> Dropout)`` per hidden width, then the output layer."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(info.input_shape)
    for h in config.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
        width = h
    layers.append(nn.Linear(width, _num_outputs(info)))
    return _finish(nn.Sequential(*layers), info)


@register_model("linear", LinearConfig)
def build_linear(config: LinearConfig, info: DataInfo) -> nn.Module:
    """Flatten, then one ``nn.Linear`` to the outputs."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(info.input_shape), _num_outputs(info)))
    return _finish(model, info)


__all__ = [
    "LinearConfig",
    "MLPConfig",
    "SqueezeLast",
    "TimmConfig",
    "build_linear",
    "build_mlp",
    "build_timm",
]
