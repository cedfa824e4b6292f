"""The ``ofq`` plugin: :mod:`.functional` wired to the reparameterization hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_ofq import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "ofq"

BIBTEX = """\
@inproceedings{liu2023oscillationfree,
  title     = {Oscillation-free Quantization for Low-bit Vision Transformers},
  author    = {Liu, Shih-Yang and Liu, Zechun and Cheng, Kwang-Ting},
  booktitle = {Proceedings of the 40th International Conference on Machine Learning (ICML)},
  year      = {2023},
  eprint    = {2302.02210},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2302.02210}
}"""


def _int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < lo
        or (hi is not None and value > hi)
    ):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"OfqConfig.{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class OfqConfig:
    """Hyper-parameters, with the official code's defaults (nbasyl/OFQ ``cga.py`` arguments).

    :ivar bits: b, weight bit-width (``--wq-bitw``, default 2; the paper reports 2, 3, 4). At
        b = 1 (n = 1) a clamped c = −1 gives u = −1.5, which rounds (half to even) to a third
        code −2, so b ≥ 2.
    :ivar boundary_range: r, CGA's half-width around a rounding boundary within which a weight
        stays trainable (``--boundaryRange`` 0.005; "0.005 or 0.007 yield the best result").
    :ivar cga_epochs: the last epochs of the fit are CGA's annealing phase
        (``--freeze_for_n_epochs`` 15, run after the 300 QAT epochs). 0 turns CGA off
        (StatsQ alone). Needs ``trainer.max_epochs``.
    :ivar cga_steps: the last steps of the fit are the annealing phase; replaces
        ``cga_epochs`` when set (runs that stop by ``trainer.max_steps``).
    :ivar momentum: m of the oscillation EMA (``TrackOscillation(momentum=0.01)``).
    :ivar layers: which layers are quantized (default: Linear and Conv2d, not the head; the code
        quantizes the blocks' Linear layers, not the patch embedding nor the head).
    """

    bits: int = 2
    boundary_range: float = 0.005
    cga_epochs: int = 15
    cga_steps: int | None = None
    momentum: float = 0.01
    layers: Layers = Layers()

    def __post_init__(self) -> None:
        _int("bits", self.bits, 2, 8)
        r = self.boundary_range
        if isinstance(r, bool) or not isinstance(r, int | float) or not (0 <= r < 0.5):
            raise ValueError(f"OfqConfig.boundary_range must be a number in [0, 0.5), got {r!r}")
        _int("cga_epochs", self.cga_epochs, 0)
        if self.cga_steps is not None:
            _int("cga_steps", self.cga_steps, 0)
        m = self.momentum
        if (
            isinstance(m, bool)
            or not isinstance(m, int | float)
            or not math.isfinite(m)
            or not (0 < m <= 1)
        ):
            raise ValueError(f"OfqConfig.momentum must be a number in (0, 1], got {m!r}")


@dataclass
class _Quantized:
    layer: nn.Module
    quantizer: F.StatsQ


def _stored(layer: nn.Module) -> torch.Tensor:
    """The trained tensor behind ``layer.weight``: the first parametrization's input."""
    return layer.parametrizations.weight.original


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP2-sharded) parameter; an all-gather for a DTensor."""
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def _local(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of a whole tensor, laid out as the (possibly sharded) parameter ``like``."""
    if not callable(getattr(like, "to_local", None)):
        return full
    from torch.distributed.tensor import distribute_tensor

    # every rank holds the same whole tensor, so each cuts its own shard without communication
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


