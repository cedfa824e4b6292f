"""Where the extra time of a paperhooks arm goes: cProfile of the timed steps of both arms of a
comparison (core overhead or a family), self time per step, paperhooks against hand-written.

    python benchmarks/profile_arms.py [--device cpu] [--threads 1] [--label cpu] [CASE ...]

CASE is one of ``core-mlp core-resnet weighting-mlp weighting-resnet pruning-mlp
pruning-resnet reparam-mlp reparam-resnet preference`` (default: all). Each arm trains inside
Lightning exactly as in the benchmark (same modules, batches and Trainer settings); the
profiler is switched on in ``on_train_batch_start`` and off in ``on_train_batch_end`` for the
steps after the warm-up, so it sees what the benchmark times and nothing else. The arms run
one after the other, each once (not in rounds): the profile says where time goes, the ratios
come from ``run_all.py``.

Writes ``OUT/benchmarks/profiles/<label>-<case>.txt`` (the table of the largest differences,
then each arm's functions by self time) and records a summary under ``profiles`` in
``OUT/benchmarks/results-<label>.json`` (``results.json`` without ``--label``), which the
page shows. cProfile adds a fixed cost to every Python call, so Python-heavy code (the
plugin machinery, Lightning's hooks) looks more expensive under it than in the benchmark;
compare the arms with each other, not with the benchmark's step times.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import lightning.pytorch as L
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASES = (
    "core-mlp",
    "core-resnet",
    "weighting-mlp",
    "weighting-resnet",
    "pruning-mlp",
    "pruning-resnet",
    "reparam-mlp",
    "reparam-resnet",
    "preference",
)

#: what the profiles show, read by hand from the tables they produce (see the .txt files);
#: printed on the page next to the numbers measured when the profile last ran
WHY: dict[str, str] = {
    "core-mlp": (
        "what the plain module does not do is Python bookkeeping, a fixed cost per step: the stag"
        "ed step (the objectives dict, `reduce`, `total`, `_log_step`), the logging-step test and t"
        "he snapshot of torch's RNG state at the start of every step (so that a step that fails ca"
        "n be saved and resumed exactly; `torch.get_rng_state`, a few µs). On 2026-11-29 the snaps"
        "hot stopped reading NumPy's and Python's states (~0.1 ms; now read when a checkpoint is w"
        "ritten), and `total` stopped adding `1.0·L` and `0 + L` nodes to the graph. Fixed per ste"
        "p, it weighs on a ~2.5 ms MLP step (a few per cent) and not on a resnet18 step; on this s"
        "hared 2-core machine the measured ratio has ranged from 0.95 to 1.12 between runs of the "
        "same code."
    ),
    "core-resnet": (
        "the same fixed bookkeeping as for the MLP, about +0.3 ms of self time against a ~330 ms "
        "resnet18 step on this CPU (under 0.1 %): the 1.04 median of this run is within its spread"
        " over rounds, and runs of the same code on 2026-11-29 measured 0.96 – 0.98. The H200's "
        "1.10× (spread 1.01 – 1.26) for a 13 ms step is larger than this fixed cost would explain "
        "and was not profiled on a GPU."
    ),
    "weighting-mlp": (
        "besides the core's bookkeeping: `torch.isfinite` twice (the plugin's own `check_finite`,"
        " which the conformance kit requires so that NaN losses raise naming the plugin, and the "
        "core's count of invalid weights), the plugin's min/max normalization and softmax. The co"
        "re checks every plugin's weights and the global sum in one all-reduce and one host read "
        "(`reduce`), and since 2026-11-29 the plugin computes its entropy and ESS diagnostics, and "
        "the core calls `log_dict`, on logging steps only (the hand-written arm logs them every st"
        "ep, as a user would)."
    ),
    "weighting-resnet": (
        "the same checks and bookkeeping as for the MLP, small against a resnet18 step on this CPU."
    ),
    "pruning-mlp": (
        "Python bookkeeping on a ~4 ms step: the mask's `forward` and `factor` (the cached 0/1 c"
        "opy of M, checked on every call), `zero_pruned` after every step (so that momentum and "
        "weight decay cannot revive a pruned weight; the hand-written arm does not zero them), the "
        "core's staged step and RNG snapshot, and at each mask update four walks over the modules "
        "(`prunable`). The tensor work is tiny here: e24f04d (the float copy of M, `kthvalue` "
        "selection) made the resnet18 arm faster than the hand-written one but leaves this fixed "
        "cost, +1.3 – 1.6 ms of self time per profiled step under cProfile in two profiles after "
        "it (+1.5 ms before). Earlier on 2026-11-29 sparsity logging moved to logging steps and "
        "mask changes (2.06× -> 1.04 – 1.16×)."
    ),
    "pruning-resnet": (
        "no longer missed: since e24f04d the paperhooks arm is the faster one. The mask multiplies "
        "by a cached 0/1 copy of M in the weight's dtype (a float-by-bool product converts M element "
        "by element, forward, backward and in `zero_pruned`'s `mul_`): in two profiles after it the "
        "mask's `forward` took 11 – 14 ms and `mul_` 7 – 9 ms of self time per profiled step, "
        "against 39 and 27 ms before; and the global threshold is selected with `kthvalue` "
        "(58 – 61 ms per step at 0.2 mask updates a step) where the hand-written arm sorts all 11M "
        "scores (`argsort`, 354 – 361 ms)."
    ),
    "preference": (
        "the same forward passes (policy over [chosen; rejected], frozen reference) and the same "
        "loss in both arms, under paperhooks' names in its arm (`outputs`, `reference_logps`, "
        "`dpo_loss`, `log_ratio_margin`, together ~0.27 ms of self time per profiled step, in "
        "place of the hand-written `training_step`'s), plus the staged step of every "
        "HookedModule and `_log_step`; about +1 ms of self time under cProfile against a ~35 ms "
        "step, within this machine's spread over rounds."
    ),
    "reparam-mlp": (
        "the arctan is the same work in both arms (`compand` in the plugin, the pre-hook in the "
        "hand-written one); the plugin adds the core's bookkeeping. Until 2026-11-29 its "
        "`objective_terms` also walked `model.modules()` to find its companders at every step and "
        "turned its two diagnostics into Python numbers (`float`/`int` of tensors: host–device "
        "synchronizations on a GPU); it now finds them once per model and computes the diagnostics "
        "as tensors on the trainer's logging steps only (`ctx.logging_step`), and the measured "
        "ratio went from 1.09× to 0.74 – 0.86× (it now does less per step than the hand-written "
        "arm, which computes its diagnostics every step)."
    ),
}


class Profiled(L.Callback):
    """cProfile on from ``on_train_batch_start`` to ``on_train_batch_end`` after ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.prof = cProfile.Profile()
        self.seen = 0
        self.profiled = 0
        self.wall = 0.0

    def on_train_batch_start(self, *args) -> None:
        if self.seen >= self.warmup:
            self.t0 = time.perf_counter()
            self.prof.enable()

    def on_train_batch_end(self, *args) -> None:
        if self.seen >= self.warmup:
            self.prof.disable()
            self.wall += time.perf_counter() - self.t0
            self.profiled += 1
        self.seen += 1


