"""The ``kernel-balancing`` plugin: :mod:`.functional` wired to the sample-weighting hook."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch

from paperhooks import dist
from paperhooks.plugin import Paper, Plugin, Support, hookimpl
from paperhooks_kernel_balancing import functional as F
from paperhooks_kernel_balancing.features import all_pairs, fit_embeddings, pair_features

if TYPE_CHECKING:
    from paperhooks.context import StepContext

BIBTEX = """\
@inproceedings{li2024debiased,
  title     = {Debiased Collaborative Filtering with Kernel-Based Causal Balancing},
  author    = {Li, Haoxuan and Zheng, Chunyuan and Xiao, Yanghao and Wu, Peng and Geng, Zhi
               and Chen, Xu and Cui, Peng},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  eprint    = {2404.19596},
  archivePrefix = {arXiv},
  url       = {https://arxiv.org/abs/2404.19596}
}"""

EVAL_CENTERS = 256  # kernel functions on which the logged imbalance is measured


def _positive(owner: str, name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}.{name} must be a finite number {bound}, got {value!r}")


def _count(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class KernelBalancingConfig:
    """Hyper-parameters. Where the official code has a value it is named; see the method card
    for why ``gamma``, ``num_centers`` and ``tolerance`` differ from its mini-batch values.

    :ivar gamma: γ, weight of the balancing penalty against the entropy (code ``gamma``, 1 per
        mini-batch step). 0 skips the fit: uniform weights (with ``inverse_propensity``: IPS).
    :ivar tolerance: C, imbalance allowed per kernel function (code ``C``: default 1e-5,
        Coat notebook 1e-2).
    :ivar num_centers: J kernel functions drawn per fit step (code ``J`` = 3 per mini-batch).
    :ivar kernel: ``gaussian`` exp(−σ‖a−b‖²) or ``exponential`` exp(−σ‖a−b‖) (code ``_Gau``/``_Exp``).
    :ivar bandwidth: σ (code: ``gamma=0.1`` of ``gau_kernel`` / ``exp_kernel``).
    :ivar hinge: ``each`` (one constraint per function) or ``sum`` (the code's hinge on the
        summed imbalance).
    :ivar fit_steps: Adam steps of the weight fit over all observed pairs.
    :ivar fit_lr: its learning rate (code ``lr2`` default 0.05).
    :ivar center_pool: pairs the centers are drawn from (all pairs when there are fewer); their
        kernel rows are computed once (the code draws from a fresh sample of G·B = 640 pairs).
    :ivar feature_dim: rank of the matrix factorization whose embeddings are the covariates
        (code ``embedding_k`` = 4).
    :ivar feature_steps: full-batch Adam steps of that factorization.
    :ivar inverse_propensity: multiply by 1/``batch["propensity"]``: IPS, the paper's baseline
        when ``gamma`` is 0. The code multiplies its weight model by ``inv_prop`` *before*
        balancing; the fit here does not see the propensities, so both together correct twice.
    """

    gamma: float = 10.0
    tolerance: float = 1e-3
    num_centers: int = 64
    kernel: Literal["gaussian", "exponential"] = "gaussian"
    bandwidth: float = 0.1
    hinge: Literal["each", "sum"] = "each"
    fit_steps: int = 300
    fit_lr: float = 0.05
    center_pool: int = 2048
    feature_dim: int = 4
    feature_steps: int = 300
    inverse_propensity: bool = False

    def __post_init__(self) -> None:
        owner = type(self).__name__
        _positive(owner, "gamma", self.gamma, allow_zero=True)
        _positive(owner, "tolerance", self.tolerance, allow_zero=True)
        _positive(owner, "bandwidth", self.bandwidth)
        _positive(owner, "fit_lr", self.fit_lr)
        _count(owner, "num_centers", self.num_centers, 1)
        _count(owner, "fit_steps", self.fit_steps, 0)
        _count(owner, "center_pool", self.center_pool, 1)
        _count(owner, "feature_dim", self.feature_dim, 1)
        _count(owner, "feature_steps", self.feature_steps, 0)
        if self.kernel not in F.KERNELS:
            raise ValueError(
                f"{owner}.kernel must be one of {sorted(F.KERNELS)}, got {self.kernel!r}"
            )
        if self.hinge not in ("each", "sum"):
            raise ValueError(f"{owner}.hinge must be one of ['each', 'sum'], got {self.hinge!r}")
        if not isinstance(self.inverse_propensity, bool):
            raise ValueError(
                f"{owner}.inverse_propensity must be true or false, got {self.inverse_propensity!r}"
            )


class KernelBalancing(Plugin):
    """Kernel-balancing weights for debiased recommendation (KBIPS, Li et al., ICLR 2024).

    Once, before the first weighted step, the plugin fits covariates x for every user-item
    pair (:func:`~paperhooks_kernel_balancing.features.fit_embeddings` on the observed
    ratings) and then the weights w of the n observed pairs that minimize the entropy
    (1/n) Σ w log w plus γ times the imbalance, beyond C, of J random Gaussian-kernel
    functions between the weighted observed pairs and all pairs
    (:func:`~paperhooks_kernel_balancing.functional.fit_balancing_weights`). Each step it
    returns the weights of the batch's rows (``batch["index"]``), times 1/propensity with
    ``inverse_propensity``; the core computes Σ w ℓ / Σ w over the global batch.

    The fit reads the whole observed set, which every process holds, draws its centers from
    generators seeded by the recipe's seed, and rank 0's result is broadcast, so all ranks
    use the same weights. They are the plugin's state, saved in checkpoints, so a resumed
    run does not refit.

    Data contract: the training set rows are observed pairs with ``input`` = (user, item) ids
    ``[N, 2]`` and ``target`` = rating; the data's ``info`` has ``num_users`` and ``num_items``
    (dataset ``synthetic-recsys`` does). Outside a recipe, call :meth:`fit` first.
    """

    Config = KernelBalancingConfig
    name = "kernel-balancing"
    family: ClassVar[str] = "sample-weighting"
    paper: ClassVar[Paper] = Paper(
        title="Debiased Collaborative Filtering with Kernel-Based Causal Balancing",
        authors=(
            "Haoxuan Li",
            "Chunyuan Zheng",
            "Yanghao Xiao",
            "Peng Wu",
            "Zhi Geng",
            "Xu Chen",
            "Peng Cui",
        ),
        year=2024,
        venue="ICLR 2024",
        arxiv="2404.19596",
        bibtex=BIBTEX,
        code="https://github.com/haoxuanli-pku/ICLR24-Kernel-Balancing",
        checked_against=(
            "haoxuanli-pku/ICLR24-Kernel-Balancing @ fabfb43: matrix_factorization_coat.py "
            "(MF_KBIPS_Gau / MF_KBIPS_Exp: get_embedding, gau_kernel, exp_kernel, h_all, h_obs, "
            "loss_ker_bal, loss_weight_model, _compute_IPS, fit defaults G=5 gamma=1 C=1e-5 J=3 "
            "lr2=0.05) and coat.ipynb (KBIPS: gamma=1, J=3, C=1e-2, lr2=5e-3, batch 128). "
            "The paper's full text was not readable here (abstract and summaries only; re-checked "
            "in session 6: the stored ar5iv copy returns its opening only); the "
            "objective is the code's. Deviations (full-data fit of free weights instead of a "
            "mini-batch weight model, per-function hinge, standardized MF covariates, γ/J/C) "
            "are in the method card."
        ),
        verified=False,
    )
    strategies: ClassVar[Mapping[str, Support]] = {
        "single": "tested",
        "ddp": "tested",
        "fsdp2": "tested",
        # nothing strategy-specific beyond indexing a replicated vector and one broadcast
        "fsdp": "untested",
        "deepspeed": "untested",
    }

    config: KernelBalancingConfig

    def __init__(self, config: KernelBalancingConfig | None = None) -> None:
        super().__init__(config)
        self.weights: torch.Tensor | None = None  # [n], mean 1, one per training row
        self.diagnostics: dict[str, float] = {}
        self._source: tuple[torch.Tensor, torch.Tensor, int, int] | None = None

    # -- the fit ------------------------------------------------------------------------------
    def fit(
        self,
        pairs: torch.Tensor,
        ratings: torch.Tensor,
        num_users: int,
        num_items: int,
        seed: int = 0,
    ) -> torch.Tensor:
        """Fit and keep the weights of the observed ``pairs`` ``[n, 2]`` (in row order).

        Deterministic in (data, ``seed``, config); computed on CPU in float64.
        :return: ``[n]`` float32 weights of mean 1.
        """
        cfg = self.config
        pairs = pairs.detach().cpu().long()
        if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
            raise ValueError(
                f"{F.PLUGIN}: observed pairs must have shape [n, 2] with n >= 1, got {tuple(pairs.shape)}"
            )
        if cfg.gamma == 0:  # nothing to balance: uniform weights, no covariates needed
            self.weights, self.diagnostics = torch.ones(pairs.shape[0]), {"ess_fraction": 1.0}
            return self.weights
        users, items = fit_embeddings(
            pairs,
            ratings,
            num_users,
            num_items,
            dim=cfg.feature_dim,
            steps=cfg.feature_steps,
            generator=dist.step_generator(seed, 0, "kernel-balancing/features"),
        )
        x_obs = pair_features(users, items, pairs)  # [n, d]
        x_all = pair_features(users, items, all_pairs(num_users, num_items))  # [M, d]
        w = F.fit_balancing_weights(
            x_obs,
            x_all,
            gamma=cfg.gamma,
            tolerance=cfg.tolerance,
            num_centers=cfg.num_centers,
            steps=cfg.fit_steps,
            lr=cfg.fit_lr,
            kernel=cfg.kernel,
            bandwidth=cfg.bandwidth,
            hinge=cfg.hinge,
            center_pool=cfg.center_pool,
            generator=dist.step_generator(seed, 0, "kernel-balancing/centers"),
        )
        g = dist.step_generator(seed, 0, "kernel-balancing/eval")
        centers = x_all[torch.randint(x_all.shape[0], (EVAL_CENTERS,), generator=g)]
        before = F.imbalance(torch.ones_like(w), x_obs, x_all, centers, cfg.kernel, cfg.bandwidth)
        after = F.imbalance(w, x_obs, x_all, centers, cfg.kernel, cfg.bandwidth)
        self.diagnostics = {
            "imbalance_before": float(before.abs().mean()),
            "imbalance_after": float(after.abs().mean()),
            "ess_fraction": float(F.effective_sample_size(w) / w.numel()),
        }
        self.weights = w.float()
        return self.weights

    def _fit_from(self, module: Any, ctx: StepContext, device: torch.device) -> None:
        source = self._source or _observed_set(module)
        self.fit(*source, seed=ctx.seed)
        # bit-identical on every rank even if floating point differed between machines
        self.weights = dist.broadcast(self.weights.to(device))
        for k, v in self.diagnostics.items():
            ctx.log(f"{F.PLUGIN}/{k}", v)

    # -- hooks --------------------------------------------------------------------------------
    @hookimpl
    def lifecycle_setup(self, module: Any, ctx: StepContext) -> None:
        """Check the data contract before training starts (the fit itself waits for step 1).
        A module set up outside a fit (``paperhooks export`` rebuilding the model) has no data
        to check, and needs none."""
        if self.weights is None and _trainer_of(module) is not None:
            self._source = _observed_set(module)

    @hookimpl
    def weighting_sample_weights(
        self, losses: torch.Tensor, batch: Mapping[str, torch.Tensor], module: Any, ctx: StepContext
    ) -> torch.Tensor:
        """w of this rank's rows: the fitted weights at ``batch["index"]`` (÷ propensity)."""
        if self.weights is None:
            self._fit_from(module, ctx, losses.device)
        if "index" not in batch:
            raise ValueError(f"{F.PLUGIN}: the batch has no 'index' (row of the training set)")
        index = batch["index"].to(self.weights.device)
        if index.numel() and (index.min() < 0 or index.max() >= self.weights.numel()):
            raise ValueError(
                f"{F.PLUGIN}: batch index out of range for {self.weights.numel()} fitted weights; "
                "the weights belong to another training set"
            )
        w = self.weights[index].to(losses.device, losses.dtype)  # [B]
        bad_p = torch.zeros((), device=w.device)
        if self.config.inverse_propensity:
            p = _propensity(batch, losses)  # [B]
            bad_p = (~((p > 0) & (p <= 1))).sum()
            w = w / p
        # one collective for the global checks and the logged ESS: every rank then raises
        # together on bad inputs instead of leaving the others waiting
        local = [
            (~torch.isfinite(losses)).sum(),
            bad_p,
            w.sum(),
            (w * w).sum(),
            torch.tensor(w.numel()),
        ]
        bad, bad_p, w_sum, w_sq, count = dist.all_reduce_sum(
            torch.stack([t.double().to(w.device) for t in local])
        ).tolist()
        if bad:
            raise ValueError(
                f"{F.PLUGIN}: {int(bad)} per-sample losses of the global batch are NaN or inf"
            )
        if bad_p:
            raise ValueError(
                f"{F.PLUGIN}: {int(bad_p)} propensities of the global batch lie outside (0, 1]"
            )
        if w_sq > 0:
            ctx.log(f"{F.PLUGIN}/batch_ess_fraction", w_sum**2 / w_sq / count)
        return w

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.weights is None:
            return {}
        return {"weights": self.weights, **self.diagnostics}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "weights" not in state:
            return
        device = self.weights.device if self.weights is not None else state["weights"].device
        self.weights = state["weights"].to(device)
        self.diagnostics = {k: float(v) for k, v in state.items() if k != "weights"}


def _trainer_of(module: Any) -> Any:
    try:
        return module.trainer
    except (AttributeError, RuntimeError):  # not a LightningModule attached to a Trainer
        return None


def _observed_set(module: Any) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(pairs, ratings, num_users, num_items) of the training set the trainer fits on."""
    dm = getattr(_trainer_of(module), "datamodule", None)
    info = getattr(dm, "info", None)
    train = getattr(dm, "train_set", None)
    tensors = getattr(train, "tensors", {})
    if not (
        hasattr(info, "num_users")
        and hasattr(info, "num_items")
        and "input" in tensors
        and "target" in tensors
    ):
        raise ValueError(
            f"{F.PLUGIN}: needs recommendation data whose info gives num_users and num_items and "
            "whose training rows are (user, item) pairs with ratings (e.g. data: synthetic-recsys); "
            "outside a recipe call KernelBalancing.fit(pairs, ratings, num_users, num_items) first"
        )
    pairs = tensors["input"]
    if pairs.dim() != 2 or pairs.shape[1] != 2 or pairs.is_floating_point():
        raise ValueError(
            f"{F.PLUGIN}: training inputs must be [N, 2] (user, item) ids, got {tuple(pairs.shape)} {pairs.dtype}"
        )
    return pairs, tensors["target"].float(), int(info.num_users), int(info.num_items)


def _propensity(batch: Mapping[str, torch.Tensor], losses: torch.Tensor) -> torch.Tensor:
    p = batch.get("propensity")
    if p is None:
        raise ValueError(f"{F.PLUGIN}: inverse_propensity is on, but the batch has no 'propensity'")
    return p.to(losses.device, losses.dtype)
