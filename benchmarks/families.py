"""Per-family cost: a HookedModule with one plugin vs the same math written inline in a plain
LightningModule. Goal: ratio ≤ 1.05.

- sample weighting: the installed ``loss-reweighting`` plugin (Sow et al., ICLR 2025; LinUpper,
  r = 1, burn-in 0 so it acts from the first step) vs a ``training_step`` that computes the
  same weights and logs the same two diagnostics (weight entropy, effective sample size);
- pruning masks: a pruning-schedule plugin (sparsity rising linearly to 50%, updated every
  ``every`` steps; the core's built-in magnitude criterion and global allocation, masks as
  ``torch.nn.utils.parametrize`` parametrizations) vs a module that registers the same
  masks itself and prunes in ``optimizer_step``;
- preference objective: DPO, the core's base objective for preference data
  (``PreferenceModule``: one policy forward over [chosen; rejected], a frozen reference
  forward, the DPO loss, reward accuracy and margin logged as torchmetrics) vs a
  ``training_step`` that does the same by hand, on a 2-layer GPT-2 (width 64) and synthetic
  preference pairs;
- reparameterization: the installed ``weight-compander`` plugin (Cakaj et al., IJCNN 2023;
  fixed a = 0.8, b = 0.5: w = Ψ(v) = a·arctan(v/b) on every Linear/Conv weight through
  ``torch.nn.utils.parametrize``, v₀ = b·tan(w₀/a), the Eq. 5 decay (λ/2)‖Ψ(v)‖² with
  λ = 1e-4 and the two diagnostics the plugin logs) vs a LightningModule that stores v in
  each layer and computes w = a·arctan(v/b) inline in a forward pre-hook (no parametrize),
  with the same decay and diagnostics.

Before timing, every arm pair runs the same few steps once more (a fresh module each, the
same seed and batches) and the benchmark asserts that both compute the same loss at every
step and the same function afterwards (outputs on the first batch): the hand-written arm
really is the same math.

Part of ``benchmarks/run_all.py``; alone: ``python benchmarks/families.py [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from _common import Settings, bench_trainer, quiet
from core_overhead import Plain, compare, loader, mlp_case, resnet_case, row
from torch import nn
from torch.nn.utils import parametrize

GOAL = 1.05

# family on the page -> the family name plugins declare
UNMEASURED_FAMILIES: dict[str, str] = {}  # every family of the issue has an arm now


def not_measured() -> dict[str, str]:
    """Why each family without an arm here is not measured, from the plugins installed now."""
    try:
        from paperhooks.discovery import list_plugins

        installed = list_plugins()
    except Exception:  # noqa: BLE001 - the reason below stays true without the list
        installed = []
    out = {}
    for label, family in UNMEASURED_FAMILIES.items():
        plugins = [p for p in installed if p.family == family]
        if label == "preference objective":  # objective plugins that are preference objectives
            plugins = [p for p in plugins if "preference" in p.paper.lower() or "dpo" in p.name]
        names = sorted(p.name for p in plugins)
        out[label] = (
            f"not measured: no benchmark arm yet (installed: {', '.join(names)})"
            if names
            else "not measured: no plugin yet"
        )
    return out


# -- sample weighting ---------------------------------------------------------------------------------
class PlainReweighting(Plain):
    """Loss-based weights (LinUpper, r = 1, δ = 1) written inline: what a user would hand-write."""

    def training_step(self, batch, batch_idx):
        losses = F.cross_entropy(self(batch["input"]), batch["target"], reduction="none")
        ell = losses.detach()
        lo, hi = ell.min(), ell.max()
        h = (2.0 * ell - hi - lo) / (hi - lo).clamp_min(1e-6)  # in [-1, 1]
        f = torch.clamp(h + 1.0, max=1.0)  # LinUpper
        w = torch.softmax(f - f.max(), dim=0)  # r = 1
        loss = (w * losses).sum() / w.sum()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("weights/entropy", -torch.special.xlogy(w, w).sum(), on_step=True, on_epoch=False)
        self.log("weights/ess", w.sum() ** 2 / (w**2).sum(), on_step=True, on_epoch=False)
        return loss


def reweighting_plugin():
    from paperhooks_loss_reweighting import LossReweighting, LossReweightingConfig

    p = LossReweighting(LossReweightingConfig(burnin_steps=0))
    p.name = "loss-reweighting"
    return p


# -- pruning --------------------------------------------------------------------------------------------
FINAL, EVERY = 0.5, 5


@dataclass(frozen=True)
class RampConfig:
    final: float = FINAL
    every: int = EVERY


def pruning_plugin():
    """A schedule-only pruning plugin (like the core tests' StepPruning): criterion and
    allocation are the core's built-in magnitude scores and global threshold."""
    from paperhooks.plugin import Plugin, hookimpl

    class RampPruning(Plugin):
        Config = RampConfig
        family = "pruning"
        name = "ramp-pruning"

        @hookimpl
        def pruning_schedule(self, ctx):
            if ctx.step % self.config.every:
                return None
            return self.config.final * ctx.progress

    return RampPruning()


class _KeepMask(nn.Module):
    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape, dtype=torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class PlainPruning(Plain):
    """Global magnitude pruning written by hand: masks as parametrizations, ramp schedule,
    one global threshold over every Linear/Conv weight, pruned weights stay pruned."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
        self.layers = [m for m in model.modules() if isinstance(m, kinds)]
        self.keep = []
        for m in self.layers:
            mask = _KeepMask(m.weight.shape)
            parametrize.register_parametrization(m, "weight", mask)
            self.keep.append(mask)
        self.sparsity = 0.0

    def optimizer_step(self, *args, **kwargs):
        super().optimizer_step(*args, **kwargs)
        step = self.global_step + 1
        if step % EVERY:
            return
        target = FINAL * min(1.0, step / self.trainer.max_steps)
        if target == self.sparsity:
            return
        with torch.no_grad():
            scores = [
                m.weight.abs() for m in self.layers
            ]  # the masked weight, as the core scores it
            flat = torch.cat([s.reshape(-1) for s in scores])
            order = torch.argsort(flat, descending=True, stable=True)
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[order[: round((1.0 - target) * flat.numel())]] = True
            offset = 0
            for s, mask in zip(scores, self.keep, strict=True):
                mask.mask &= keep[offset : offset + s.numel()].view_as(s)
                offset += s.numel()
            total = sum(k.mask.numel() for k in self.keep)
            self.sparsity = sum(int((~k.mask).sum()) for k in self.keep) / total
        self.log("pruning/sparsity", self.sparsity, on_step=True, on_epoch=False)


# -- reparameterization ----------------------------------------------------------------------------------
A, B, WD = 0.8, 0.5, 1e-4  # Ψ(v) = A·arctan(v/B); decay (WD/2)‖Ψ(v)‖² (the plugin's defaults)
NEAR_ZERO = 1e-2  # |w| below this counts as near zero in the logged fraction (the plugin's)
REPARAM_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def compander_plugin():
    from paperhooks_weight_compander import WeightCompander, WeightCompanderConfig

    p = WeightCompander(WeightCompanderConfig(a=A, b=B, weight_decay=WD))
    p.name = "weight-compander"
    return p


def _compand_weight(layer: nn.Module, _inputs) -> None:
    """Forward pre-hook: the layer's weight for this forward, w = A·arctan(v/B) (Eq. 1)."""
    layer.weight = A * torch.atan(layer.v / B)


class PlainCompander(Plain):
    """Weight Compander written by hand: every Linear/Conv layer stores v = B·tan(w₀/A) (Eq. 4)
    in place of its weight and computes w = A·arctan(v/B) before each forward; the loss adds
    (WD/2)·Σ‖w‖² (Eq. 5) and the step logs the same two diagnostics the plugin logs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.layers = [m for m in model.modules() if isinstance(m, REPARAM_KINDS)]
        for m in self.layers:
            w = m.weight.detach()
            del m._parameters["weight"]
            m.v = nn.Parameter(B * torch.tan(w / A))
            m.weight = A * torch.atan(m.v / B)  # a plain attribute, recomputed every forward
            m.register_forward_pre_hook(_compand_weight)

    def training_step(self, batch, batch_idx):
        ce = F.cross_entropy(self(batch["input"]), batch["target"], reduction="none").mean()
        ws = [m.weight for m in self.layers]  # this forward's w
        decay = 0.5 * WD * sum((w * w).sum() for w in ws)
        self.log("train/loss", ce.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/weight_decay", decay.detach(), on_step=True, on_epoch=True)
        with torch.no_grad():
            near = sum((w.abs() < NEAR_ZERO).sum() for w in ws) / sum(w.numel() for w in ws)
            biggest = torch.stack([w.abs().max() for w in ws]).max()
        self.log("compander/near_zero_fraction", near, on_step=True, on_epoch=False)
        self.log("compander/max_abs_weight", biggest, on_step=True, on_epoch=False)
        return ce + decay


# -- same math? -------------------------------------------------------------------------------------------
CHECK_STEPS = EVERY  # the pruning arm updates its masks once in as many steps
CHECK_TOL = 1e-4


class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


def _fit_steps(module: L.LightningModule, data, steps: int, device: str) -> list[float]:
    rec = _Losses()
    bench_trainer(steps, device, rec).fit(module, data)
    return rec.losses


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def same_math(arms: dict, data, probe, s: Settings, steps: int = CHECK_STEPS) -> dict:
    """Run both arms ``steps`` steps (fresh modules, the same seed and batches); the largest
    relative difference of their per-step losses and of ``probe(module)`` afterwards.

    Raises ``AssertionError`` above ``CHECK_TOL``: then the two arms do not compute the same
    thing and their times cannot be compared.
    """
    losses, outs = {}, {}
    for name, make in arms.items():
        torch.manual_seed(s.seed)
        module = make()
        losses[name] = torch.tensor(_fit_steps(module, data, steps, s.device), dtype=torch.float64)
        module.eval()
        with torch.no_grad():
            outs[name] = probe(module).double().cpu()
    (a, b) = arms
    if len(losses[a]) != steps or len(losses[b]) != steps:
        raise AssertionError(
            f"same_math: {steps} steps expected, got {len(losses[a])} and {len(losses[b])}"
        )
    check = {
        "steps": steps,
        "loss_rel": _rel(losses[b], losses[a]),
        "output_rel": _rel(outs[b], outs[a]),
    }
    if not (check["loss_rel"] <= CHECK_TOL and check["output_rel"] <= CHECK_TOL):
        raise AssertionError(
            f"same_math: {a} and {b} differ after {steps} steps (relative L2: losses "
            f"{check['loss_rel']:.2e}, outputs {check['output_rel']:.2e}; tolerance {CHECK_TOL:g})"
        )
    return check


# -- preference objective ---------------------------------------------------------------------------------
BETA = 0.1


class PlainDPO(Plain):
    """DPO written by hand in a LightningModule: what a user would write without paperhooks."""

    def __init__(self, policy: nn.Module) -> None:
        import copy

        import torchmetrics

        super().__init__(policy)
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval()
        self.acc, self.margin = torchmetrics.MeanMetric(), torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        att = torch.cat([batch["chosen_attention"], batch["rejected_attention"]])
        mask = torch.cat([batch["chosen_mask"], batch["rejected_mask"]]).float()
        b = batch["chosen_ids"].shape[0]
        logp = (self.model(ids, att) * mask).sum(1)
        with torch.no_grad():
            ref = (self.reference(ids, att) * mask).sum(1)
        h = (logp[:b] - ref[:b]) - (logp[b:] - ref[b:])
        loss = -F.logsigmoid(BETA * h).mean()
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, prog_bar=True)
        self.acc((h.detach() > 0).float())
        self.margin(BETA * h.detach())
        self.log("train/reward_acc", self.acc, on_step=False, on_epoch=True)
        self.log("train/reward_margin", self.margin, on_step=False, on_epoch=True)
        return loss


def preference_case(s: Settings) -> tuple:
    """(name, policy factory, data loader, rounds, steps, warm-up) of the DPO arm."""
    from paperhooks.tasks import build_datamodule, build_model
    from paperhooks.tasks.sampler import collate

    batch = 32
    steps, warmup = (20, 5) if s.quick else (60, 10)
    rounds = s.pick_rounds(3, 7)
    dm = build_datamodule(
        "synthetic-preferences", {"n_train": batch * (steps + warmup), "batch_size": batch}, s.seed
    )
    data = torch.utils.data.DataLoader(dm.train_set, batch_size=batch, collate_fn=collate)

    def make() -> nn.Module:
        return build_model("causal-lm", {"layers": 2, "width": 64}, dm.info)

    return "gpt2 2x64", make, data, rounds, steps, warmup


def preference_row(s: Settings) -> dict:
    from paperhooks.preference import PreferenceModule, PreferenceObjective

    name, make, data, rounds, steps, warmup = preference_case(s)
    arms = {
        "hand-written": lambda: PlainDPO(make()),
        "plugin": lambda: PreferenceModule(make(), PreferenceObjective(beta=BETA)),
    }
    first = next(iter(data))

    def probe(m):
        return m.model(first["chosen_ids"].to(m.device), first["chosen_attention"].to(m.device))

    check = same_math(arms, data, probe, s)
    times = compare(
        arms,
        data,
        rounds=rounds,
        steps=steps,
        warmup=warmup,
        device=s.device,
        seed=s.seed,
    )
    r = row(name, times, "hand-written", "plugin", GOAL)
    r.update(
        family="preference objective",
        plugin="core DPO (PreferenceModule)",
        rounds=rounds,
        steps=steps,
        warmup=warmup,
        check=check,
    )
    return r


# -- the part ---------------------------------------------------------------------------------------------
FAMILIES = ("sample weighting", "pruning masks", "reparameterization", "preference objective")


def run(s: Settings, only: tuple[str, ...] = ()) -> dict:
    """Every family's rows (``only``: just these families, for debugging and profiling)."""
    from paperhooks import HookedModule

    quiet()
    models = [mlp_case(s)] if s.quick else [mlp_case(s), resnet_case(s)]
    families = [
        (
            "sample weighting",
            "loss-reweighting",
            PlainReweighting,
            lambda model: HookedModule(model, [reweighting_plugin()]),
        ),
        (
            "pruning masks",
            "ramp schedule + built-in magnitude / global allocation",
            PlainPruning,
            lambda model: HookedModule(model, [pruning_plugin()]),
        ),
        (
            "reparameterization",
            f"weight-compander (a={A:g}, b={B:g}, λ={WD:g})",
            PlainCompander,
            lambda model: HookedModule(model, [compander_plugin()]),
        ),
    ]
    if only:
        families = [f for f in families if f[0] in only]
    rows = []
    for fam, plugin, plain_cls, hooked in families:
        for name, make, shape, batch, rounds, steps, warmup in models:
            data = loader(shape, batch * (steps + warmup), batch, seed=s.seed)
            arms = {
                "hand-written": lambda make=make, plain_cls=plain_cls: plain_cls(make()),
                "plugin": lambda make=make, hooked=hooked: hooked(make()),
            }
            first = next(iter(data))["input"]
            check = same_math(arms, data, lambda m, x=first: m.model(x.to(m.device)), s)
            times = compare(
                arms,
                data,
                rounds=rounds,
                steps=steps,
                warmup=warmup,
                device=s.device,
                seed=s.seed,
            )
            r = row(name, times, "hand-written", "plugin", GOAL)
            r.update(
                family=fam, plugin=plugin, rounds=rounds, steps=steps, warmup=warmup, check=check
            )
            rows.append(r)
            _print(r)
    if not only or "preference objective" in only:
        r = preference_row(s)
        rows.append(r)
        _print(r)
    return {"rows": rows, "not_measured": not_measured()}


def _print(r: dict) -> None:
    c = r["check"]
    print(
        f"  family {r['family']} ({r['model']}): {r['base_ms']:.2f} ms vs {r['arm_ms']:.2f} ms, "
        f"ratio {r['ratio']['median']:.3f} [{r['ratio']['min']:.3f}, {r['ratio']['max']:.3f}]; "
        f"same math over {c['steps']} steps: losses {c['loss_rel']:.1e}, outputs {c['output_rel']:.1e}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--family", nargs="+", choices=FAMILIES, default=(), help="only these families")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available here (torch.cuda.is_available() is False)"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    run(Settings(device=args.device, quick=args.quick), only=tuple(args.family))


if __name__ == "__main__":
    main()
