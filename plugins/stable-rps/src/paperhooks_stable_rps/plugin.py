"""The ``stable-rps`` plugin: :mod:`.functional` wired to the reparameterization hooks."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.utils import parametrize

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks.reparam import Layers, select_layers
from paperhooks_stable_rps import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "stable-rps"

BIBTEX = """\
@inproceedings{desai2024defense,
  title     = {In defense of parameter sharing for model-compression},
  author    = {Desai, Aditya and Shrivastava, Anshumali},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2310.11611},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2310.11611}
}"""


@dataclass(frozen=True)
class StableRpsConfig:
    """Hyper-parameters; defaults are the official code's (``apd10/FakeRoast`` and its driver
    ``apd10/Synaptic-Flow``), see the method card.

    :ivar compression: n/m, the number of selected weights per slot of the shared array
        (m = ⌊n / compression⌋; 1 gives the uncompressed model). The driver's
        ``--compression c`` is 10^c of this.
    :ivar mapping: ``randomfold`` (STABLE-RPS, the code's ``pareto`` mapper) or ``hashednet``
        (one hash per weight: the baseline).
    :ivar grad_scaler: the divisor s_k of slot k's gradient (``v1`` A²/c, the driver's
        default; ``v2`` A; ``v3`` A/c; ``v4`` √B; ``v5`` B; ``none``).
    :ivar init_std: σ_init of z ~ N(0, σ_init²) (``--roast-init-std 0.04``); λ = std(W₀)/σ_init.
    :ivar init: ``random`` (z drawn as above, the code's) or ``project``: z is the least-squares
        fit of the layers' initial weights (exact at compression 1).
    :ivar hash_seed: seed of the hash coefficients and the signs; ``None`` takes the recipe's
        seed. Saved in the checkpoint, identical on every rank.
    :ivar layers: the layers whose weights are shared (the paper shares every Linear, Conv2d
        and Embedding weight, head included).
    """

    compression: float = 10.0
    mapping: Literal["randomfold", "hashednet"] = "randomfold"
    grad_scaler: Literal["v1", "v2", "v3", "v4", "v5", "none"] = "v1"
    init_std: float = 0.04
    init: Literal["random", "project"] = "random"
    hash_seed: int | None = None
    layers: Layers = Layers(types=("Linear", "Conv2d", "Embedding"), skip_head=False)

    def __post_init__(self) -> None:
        owner = type(self).__name__
        c = self.compression
        if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c) or c < 1:
            raise ValueError(f"{owner}.compression must be a finite number >= 1, got {c!r}")
        s = self.init_std
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or s <= 0:
            raise ValueError(f"{owner}.init_std must be a finite number > 0, got {s!r}")
        if self.mapping not in F.MAPPINGS:
            raise ValueError(
                f"{owner}.mapping must be one of {list(F.MAPPINGS)}, got {self.mapping!r}"
            )
        if self.grad_scaler not in F.SCALERS:
            raise ValueError(
                f"{owner}.grad_scaler must be one of {list(F.SCALERS)}, got {self.grad_scaler!r}"
            )
        if self.init not in ("random", "project"):
            raise ValueError(
                f"{owner}.init must be one of ['random', 'project'], got {self.init!r}"
            )
        h = self.hash_seed
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 0):
            raise ValueError(f"{owner}.hash_seed must be an integer >= 0 or null, got {h!r}")


class StableRps(Plugin):
    """STABLE-RPS (Desai & Shrivastava, ICLR 2024): one shared array for every selected weight.

    ``reparam_setup`` lays the selected weights end to end in module order (n positions),
    creates the shared array z (m = ⌊n/compression⌋ entries) as the parameter
    ``model.<stable_rps>_z`` and registers on each layer the parametrization
    W = λ · g ⊙ z[h] (:class:`~paperhooks_stable_rps.functional.SharedWeight`), with h the
    RANDOMFOLD map. The layer's own stored weight is emptied and frozen: z and the biases
    are what trains. Its backward divides z's gradient by the slot's s_k (the paper's
    gradient scaling), so the optimizer sees the scaled gradient whatever it is.

    Everything random (hash coefficients, signs, z's initial values) comes from generators
    seeded by the hash seed and the recipe's seed, so every rank builds the same map and z;
    the seed, m, n and the λ of every layer are the plugin's state, and a checkpoint made
    under another seed rebuilds the map it was trained with.
    """

    Config = StableRpsConfig
    name = NAME
    family: ClassVar[str] = "reparameterization"
    paper: ClassVar[Paper] = Paper(
        title="In defense of parameter sharing for model-compression",
        authors=("Aditya Desai", "Anshumali Shrivastava"),
        year=2024,
        venue="ICLR 2024",
        arxiv="2310.11611",
        bibtex=BIBTEX,
        code="https://github.com/apd10/FakeRoast",
        checked_against=(
            "apd10/FakeRoast @ 158a961 Mapper_v2.py (UHasher, ParetoCyclicMapper = RANDOMFOLD, "
            "HashedNetMapper) and @ 04c2b10 FakeRoast.py (FakeRoast: w = z[IDX]·G; FakeRoastLinear: "
            "scale = req_scale / init_std), @ e642ee4 and 04c2b10 FakeRoastUtil_v2.py (ModelRoaster: "
            "req_scale = std(W), z ~ N(0, init_std²), |z| = int(sparsity·n); "
            "ModelRoasterGradScaler v1–v5; RoastGradScaler.scale_step: grad / (1e-6 + s)); driver "
            "apd10/Synaptic-Flow @ 116ae60 Experiments/singleshot_roast.py and @ f894c6b main.py "
            "(--roast-init-std 0.04, --roast-scaler-mode v1, mapper seed 1011). The paper's method "
            "section was not readable here (a second search reached only the abstract, the "
            "OpenReview reviews and summaries): which scaler mode the paper uses, its optimizers "
            "and learning rates, and the name RANDOMFOLD for the 'pareto' mapper are not checked "
            "against it (see the method card)."
        ),
        verified=False,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: StableRpsConfig

    def __init__(self, config: StableRpsConfig | None = None) -> None:
        super().__init__(config)
        self.hash_seed: int | None = None
        self.array_size = 0  # m
        self.mapped = 0  # n
        self.scales: torch.Tensor | None = None  # [L] λ per layer, float64
        self._parts: list[F.SharedWeight] = []
        self._counts = torch.zeros(0, dtype=torch.float64)  # [m] c_k

    @property
    def attr(self) -> str:
        """Name of the shared array on ``module.model``."""
        return f"{(self.name or NAME).replace('-', '_')}_z"

    # -- the map ------------------------------------------------------------------------------
    def _maps(
        self, seed: int, shapes: list[torch.Size], m: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(index h, sign g) of every layer, from the global positions laid end to end."""
        a = F.hash_coefficients(dist.step_generator(seed, 0, f"{NAME}/hash"))
        n = sum(s.numel() for s in shapes)
        signs = (
            2.0 * torch.randint(0, 2, (n,), generator=dist.step_generator(seed, 0, f"{NAME}/sign"))
            - 1.0
        )
        out, offset = [], 0
        for shape in shapes:
            k = shape.numel()
            positions = torch.arange(offset, offset + k, dtype=torch.int64)
            out.append(
                (
                    F.INDEX[self.config.mapping](positions, m, a).view(shape),
                    signs[offset : offset + k].view(shape),
                )
            )
            offset += k
        return out

    def _grad_factors(
        self, maps: list[tuple[torch.Tensor, torch.Tensor]], scales: torch.Tensor, m: int
    ) -> torch.Tensor:
        index = torch.cat([h.reshape(-1) for h, _ in maps])
        lam = torch.cat(
            [
                torch.full((h.numel(),), float(s), dtype=torch.float64)
                for (h, _), s in zip(maps, scales, strict=True)
            ]
        )
        self._counts, a, b = F.slot_statistics(index, lam, m)
        return 1.0 / F.grad_divisor(self._counts, a, b, self.config.grad_scaler)

    # -- hooks --------------------------------------------------------------------------------
    @hookimpl
    def reparam_setup(self, module: Any, ctx: StepContext) -> None:
        """Create z on ``module.model`` and register W = λ·g⊙z[h] on every selected layer.

        Called once, before sharding and before the optimizer is built, identically on every
        rank (nothing here reads rank-local state).
        """
        cfg = self.config
        model = module.model
        if hasattr(model, self.attr):
            raise ValueError(
                f"plugin {self.name!r}: the model already has an attribute {self.attr!r} (one {NAME} per model)"
            )
        layers = [m for _, m in select_layers(model, cfg.layers, plugin=self.name)]
        for layer in layers:
            if parametrize.is_parametrized(layer, "weight"):
                raise ValueError(
                    f"plugin {self.name!r} replaces the stored weight, so it must be the first reparameterization "
                    f"on a layer; {type(layer).__name__} already has {list(layer.parametrizations.weight)}"
                )
        weights = [layer.weight.detach() for layer in layers]
        n = sum(w.numel() for w in weights)
        m = max(1, int(n / cfg.compression))
        seed = cfg.hash_seed if cfg.hash_seed is not None else ctx.seed
        # λ from rank 0's weights: the map must agree with the z that DDP syncs from rank 0,
        # even where ranks initialized their models differently
        scales = dist.broadcast(
            torch.tensor([_scale(w, cfg.init_std) for w in weights], dtype=torch.float64)
        )
        maps = self._maps(seed, [w.shape for w in weights], m)
        factors = self._grad_factors(maps, scales, m)
        dtype, device = weights[0].dtype, weights[0].device
        if cfg.init == "project":
            total = torch.zeros(m, dtype=torch.float64)
            for w, (h, g), s in zip(weights, maps, scales, strict=True):
                total += F.project(w.cpu(), h, g.to(w.dtype), float(s), m)[0]
            z0 = total / self._counts.clamp_min(1.0)
        else:
            z0 = (
                torch.randn(
                    m,
                    generator=dist.step_generator(ctx.seed, 0, f"{NAME}/init"),
                    dtype=torch.float64,
                )
                * cfg.init_std
            )
        model.register_parameter(self.attr, nn.Parameter(z0.to(device, dtype)))
        self._parts = []
        for layer, (h, g), s in zip(layers, maps, scales, strict=True):
            part = F.SharedWeight(
                model,
                self.attr,
                h.to(device),
                g.to(device, dtype),
                float(s),
                factors.to(device, dtype),
            )
            parametrize.register_parametrization(layer, "weight", part, unsafe=True)
            layer.parametrizations.weight.original.requires_grad_(False)  # empty; z trains instead
            self._parts.append(part)
        self.hash_seed, self.array_size, self.mapped, self.scales = seed, m, n, scales
        self._log(ctx)

    def _log(self, ctx: StepContext | None) -> None:
        if ctx is None:
            return
        c = self._counts
        ctx.log(f"{NAME}/array_size", float(self.array_size))
        ctx.log(f"{NAME}/compression", self.mapped / self.array_size)
        ctx.log(f"{NAME}/max_slot_load", float(c.max()))
        ctx.log(f"{NAME}/empty_slots", float((c == 0).sum()))

    @hookimpl
    def reparam_merge(self, model: Any) -> None:
        """Fold W = λ·g⊙z[h] (and anything stacked on it) into plain weights, then drop z."""
        owned = [
            m
            for m in model.modules()
            if parametrize.is_parametrized(m, "weight")
            and isinstance(m.parametrizations.weight[0], F.SharedWeight)
            and m.parametrizations.weight[0]._owner is model
        ]
        for layer in owned:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
            layer.weight.requires_grad_(True)
        if hasattr(model, self.attr) and owned:
            delattr(model, self.attr)
        self._parts = []

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.hash_seed is None:
            return {}
        return {
            "hash_seed": self.hash_seed,
            "array_size": self.array_size,
            "mapped": self.mapped,
            "mapping": self.config.mapping,
            "scales": self.scales,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Check the checkpoint's z fits this model; rebuild the map from its seed and λ."""
        if not state:
            return
        if not self._parts:
            raise ValueError(f"plugin {self.name!r}: load_state_dict before reparam_setup")
        if (state["array_size"], state["mapped"], state["mapping"]) != (
            self.array_size,
            self.mapped,
            self.config.mapping,
        ):
            raise ValueError(
                f"plugin {self.name!r}: the checkpoint shares {state['mapped']} weights in {state['array_size']} slots "
                f"({state['mapping']}), this model {self.mapped} in {self.array_size} ({self.config.mapping})"
            )
        seed, scales = int(state["hash_seed"]), state["scales"].to(torch.float64)
        if seed == self.hash_seed and torch.equal(scales, self.scales):
            return
        maps = self._maps(seed, [p.index.shape for p in self._parts], self.array_size)
        factors = self._grad_factors(maps, scales, self.array_size)
        for part, (h, g), s in zip(self._parts, maps, scales, strict=True):
            part.index.copy_(h)
            part.sign.copy_(g)
            part.grad_factor.copy_(factors)
            part.scale = float(s)
        self.hash_seed, self.scales = seed, scales


def _scale(weight: torch.Tensor, init_std: float) -> float:
    """λ = std(W₀)/σ_init (``ModelRoaster``: ``req_scale = std(W)``); 1/σ_init·1e-2 if W₀ has no spread."""
    std = float(weight.float().std()) if weight.numel() > 1 else float("nan")
    return (std if math.isfinite(std) and std > 0 else 1e-2) / init_std