def _where(key: tuple[str, int, str]) -> str:
    """``path:line(function)``, the path from the package root or ``~`` for built-ins."""
    file, line, func = key
    if file == "~":
        return f"~:0({func})"
    for marker in ("site-packages/", "/core/", "/plugins/", "/benchmarks/", "/lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            if marker == "/lib/python3":
                file = "py3" + file
            break
    return f"{file}:{line}({func})"


def self_times(prof: cProfile.Profile, steps: int) -> dict[str, tuple[float, float]]:
    """``{function: (self ms per step, calls per step)}``."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out: dict[str, tuple[float, float]] = {}
    for key, (_cc, nc, tt, _ct, _callers) in stats.items():
        name = _where(key)
        ms, calls = out.get(name, (0.0, 0.0))
        out[name] = (ms + 1e3 * tt / steps, calls + nc / steps)
    return out


def arms_of(case: str, s) -> tuple[dict, object, int, int, str]:
    """(arms {name: factory}, data, steps, warm-up, title) of a case; "plugin" is the paperhooks arm."""
    import families as fam
    from core_overhead import Plain, loader, mlp_case, resnet_case

    from paperhooks import HookedModule

    if case == "preference":
        from paperhooks.preference import PreferenceModule, PreferenceObjective

        name, make, data, _r, steps, warmup = fam.preference_case(s)
        arms = {
            "hand-written": lambda: fam.PlainDPO(make()),
            "plugin": lambda: PreferenceModule(make(), PreferenceObjective(beta=fam.BETA)),
        }
        return arms, data, steps, warmup, f"preference objective (core DPO), {name}"
    what, model = case.rsplit("-", 1)
    name, make, shape, batch, _r, steps, warmup = (mlp_case if model == "mlp" else resnet_case)(s)
    data = loader(shape, batch * (steps + warmup), batch, seed=s.seed)
    plain, plugins, title = {
        "core": (Plain, lambda: [], "core overhead (HookedModule, no plugin)"),
        "weighting": (
            fam.PlainReweighting,
            lambda: [fam.reweighting_plugin()],
            "sample weighting (loss-reweighting)",
        ),
        "pruning": (
            fam.PlainPruning,
            lambda: [fam.pruning_plugin()],
            "pruning masks (ramp + built-in magnitude)",
        ),
        "reparam": (
            fam.PlainCompander,
            lambda: [fam.compander_plugin()],
            "reparameterization (weight-compander)",
        ),
    }[what]
    arms = {
        "hand-written": lambda: plain(make()),
        "plugin": lambda: HookedModule(make(), plugins()),
    }
    return arms, data, steps, warmup, f"{title}, {name}"


def profile_case(case: str, s) -> tuple[dict, str]:
    import _common  # benchmarks/ is on sys.path (main)

    arms, data, steps, warmup, title = arms_of(case, s)
    per_arm = {}
    for arm, make in arms.items():
        torch.manual_seed(s.seed)
        cb = Profiled(warmup)
        _common.bench_trainer(steps + warmup, s.device, cb).fit(make(), data)
        per_arm[arm] = (self_times(cb.prof, cb.profiled), 1e3 * cb.wall / cb.profiled, cb.profiled)
    (base, base_ms, n), (arm, arm_ms, _) = per_arm["hand-written"], per_arm["plugin"]
    names = set(base) | set(arm)
    diff = sorted(
        (
            {
                "function": f,
                "arm_ms": arm.get(f, (0.0, 0.0))[0],
                "base_ms": base.get(f, (0.0, 0.0))[0],
                "arm_calls": arm.get(f, (0.0, 0.0))[1],
                "base_calls": base.get(f, (0.0, 0.0))[1],
            }
            for f in names
        ),
        key=lambda d: -(d["arm_ms"] - d["base_ms"]),
    )
    for d in diff:
        d["extra_ms"] = d["arm_ms"] - d["base_ms"]
    # functions the paperhooks arm calls more often (or alone): the machinery it adds; the
    # other differences are mostly noise of one run (same calls, different time)
    added = [d for d in diff if d["arm_calls"] > d["base_calls"] + 0.01]
    added_ms = sum(d["extra_ms"] for d in added)
    only_arm = sum(d["arm_ms"] for d in diff if d["base_calls"] == 0)
    entry = {
        "case": case,
        "title": title,
        "steps": n,
        "arm_ms": arm_ms,
        "base_ms": base_ms,
        "added_ms": added_ms,
        "only_in_paperhooks_ms": only_arm,
        "extra": [
            {
                k: d[k]
                for k in ("function", "arm_ms", "base_ms", "extra_ms", "arm_calls", "base_calls")
            }
            for d in added[:8]
        ],
        # the same work under the hand-written arm's own function names shows up here
        "savings": [
            {
                k: d[k]
                for k in ("function", "arm_ms", "base_ms", "extra_ms", "arm_calls", "base_calls")
            }
            for d in sorted(diff, key=lambda d: d["extra_ms"])[:4]
        ],
    }
    text = [
        f"{title}: cProfile of {n} training steps per arm after {warmup} warm-up steps",
        f"profiled step (wall, with cProfile on): paperhooks {arm_ms:.3f} ms, hand-written {base_ms:.3f} ms, "
        f"extra {arm_ms - base_ms:+.3f} ms",
        f"extra self time per step in functions the paperhooks arm calls more often: {added_ms:+.3f} ms "
        f"(of which in functions the hand-written arm never calls: {only_arm:.3f} ms)",
        "",
        "functions the paperhooks arm calls more often (or alone), by extra self time per step (ms; calls per step):",
        f"{'extra':>9} {'paperhooks':>11} {'hand-written':>12} {'calls ph':>9} {'calls hw':>9}  function",
    ]
    for d in added[:30]:
        text.append(
            f"{d['extra_ms']:+9.3f} {d['arm_ms']:11.3f} {d['base_ms']:12.3f} {d['arm_calls']:9.1f} {d['base_calls']:9.1f}  {d['function']}"
        )
    text += [
        "",
        "all functions, largest differences of self time per step (same call counts: mostly noise of one run):",
        f"{'extra':>9} {'paperhooks':>11} {'hand-written':>12} {'calls ph':>9} {'calls hw':>9}  function",
    ]
    for d in diff[:20]:
        text.append(
            f"{d['extra_ms']:+9.3f} {d['arm_ms']:11.3f} {d['base_ms']:12.3f} {d['arm_calls']:9.1f} {d['base_calls']:9.1f}  {d['function']}"
        )
    text += ["", "largest savings (hand-written slower):"]
    for d in sorted(diff, key=lambda d: d["extra_ms"])[:8]:
        text.append(
            f"{d['extra_ms']:+9.3f} {d['arm_ms']:11.3f} {d['base_ms']:12.3f}  {d['function']}"
        )
    for label, table in (("paperhooks", arm), ("hand-written", base)):
        text += ["", f"{label}: top 25 by self time per step (ms; calls per step)"]
        for f, (ms, calls) in sorted(table.items(), key=lambda kv: -kv[1][0])[:25]:
            text.append(f"{ms:9.3f} {calls:8.1f}  {f}")
    return entry, "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "cases", nargs="*", metavar="CASE", help=f"some of {', '.join(CASES)} (default: all)"
    )
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--label", default=None, help="results-LABEL.json gets the summary (default: results.json)"
    )
    ap.add_argument("--out", default="docs")
    args = ap.parse_args(argv)
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; the cases are {', '.join(CASES)}")
    args.cases = args.cases or list(CASES)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import _common
    import run_all

    _common.quiet()
    s = _common.Settings(device=args.device)
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    figs = out / "benchmarks"
    (figs / "profiles").mkdir(parents=True, exist_ok=True)
    target = run_all.results_file(figs, args.label)
    command = "python benchmarks/profile_arms.py " + shlex.join(argv)
    header = (
        f"# {command}\n# {datetime.now(UTC):%Y-%m-%d %H:%M UTC}, {args.device}, torch threads "
        f"{torch.get_num_threads()}, {_common.cpu_model()}\n"
    )
    for case in args.cases:
        entry, text = profile_case(case, s)
        name = f"profiles/{args.label + '-' if args.label else ''}{case}.txt"
        (figs / name).write_text(header + text)
        entry["file"] = name
        if WHY.get(case):
            entry["why"] = WHY[case]
        results = json.loads(target.read_text())
        prof = results.setdefault("profiles", {})
        prof["method"] = (
            f"cProfile of the timed region of {s.device} training steps (`{command.split(' ', 2)[0]} "
            "benchmarks/profile_arms.py`), each arm once after warm-up, self time per step; "
            "cProfile inflates every Python call, so the Python machinery weighs more here than "
            "in the timings above. Full tables in the linked files."
        )
        prof["entries"] = [e for e in prof.get("entries", []) if e["case"] != case] + [entry]
        prof["entries"].sort(key=lambda e: CASES.index(e["case"]))
        target.write_text(json.dumps(results, indent=1, default=str))
        print(
            f"{case}: {entry['arm_ms']:.2f} vs {entry['base_ms']:.2f} ms -> {figs / name}",
            flush=True,
        )
        for d in entry["extra"][:4]:
            print(f"    {d['extra_ms']:+.3f} ms {d['function']}")
    reference = (
        json.loads((figs / "results.json").read_text())
        if (figs / "results.json").exists()
        else None
    )
    run_all.render(reference, out, figs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
