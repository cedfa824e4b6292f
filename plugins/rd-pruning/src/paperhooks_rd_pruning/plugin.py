"""The ``rd-pruning`` plugin: :mod:`.functional` wired to ``pruning_allocate``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from paperhooks import dist, pruning
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_rd_pruning import functional as F

if TYPE_CHECKING:
    from paperhooks.context import StepContext

NAME = "rd-pruning"

BIBTEX = """\
@inproceedings{xu2023efficient,
  title     = {Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks},
  author    = {Xu, Kaixin and Wang, Zhe and Geng, Xue and Wu, Min and Li, Xiaoli and Lin, Weisi},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2023},
  eprint    = {2308.10438},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2308.10438},
}"""


def _int(key: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"RdPruningConfig.{key} must be an integer >= {least}, got {value!r}")


@dataclass(frozen=True)
class RdPruningConfig:
    """Defaults from the official code (Akimoto-Cris/RD_PRUNE, ``iterate.py`` arguments).

    :ivar maxsps: grid of amounts a_d = d/maxsps, d = 0..maxsps, on which each layer's
        distortion curve is measured (official ``--maxsps`` 100).
    :ivar calib_size: calibration samples: ``calib_size`` rows of the unshuffled training set
        taken with stride ``n_train // calib_size`` (rows 0, t, 2t, …, as the official
        ``tools/datasets/cifar10.py`` builds its calibration set; ``--calib_size`` 1024 on
        CIFAR-10 in its README); all of it when smaller.
    :ivar batch_size: rows per forward pass while measuring the curves (memory only).
    :ivar worst_case: δ is the max over samples of the per-sample mean squared output error
        (official ``--worst_case_curve``) instead of its mean.
    """

    maxsps: int = 100
    calib_size: int = 1024
    batch_size: int = 256
    worst_case: bool = False

    def __post_init__(self) -> None:
        _int("maxsps", self.maxsps, 1)
        _int("calib_size", self.calib_size, 1)
        _int("batch_size", self.batch_size, 1)
        if not isinstance(self.worst_case, bool):
            raise ValueError(
                f"RdPruningConfig.worst_case must be true or false, got {self.worst_case!r}"
            )


def _mask_of(layer: torch.nn.Module, name: str) -> pruning.Mask:
    found = [
        p
        for p in getattr(getattr(layer, "parametrizations", None), "weight", ())
        if isinstance(p, pruning.Mask)
    ]
    if not found:
        raise ValueError(f"rd-pruning: layer {name!r} carries no pruning mask")
    return found[-1]


class RdPruning(Plugin):
    """Layer-adaptive sparsity by joint rate-distortion optimization (Xu et al., ICCV 2023).

    An allocation (``pruning_allocate``): whenever the schedule asks for a sparsity s, each
    prunable layer's output-distortion curve δ_l(a_d) is measured on calibration data (the
    layer alone pruned to a_d by the criterion's scores, the rest of the network as masked
    now), and a dynamic program over layers picks the per-layer kept counts minimizing
    Σ_l δ_l under Σ_l kept_l = N − round(s·N) exactly (the paper's problem (1) under its
    additivity property; :func:`.functional.dp_allocation`). Within a layer the lowest scores
    go (the core's magnitude criterion unless a criterion plugin is named), as in the
    official code's ``l1`` ranking.

    Many processes: under DDP each rank measures the curves on its share of the calibration
    rows (rows r, r+R, …); the per-sample sums (or maxima) are all-reduced once
    (``dist.sum_over_ranks`` / ``dist.all_reduce_max``), so every rank solves the same DP on
    the same curves, and rank 0's kept counts are broadcast (identical masks by
    construction). FSDP2 is unsupported: each curve point needs a forward pass with a whole
    layer pruned by its whole-tensor ranking, which sharded rows cannot give without
    gathering every weight (the paper's notes say "summon full params").
    """

    Config = RdPruningConfig
    name = NAME
    family: ClassVar[str] = "pruning"
    paper: ClassVar[Paper] = Paper(
        title="Efficient Joint Optimization of Layer-Adaptive Weight Pruning in Deep Neural Networks",
        authors=("Kaixin Xu", "Zhe Wang", "Xue Geng", "Min Wu", "Xiaoli Li", "Weisi Lin"),
        year=2023,
        venue="ICCV 2023",
        arxiv="2308.10438",
        bibtex=BIBTEX,
        code="https://github.com/Akimoto-Cris/RD_PRUNE",
        checked_against=(
            "official code Akimoto-Cris/RD_PRUNE @ 5bf7b7e: tools/pruners.py gen_rd_curves (grid d/maxsps, "
            "δ = ((Y−Ŷ)²).mean(), worst case = per-sample mean's max, eval mode), tools/algo.py dp_pruning "
            "(layers sorted by size, DP over surviving-weight counts, amounts never below the previous), "
            "tools/common.py (Y = net(x) logits; every Linear/Conv2d, first and last included, no special case), "
            "tools/datasets/cifar10.py (strided calibration subset); "
            "the budget is met exactly here (last DP layer interpolated) where the code keeps ≤ the target"
        ),
        verified=True,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "unsupported",
        "fsdp": "unsupported",
        "deepspeed": "unsupported",
    }

    config: RdPruningConfig

    def __init__(self, config: RdPruningConfig | None = None) -> None:
        super().__init__(config)
        self._module: Any = None
        self._rows: Mapping[str, torch.Tensor] | None = None
        #: the last solution: layer → kept count, and the curves it came from (for inspection)
        self.last_kept: dict[str, int] = {}
        self.last_curves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- wiring ----------------------------------------------------------------------------------
    def attach(self, module: Any, rows: Mapping[str, torch.Tensor] | None = None) -> None:
        """Use ``module`` (a HookedModule whose prunable weights carry masks) and, if given,
        ``rows`` as calibration data (else the training set of ``module.trainer.datamodule``)."""
        self._module, self._rows = module, rows

    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        self.attach(module)

    def _calibration(self) -> dict[str, torch.Tensor]:
        rows = self._rows
        if rows is None:
            rows = self._module.trainer.datamodule.train_set.tensors
        total = next(iter(rows.values())).shape[0]
        n = min(self.config.calib_size, total)
        # rows 0, t, 2t, … (t = total // n), the first n of them: the official calibration subset
        picked = torch.arange(0, total, max(total // max(n, 1), 1))[:n]
        mine = picked[dist.rank() :: dist.world_size()]  # this rank's share of them
        return {k: v[mine] for k, v in rows.items()}

    # -- the curves ------------------------------------------------------------------------------
    @torch.no_grad()
    def curves(
        self, scores: Mapping[str, torch.Tensor], budget: int | None = None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """layer → (kept counts ``[maxsps+1]``, δ ``[maxsps+1]``), reduced over ranks.

        With ``budget`` (K, the weights kept in all), a layer's grid points that keep more
        than K weights are not measured (δ = +inf), except the one nearest above K: the DP
        can never pick them, and the last layer's interpolation at counts ≤ K only needs that
        one. At high sparsity this skips most points of the large layers; the solution is
        the same as with every point measured.
        """
        module, c = self._module, self.config
        if module is None:
            raise RuntimeError("rd-pruning: no module attached (lifecycle_setup was not called)")
        layers = pruning.prunable(module.model)
        rows = self._calibration()
        device = next(module.model.parameters()).device
        batches = [
            {k: v[i : i + c.batch_size].to(device) for k, v in rows.items()}
            for i in range(0, next(iter(rows.values())).shape[0], c.batch_size)
        ]
        was = module.model.training
        module.model.eval()
        try:
            ys = [module.outputs(b)["logits"] for b in batches]
            kept, sums = {}, {}
            for name, s in scores.items():
                mask = _mask_of(layers[name], name)
                n = s.numel()
                alive = int(torch.isfinite(s).sum())
                pruned = F.grid_pruned_counts(n, n - alive, c.maxsps)
                kept[name] = n - pruned
                order = torch.argsort(s.reshape(-1), descending=True, stable=True)
                saved = mask.mask.clone()
                vals = torch.zeros(pruned.numel(), dtype=torch.float64, device=device)
                counts = kept[name].tolist()
                above = [k for k in counts if budget is not None and k > budget]
                try:
                    for d, k in enumerate(counts):
                        if k == alive:  # the current masks: no distortion
                            continue
                        if above and k > min(above):  # unreachable under the budget
                            vals[d] = float("inf")
                            continue
                        keep = torch.zeros(n, dtype=torch.bool, device=saved.device)
                        keep[order[:k].to(saved.device)] = True
                        mask.mask.copy_(keep.view_as(saved) & saved)
                        per = torch.cat(
                            [
                                F.distortion(y, module.outputs(b)["logits"])
                                for y, b in zip(ys, batches, strict=True)
                            ]
                        )
                        vals[d] = per.max() if c.worst_case else per.sum()
                finally:
                    mask.mask.copy_(saved)
                sums[name] = vals
        finally:
            module.model.train(was)
        if c.worst_case:
            stacked = dist.all_reduce_max(torch.stack(list(sums.values())))
        else:
            count = torch.tensor(
                float(sum(b["input"].shape[0] for b in batches) if batches else 0.0),
                dtype=torch.float64,
                device=device,
            )
            red = dist.sum_over_ranks({"dist": torch.stack(list(sums.values())), "count": count})
            stacked = red["dist"] / red["count"].clamp(min=1.0)
        return {k: (kept[k], stacked[i].cpu()) for i, k in enumerate(scores)}

    # -- the hook --------------------------------------------------------------------------------
    @hookimpl
    def pruning_allocate(
        self, scores: Mapping[str, torch.Tensor], sparsity: float, ctx: StepContext
    ) -> Any:
        if pruning.sharded_run(ctx):
            raise ValueError(
                "rd-pruning: FSDP2 is unsupported: each distortion-curve point needs a forward pass with a whole "
                "layer pruned by its whole-tensor ranking (use ddp)"
            )
        names = list(scores)
        total = sum(s.numel() for s in scores.values())
        budget = total - pruning.pruned_count(total, sparsity)
        curves = self.curves(scores, budget)
        alive = [int(torch.isfinite(scores[k]).sum()) for k in names]
        kept = F.dp_allocation(
            [curves[k][0] for k in names], [curves[k][1] for k in names], alive, budget
        )
        counts = dist.broadcast(
            torch.tensor(kept, dtype=torch.int64, device=next(iter(scores.values())).device)
        )
        self.last_kept = dict(zip(names, (int(v) for v in counts.tolist()), strict=True))
        self.last_curves = curves
        for k in names:
            ctx.log(f"rd-pruning/kept/{k}", float(self.last_kept[k]))
        return {k: F.keep_top(scores[k], self.last_kept[k]) for k in names}