class Ofq(Plugin):
    """OFQ: StatsQ fake quantization of the selected weights, CGA in the final phase, and the
    oscillation counter (§4.1–4.2 of the paper; query-key reparameterization, §4.3, is ViT
    attention-specific and not implemented).

    Many processes: StatsQ and CGA's mask are computed in forward, on whole weights (FSDP2
    has all-gathered them) that are identical on every rank, and CGA's gradient mask acts
    before DDP's all-reduce / FSDP2's reduce-scatter (a linear map, identical on every rank).
    After the step, frozen entries are restored shard by shard, and the oscillation counter
    reads whole codes (an all-gather under FSDP2), so its state is identical on every rank.
    Lightning's ``fsdp`` (flat parameters) and ``deepspeed`` (ZeRO partitions) hand neither
    whole tensors nor DTensor shards to the after-step code: unsupported.
    """

    Config = OfqConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    paper: ClassVar[Paper] = Paper(
        title="Oscillation-free Quantization for Low-bit Vision Transformers",
        authors=("Shih-Yang Liu", "Zechun Liu", "Kwang-Ting Cheng"),
        year=2023,
        venue="ICML 2023",
        arxiv="2302.02210",
        bibtex=BIBTEX,
        code="https://github.com/nbasyl/OFQ",
        checked_against=(
            "nbasyl/OFQ src/quantization/quantizer/statsq.py @ e1c8d1d6864f48aa98a734ffc69bd5011750f922 "
            "(StatsQuantizer, TrackOscillation) and cga.py @ 75a719b41ec0ae813372f27d6cd8c226692dbb4d "
            "(freeze_outside_boundary_weight_idx, gradient zeroing and restore around optimizer.step, "
            "--boundaryRange 0.005, --freeze_for_n_epochs 15, --wq-bitw 2)"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: OfqConfig

    def __init__(self, config: OfqConfig | None = None) -> None:
        super().__init__(config)
        self._quantized: dict[str, _Quantized] = {}
        self._tracks: dict[str, F.Oscillations] = {}
        self._hook: Any = None
        self.oscillations = 0  # codes that flipped back against their previous flip, all steps
        self.flips = 0  # codes that changed, all steps

    # -- the annealing phase -------------------------------------------------------------------
    def annealing(self, ctx: StepContext) -> bool:
        """Whether the step ``ctx`` describes is in CGA's final phase (the last ``cga_steps``
        steps, else the last ``cga_epochs`` epochs). Outside a fit (no ``max_steps``): never."""
        c = self.config
        if c.cga_steps is not None:
            return (
                c.cga_steps > 0
                and ctx.max_steps is not None
                and ctx.step >= ctx.max_steps - c.cga_steps
            )
        if c.cga_epochs == 0 or ctx.max_steps is None:
            return False
        if not ctx.max_epochs or ctx.max_epochs < 0:
            raise ValueError(
                f"plugin {self.name!r}: cga_epochs = {c.cga_epochs} needs trainer.max_epochs, but the fit has none "
                "(it stops by max_steps): set cga_steps instead, or cga_epochs: 0 for no annealing"
            )
        return ctx.epoch >= ctx.max_epochs - c.cga_epochs

    # -- hooks -----------------------------------------------------------------------------------
    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Register :class:`~.functional.StatsQ` on the selected weights, start the oscillation
        counter from the initial codes, and switch CGA on/off before every forward of the model."""
        c = self.config
        for name, layer in select_layers(module.model, c.layers, plugin=self.name):
            if parametrize.is_parametrized(layer, "weight"):
                raise ValueError(
                    f"plugin {self.name!r}: layer {name!r} already has a reparameterization; put ofq first in the "
                    "recipe's plugins (CGA freezes and restores the stored weight, and the oscillation counter "
                    "reads its codes, so StatsQ must act on the stored weight itself)"
                )
            q = F.StatsQ(c.bits, c.boundary_range)
            parametrize.register_parametrization(layer, "weight", q)
            self._quantized[name] = _Quantized(layer, q)
            self._tracks[name] = F.Oscillations.start(
                F.statsq_codes(_stored(layer).detach(), c.bits)
            )

        def switch(model: nn.Module, args: Any) -> None:
            on = self.annealing(ctx) if model.training else False
            for entry in self._quantized.values():
                entry.quantizer.anneal = on

        self._hook = module.model.register_forward_pre_hook(switch)

    @hookimpl
    def reparam_after_step(self, module: Any, ctx: StepContext) -> None:
        """Restore the weights CGA froze (cga.py restores them after ``optimizer.step()``), then
        count the codes that flipped and oscillated at this step."""
        frozen = total = oscillated = flipped = 0
        ema = 0.0
        with torch.no_grad():
            for name, entry in self._quantized.items():
                p = _stored(entry.layer)
                q = entry.quantizer
                if q.frozen is not None:
                    mask, before = _local(q.frozen, p), _local(q.before, p)
                    local = p.to_local() if callable(getattr(p, "to_local", None)) else p
                    local.copy_(torch.where(mask, before, local))
                    frozen += int(q.frozen.sum())
                    q.frozen = q.before = None
                codes = F.statsq_codes(_whole(p.detach()), q.bits)
                state = self._tracks[name]
                if state.codes.device != codes.device:
                    state = F.Oscillations(
                        *(t.to(codes.device) for t in (state.codes, state.direction, state.ema))
                    )
                self._tracks[name], o, f = F.track_oscillations(state, codes, self.config.momentum)
                oscillated, flipped, total = oscillated + o, flipped + f, total + codes.numel()
                ema += float(self._tracks[name].ema.sum())
        self.oscillations += oscillated
        self.flips += flipped
        ctx.log("ofq/oscillations", float(oscillated))
        ctx.log("ofq/flips", float(flipped))
        ctx.log("ofq/oscillation_ema", ema / max(total, 1))
        ctx.log("ofq/frozen_fraction", frozen / max(total, 1))

    @hookimpl
    def reparam_merge(self, model: Any) -> None:
        """Remove the forward pre-hook that switches CGA; the core then folds W_q into the weights."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for entry in self._quantized.values():
            entry.quantizer.anneal = False
            entry.quantizer.frozen = entry.quantizer.before = None

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "oscillations": self.oscillations,
            "flips": self.flips,
            "tracks": {
                name: {"codes": s.codes.cpu(), "direction": s.direction.cpu(), "ema": s.ema.cpu()}
                for name, s in self._tracks.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.oscillations = int(state["oscillations"])
        self.flips = int(state["flips"])
        self._tracks = {
            name: F.Oscillations(t["codes"].clone(), t["direction"].clone(), t["ema"].clone())
            for name, t in state["tracks"].items()
        }
