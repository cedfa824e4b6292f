"""Gradient surgery: step time and peak memory for K objectives, paperhooks vs the peers.

The model is multi-task style: a shared trunk (an MLP, and in the full run also a timm
resnet18 on 3×32×32) and K linear heads, one cross-entropy loss per head, on one fixed batch.
Every arm does a whole training step (forward, gradients, SGD step) on its own copy of the
same initial weights:

- ``one backward``: ``(Σ_k L_k).backward()``, the cost of training without surgery;
- ``K backward``: ``L_k.backward(retain_graph=True)`` for each k (the K gradients, nothing else);
- ``paperhooks batched`` / ``paperhooks loop``: ``paperhooks.gradients.Engine("batched")``
  (one vmapped vector-Jacobian product over the K objectives) and ``Engine("loop")`` (K
  ``autograd.grad`` calls), with MGDA as the surgery chain:
  ``grads.combine(min_norm_weights(grads.gram()))``, on the trunk's parameters (the
  surgery set, as a ``surgery_parameters`` hook would select), then ``write_grads``;
- ``TorchJD``: ``torchjd.autojac.mtl_backward`` (features = the trunk's output) then
  ``jac_to_grad(trunk parameters, MGDA())`` (torchjd 0.18's API);
- ``LibMTL``: LibMTL's ``HPS`` architecture combined with its ``MGDA`` weighting the way
  ``LibMTL.Trainer`` combines them (``class MTLmodel(HPS, MGDA)``), ``mgda_gn='none'``,
  losses in a ``[K]`` tensor, ``model.backward(losses, mgda_gn='none')``.

Before timing, every K is checked: the trunk's update direction of paperhooks (both engines),
TorchJD and LibMTL must agree within :data:`TOL` (relative L2 distance to paperhooks
batched); the result is printed and recorded. Goal: paperhooks faster than both peers at
every K, and within 1.2× of the K backward passes.

Part of ``benchmarks/run_all.py``; alone: ``python benchmarks/surgery.py [--device cpu|cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    Settings,
    memory_method,
    paired_ratios,
    peak_step_memory,
    quiet,
    round_robin,
    summary,
)
from torch import nn

GOAL_VS_K_BACKWARD = 1.2
KS = (2, 4, 8)
TOL = 2e-2  # relative L2 distance between MGDA directions of different solvers (see check())
CLASSES = 10
LR = 1e-3

ARMS = ("one backward", "K backward", "paperhooks batched", "paperhooks loop", "TorchJD", "LibMTL")


# -- LibMTL on a modern torch ------------------------------------------------------------------------------
LIBMTL_SHIMS = (
    "LibMTL 1.1.5 imports `torchvision.models.utils`, which torchvision removed: before importing "
    "it the benchmark installs a one-function module under that name in `sys.modules` "
    "(`load_state_dict_from_url = torch.hub.load_state_dict_from_url`; nothing is downloaded). "
    "It also expects torch 1.x's `Module.zero_grad()`, which zeroed gradients in place: since "
    "torch 2.0 it sets them to `None` and `AbsWeighting._reset_grad` then fails on "
    "`param.grad.data`, so the benchmark's `MTLmodel` overrides `zero_grad_share_params` with "
    "`self.encoder.zero_grad(set_to_none=False)`, the behaviour LibMTL was written for."
)


def import_libmtl():
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = shim
    from LibMTL.architecture import HPS
    from LibMTL.weighting import MGDA

    return HPS, MGDA


# -- the model ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    make_trunk: Callable[[], nn.Module]
    features: int
    input_shape: tuple[int, ...]
    batch: int
    rounds: int
    steps: int  # at most, per arm and round (fewer for a slow arm: see target_s)
    warmup: int
    target_s: float  # aimed-at seconds per arm and round


def mlp_trunk(d_in: int, hidden: int, depth: int, d_out: int) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        width = d_in
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers += [nn.Linear(width, d_out), nn.ReLU()]
        return nn.Sequential(*layers)

    return make


def resnet_trunk() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=0)  # [B, 512] features


class MTLNet(nn.Module):
    def __init__(self, trunk: nn.Module, heads: list[nn.Module]) -> None:
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f = self.trunk(x)
        return f, [h(f) for h in self.heads]


def reference(
    case: Case, k: int, device: str, seed: int
) -> tuple[MTLNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    net = MTLNet(case.make_trunk(), [nn.Linear(case.features, CLASSES) for _ in range(k)]).to(
        device
    )
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.batch, *case.input_shape, generator=g).to(device)
    y = torch.randint(0, CLASSES, (case.batch, k), generator=g).to(device)
    return net, x, y


def mgda_chain():
    from paperhooks.gradients import min_norm_weights

    def mgda(grads, ctx):
        # The K×K Gram matrix goes to the CPU: min_norm_weights builds its weight vector on
        # the CPU, so a CUDA Gram matrix would meet a CPU vector in `gram @ alpha`.
        return grads.combine(min_norm_weights(grads.gram().cpu()))

    return [mgda]


class Arm:
    """One method on its own copy of the reference model: ``grads()`` fills ``.grad``; ``step()``
    is a whole training step; ``last_weights`` holds the MGDA weights of the last call."""

    def __init__(self, name: str, ref: MTLNet, x: torch.Tensor, y: torch.Tensor) -> None:
        self.name = name
        self.k = len(ref.heads)
        self.x, self.y = x, y
        self.last_weights: list[float] | None = None
        self.model = self.build(ref)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)

    # -- per method -------------------------------------------------------------------------------------
    def build(self, ref: MTLNet) -> nn.Module:
        return copy.deepcopy(ref)

    def trunk_params(self) -> list[nn.Parameter]:
        return list(self.model.trunk.parameters())

    def head_params(self) -> list[nn.Parameter]:
        return list(self.model.heads.parameters())

    def losses(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        f, outs = self.model(self.x)
        return f, [F.cross_entropy(o, self.y[:, i]) for i, o in enumerate(outs)]

    def grads(self) -> None:
        raise NotImplementedError

    # -- common -----------------------------------------------------------------------------------------
    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.zero()
        self.grads()
        self.opt.step()

    def flat(self, params: list[nn.Parameter]) -> torch.Tensor:
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )


class OneBackward(Arm):
    def grads(self) -> None:
        _, ls = self.losses()
        sum(ls).backward()


class KBackward(Arm):
    def grads(self) -> None:
        _, ls = self.losses()
        for i, loss in enumerate(ls):
            loss.backward(retain_graph=i < len(ls) - 1)


class Paperhooks(Arm):
    mode = "batched"

    def build(self, ref: MTLNet) -> nn.Module:
        from paperhooks.gradients import Engine

        self.engine = Engine(self.mode)
        self.chain = mgda_chain()
        model = copy.deepcopy(ref)
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.surgery = {n for n, _ in self.named if n.startswith("trunk.")}
        return model

    def grads(self) -> None:
        from paperhooks.gradients import write_grads

        _, ls = self.losses()
        values = {f"task{i}": loss for i, loss in enumerate(ls)}
        d = self.engine.run(values, self.named, self.surgery, self.chain, ctx=None, layout="full")
        write_grads(d.vector, [p for _, p in self.named])
        self.last_weights = None if d.weights is None else [float(w) for w in d.weights]


class PaperhooksLoop(Paperhooks):
    mode = "loop"


class TorchJD(Arm):
    def build(self, ref: MTLNet) -> nn.Module:
        from torchjd.aggregation import MGDA

        self.aggregator = MGDA()
        return copy.deepcopy(ref)

    def grads(self) -> None:
        from torchjd.autojac import jac_to_grad, mtl_backward

        f, ls = self.losses()
        trunk = self.trunk_params()
        mtl_backward(
            ls,
            features=f,
            tasks_params=[list(h.parameters()) for h in self.model.heads],
            shared_params=trunk,
        )
        w = jac_to_grad(trunk, self.aggregator)
        self.last_weights = [float(v) for v in w]


class LibMTL(Arm):
    def build(self, ref: MTLNet) -> nn.Module:
        HPS, MGDA = import_libmtl()
        trunk = copy.deepcopy(ref.trunk)
        tasks = [f"task{i}" for i in range(len(ref.heads))]
        self.tasks = tasks

        class MTLmodel(HPS, MGDA):  # as LibMTL.Trainer._prepare_model builds it
            def __init__(self, **kwargs):
                super().__init__(**kwargs)
                self.init_param()

            def zero_grad_share_params(self):  # torch 1.x semantics (see LIBMTL_SHIMS)
                self.encoder.zero_grad(set_to_none=False)

        model = MTLmodel(
            task_name=tasks,
            encoder_class=lambda: trunk,
            decoders=nn.ModuleDict(
                {t: copy.deepcopy(h) for t, h in zip(tasks, ref.heads, strict=True)}
            ),
            rep_grad=False,
            multi_input=False,
            device=self.x.device,
        )
        return model.to(self.x.device)

    def trunk_params(self) -> list[nn.Parameter]:
        return list(self.model.encoder.parameters())

    def head_params(self) -> list[nn.Parameter]:
        return [p for t in self.tasks for p in self.model.decoders[t].parameters()]

    def grads(self) -> None:
        preds = self.model(self.x)  # LibMTL.Trainer.train: forward, _compute_loss, backward
        losses = torch.zeros(len(self.tasks), device=self.x.device)
        for i, t in enumerate(self.tasks):
            losses[i] = F.cross_entropy(preds[t], self.y[:, i])
        w = self.model.backward(losses, mgda_gn="none")
        self.last_weights = [float(v) for v in w]


ARM_CLASSES = {
    "one backward": OneBackward,
    "K backward": KBackward,
    "paperhooks batched": Paperhooks,
    "paperhooks loop": PaperhooksLoop,
    "TorchJD": TorchJD,
    "LibMTL": LibMTL,
}


def make_arms(case: Case, k: int, device: str, seed: int) -> dict[str, Arm]:
    ref, x, y = reference(case, k, device, seed)
    return {name: cls(name, ref, x, y) for name, cls in ARM_CLASSES.items()}


# -- the check: the same update on the same model ----------------------------------------------------------
def check(case: Case, k: int, device: str, seed: int) -> dict:
    """Fill ``.grad`` once per method from the same weights and batch; compare the trunk's update.

    MGDA's min-norm point is unique but the three solvers stop at different tolerances
    (paperhooks and LibMTL at an L1 change of 1e-5 of the weights, TorchJD when its step
    γ < 1e-3), so the directions agree to about 1e-3, not to float precision; :data:`TOL`
    leaves room for that. The heads are compared too: TorchJD and LibMTL give head k the
    plain gradient of L_k (Sener & Koltun's update for task-specific parameters), the
    paperhooks engine applies the MGDA weights outside the surgery set as well (α_k ∇L_k).
    """
    arms = make_arms(case, k, device, seed)
    plain = arms["K backward"]
    plain.zero()
    plain.grads()
    heads_plain = plain.flat(plain.head_params()).double()
    trunk: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    weights: dict[str, list[float] | None] = {}
    for name in ("paperhooks batched", "paperhooks loop", "TorchJD", "LibMTL"):
        arm = arms[name]
        arm.zero()
        arm.grads()
        trunk[name] = arm.flat(arm.trunk_params()).double()
        heads[name] = arm.flat(arm.head_params()).double()
        weights[name] = arm.last_weights
    ref = trunk["paperhooks batched"]
    out: dict = {"k": k, "weights": weights, "trunk_rel": {}, "trunk_cos": {}, "heads": {}}
    for name, v in trunk.items():
        out["trunk_rel"][name] = float((v - ref).norm() / ref.norm().clamp_min(1e-30))
        out["trunk_cos"][name] = float(torch.nn.functional.cosine_similarity(v, ref, dim=0))
    # heads: plain gradients (peers) or α_k-scaled ones (paperhooks)?
    sizes = [sum(p.numel() for p in h.parameters()) for h in arms["K backward"].model.heads]
    alpha = torch.tensor(weights["paperhooks batched"] or [1.0] * k, dtype=torch.float64)
    scaled = torch.cat([a * part for a, part in zip(alpha, heads_plain.split(sizes), strict=True)])
    for name, v in heads.items():
        rel_plain = float((v - heads_plain).norm() / heads_plain.norm())
        rel_scaled = float((v - scaled).norm() / scaled.norm())
        out["heads"][name] = (
            "∇L_k" if rel_plain < 1e-4 else ("α_k ∇L_k" if rel_scaled < 1e-4 else "other")
        )
    worst = max(out["trunk_rel"].values())
    out["ok"] = worst <= TOL and out["trunk_rel"]["paperhooks loop"] <= 1e-4
    print(
        f"  check K={k} ({case.name}): trunk direction, relative L2 distance to paperhooks batched: "
        + ", ".join(
            f"{n} {r:.1e}" for n, r in out["trunk_rel"].items() if n != "paperhooks batched"
        )
        + f" (tolerance {TOL:g}); heads: "
        + ", ".join(f"{n} {h}" for n, h in out["heads"].items())
        + "; MGDA weights: "
        + "; ".join(
            f"{n} [{', '.join(f'{w:.3f}' for w in (ws or []))}]" for n, ws in weights.items()
        ),
        flush=True,
    )
    assert out["ok"], f"the methods disagree on the update direction at K={k}: {out['trunk_rel']}"
    return out


# -- where the time goes ------------------------------------------------------------------------------------
def profile_step(arm: Arm, device: str, steps: int = 3, top: int = 8) -> dict:
    """cProfile of ``steps`` training steps of ``arm``: the functions with the most self time.

    Self time of Python functions and of the C functions they call (autograd's backward shows
    as ``run_backward``). On CUDA, kernels run asynchronously, so their time lands wherever
    the host next waits for the device; read it as host-side overhead.
    """
    import cProfile
    import pstats
    import time

    arm.step()
    sync_dev = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    sync_dev()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        arm.step()
    sync_dev()
    prof.disable()
    total = (time.perf_counter() - t0) / steps
    stats = pstats.Stats(prof)
    entries = []
    for (file, line, func), (_, ncalls, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        short = file if file.startswith("~") else "/".join(Path(file).parts[-2:])
        entries.append(
            {
                "function": f"{short}:{line}({func})",
                "ms": 1e3 * tottime / steps,
                "calls": ncalls / steps,
            }
        )
    entries.sort(key=lambda e: -e["ms"])
    return {"arm": arm.name, "step_ms": 1e3 * total, "top": entries[:top]}


# -- the part ---------------------------------------------------------------------------------------------
def cases(s: Settings) -> list[Case]:
    """The models: sizes and repeats for --quick, the full CPU run and a CUDA run.

    On CUDA the MLP is kept at about 2.6 M trunk parameters and the number of steps per arm
    and round adapts to each arm's speed (``target_s``), so that a full ``--device cuda``
    run stays within a few minutes even where an arm is slow.
    """
    # quick, full CPU, CUDA
    d_in, hidden, depth, feat = s.pick(
        (128, 256, 2, 128), (512, 1024, 3, 256), (1024, 1024, 2, 512)
    )
    batch = s.pick(64, 256, 1024)
    dims = "-".join(str(x) for x in (d_in, *([hidden] * depth), feat))
    out = [
        Case(
            name=f"MLP trunk {dims}, batch {batch}",
            make_trunk=mlp_trunk(d_in, hidden, depth, feat),
            features=feat,
            input_shape=(d_in,),
            batch=batch,
            rounds=s.pick(3, 7, 7),
            steps=s.pick(3, 10, 20),
            warmup=s.pick(2, 3, 5),
            target_s=s.pick(0.3, 1.0, 0.4),
        )
    ]
    if not s.quick:
        rb = s.pick(8, 16, 128)
        out.append(
            Case(
                name=f"timm resnet18 trunk, batch {rb} of 3×32×32",
                make_trunk=resnet_trunk,
                features=512,
                input_shape=(3, 32, 32),
                batch=rb,
                rounds=s.pick(3, 5, 3),
                steps=s.pick(1, 5, 10),
                warmup=s.pick(1, 2, 2),
                target_s=s.pick(0.3, 2.0, 0.4),
            )
        )
    return out


def run(s: Settings) -> dict:
    quiet()
    results: list[dict] = []
    failures: list[dict] = []
    for case in cases(s):
        for k in KS:
            try:
                results.append(run_one(s, case, k))
            except Exception as e:  # noqa: BLE001 - keep the other results; the page shows this
                import traceback

                traceback.print_exc()
                failures.append(
                    {"case": case.name, "k": k, "error": f"{type(e).__name__}: {str(e)[:400]}"}
                )
    return {
        "results": results,
        "failures": failures,
        "memory_method": memory_method(s.device),
        "libmtl_shims": LIBMTL_SHIMS,
        "tol": TOL,
    }


def run_one(s: Settings, case: Case, k: int) -> dict:
    """Check, time, measure memory (and at the largest K profile) one model at one K."""
    chk = check(case, k, s.device, s.seed)
    arms = make_arms(case, k, s.device, s.seed)
    times, per_round = round_robin(
        {n: a.step for n, a in arms.items()},
        s.device,
        case.rounds,
        case.steps,
        case.warmup,
        target_s=case.target_s,
    )
    memory = {}
    for name, arm in arms.items():
        arm.zero()
        memory[name] = peak_step_memory(arm.step, s.device)
    base = times["K backward"]
    entry = {
        "case": case.name,
        "k": k,
        "rounds": case.rounds,
        "steps": case.steps,
        "warmup": case.warmup,
        "steps_per_round": per_round,
        "target_s": case.target_s,
        "params": sum(p.numel() for p in arms["one backward"].model.parameters()),
        "trunk_params": sum(p.numel() for p in arms["one backward"].model.trunk.parameters()),
        "ms": {n: 1e3 * summary(t)["median"] for n, t in times.items()},
        "ms_spread": {n: [1e3 * min(t), 1e3 * max(t)] for n, t in times.items()},
        "vs_k_backward": {n: summary(paired_ratios(t, base)) for n, t in times.items()},
        "vs_one_backward": {
            n: summary(paired_ratios(t, times["one backward"])) for n, t in times.items()
        },
        "vs_torchjd": {
            n: summary(paired_ratios(times[n], times["TorchJD"]))
            for n in ("paperhooks batched", "paperhooks loop")
        },
        "vs_libmtl": {
            n: summary(paired_ratios(times[n], times["LibMTL"]))
            for n in ("paperhooks batched", "paperhooks loop")
        },
        "peak_bytes": memory,
        "check": chk,
    }
    if k == KS[-1]:
        # the mode Engine() picks on this device, which the goals judge
        judged = "paperhooks batched" if s.device == "cuda" else "paperhooks loop"
        entry["profile"] = profile_step(arms[judged], s.device, steps=min(3, per_round[judged]))
        entry["profile_arm"] = judged
    print(
        f"  surgery K={k} ({case.name}): "
        + ", ".join(f"{n} {entry['ms'][n]:.1f} ms" for n in ARMS)
        + f"; paperhooks batched / K backward {entry['vs_k_backward']['paperhooks batched']['median']:.2f}",
        flush=True,
    )
    return entry


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
