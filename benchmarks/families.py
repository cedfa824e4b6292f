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
- reparameterization: not measured (the page says whether a plugin of the family is installed).

Part of ``benchmarks/run_all.py``; alone: ``python benchmarks/families.py [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import Settings, quiet
from core_overhead import Plain, compare, loader, mlp_case, resnet_case, row
from torch import nn
from torch.nn.utils import parametrize

GOAL = 1.05

# family on the page -> the family name plugins declare
UNMEASURED_FAMILIES = {
    "reparameterization": "reparameterization",
}


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
    steps, warmup, rounds = (20, 5, 3) if s.quick else (60, 10, 7)
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
    times = compare(
        {
            "hand-written": lambda: PlainDPO(make()),
            "plugin": lambda: PreferenceModule(make(), PreferenceObjective(beta=BETA)),
        },
        data,
        rounds=rounds,
        steps=steps,
        warmup=warmup,
        device=s.device,
        seed=s.seed,
    )
    r = row(name, times, "hand-written", "plugin", GOAL)
    r.update(family="preference objective", plugin="core DPO (PreferenceModule)", rounds=rounds, steps=steps, warmup=warmup)
    return r


# -- the part ---------------------------------------------------------------------------------------------
def run(s: Settings) -> dict:
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
    ]
    rows = []
    for fam, plugin, plain_cls, hooked in families:
        for name, make, shape, batch, rounds, steps, warmup in models:
            data = loader(shape, batch * (steps + warmup), batch, seed=s.seed)
            times = compare(
                {
                    "hand-written": lambda make=make, plain_cls=plain_cls: plain_cls(make()),
                    "plugin": lambda make=make, hooked=hooked: hooked(make()),
                },
                data,
                rounds=rounds,
                steps=steps,
                warmup=warmup,
                device=s.device,
                seed=s.seed,
            )
            r = row(name, times, "hand-written", "plugin", GOAL)
            r.update(family=fam, plugin=plugin, rounds=rounds, steps=steps, warmup=warmup)
            rows.append(r)
            print(
                f"  family {fam} ({name}): {r['base_ms']:.2f} ms vs {r['arm_ms']:.2f} ms, "
                f"ratio {r['ratio']['median']:.3f} [{r['ratio']['min']:.3f}, {r['ratio']['max']:.3f}]",
                flush=True,
            )
    r = preference_row(s)
    rows.append(r)
    print(
        f"  family {r['family']} ({r['model']}): {r['base_ms']:.2f} ms vs {r['arm_ms']:.2f} ms, "
        f"ratio {r['ratio']['median']:.3f} [{r['ratio']['min']:.3f}, {r['ratio']['max']:.3f}]",
        flush=True,
    )
    return {"rows": rows, "not_measured": not_measured()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: CUDA is not available here (torch.cuda.is_available() is False)"
        )
    run(Settings(device=args.device, quick=args.quick))


if __name__ == "__main__":
    main()
