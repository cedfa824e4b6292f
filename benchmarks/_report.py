"""Turns the results of ``run_all.py`` into ``benchmarks.md`` and its PNG plots."""

from __future__ import annotations

from pathlib import Path

from _common import fmt_bytes, fmt_ratio, fmt_spread, md_table, verdict

SURGERY_GOAL = 1.2


# -- goals ------------------------------------------------------------------------------------------------
def goals(results: dict) -> list[dict]:
    """One line per goal of issue #9: what, goal, result, verdict."""
    out = []
    for r in results.get("core", {}).get("rows", []):
        out.append(
            {
                "part": "1. core overhead",
                "what": f"HookedModule / plain LightningModule, {r['model']}",
                "goal": f"≤ {r['goal']:g}×",
                "result": f"{fmt_ratio(r['ratio'])}× ({fmt_spread(r['ratio'])})",
                "verdict": verdict(r["ratio"], r["goal"]),
            }
        )
    fam = results.get("families", {})
    for r in fam.get("rows", []):
        out.append(
            {
                "part": "2. per family",
                "what": f"{r['family']} ({r['plugin']}) / hand-written, {r['model']}",
                "goal": f"≤ {r['goal']:g}×",
                "result": f"{fmt_ratio(r['ratio'])}× ({fmt_spread(r['ratio'])})",
                "verdict": verdict(r["ratio"], r["goal"]),
            }
        )
    for name, why in fam.get("not_measured", {}).items():
        out.append(
            {
                "part": "2. per family",
                "what": name,
                "goal": "≤ 1.05×",
                "result": "—",
                "verdict": why,
            }
        )
    for f in results.get("surgery", {}).get("failures", []):
        out.append(
            {
                "part": "3. gradient surgery",
                "what": f"{f['case']}, K={f['k']}",
                "goal": "all goals",
                "result": "failed",
                "verdict": f"**failed**: {f['error'][:200]}",
            }
        )
    by_case: dict[str, list[dict]] = {}
    for e in results.get("surgery", {}).get("results", []):
        by_case.setdefault(e["case"], []).append(e)
    arm, mode = default_surgery_arm(results)
    for case, entries in by_case.items():
        for peer, key in (("TorchJD", "vs_torchjd"), ("LibMTL", "vs_libmtl")):
            worst = max(entries, key=lambda e: e[key][arm]["median"])
            r = worst[key][arm]
            out.append(
                {
                    "part": "3. gradient surgery",
                    "what": f"paperhooks ({mode}) / {peer} at every K, {case}",
                    "goal": "< 1 at every K",
                    "result": f"worst {fmt_ratio(r)}× at K={worst['k']} ({fmt_spread(r)})",
                    "verdict": verdict(r, 1.0 - 1e-9),
                }
            )
        worst = max(entries, key=lambda e: e["vs_k_backward"][arm]["median"])
        r = worst["vs_k_backward"][arm]
        out.append(
            {
                "part": "3. gradient surgery",
                "what": f"paperhooks ({mode}) / K backward passes, {case}",
                "goal": f"≤ {SURGERY_GOAL:g}× at every K",
                "result": f"worst {fmt_ratio(r)}× at K={worst['k']} ({fmt_spread(r)})",
                "verdict": verdict(r, SURGERY_GOAL),
            }
        )
    return out


def default_surgery_arm(results: dict) -> tuple[str, str]:
    """The engine mode a user gets on the run's device, which the goals judge: ``Engine()``
    (mode ``"auto"``) runs batched on CUDA and the loop on a CPU (``paperhooks.gradients``),
    where vmap's overhead measured slower. The page's tables show both modes."""
    if results.get("device") == "cuda":
        return "paperhooks batched", "batched"
    return "paperhooks loop", "loop, the engine's default on a CPU"


def summary_text(results: dict) -> str:
    lines = ["goals:"]
    for g in goals(results):
        lines.append(
            f"  [{g['part']}] {g['what']}: {g['result']} (goal {g['goal']}) -> {g['verdict']}"
        )
    return "\n".join(lines)


# -- plots ------------------------------------------------------------------------------------------------
def plots(results: dict, figs: Path, suffix: str = "") -> dict[str, str]:
    """Write the PNGs (``overhead{suffix}.png``...); returns {key: file name}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: dict[str, str] = {}
    tag = (f" [{results['label']}]" if results.get("label") else "") + (
        " (--quick)" if results.get("quick") else ""
    )

    rows = [("core: " + r["model"], r, r["goal"]) for r in results.get("core", {}).get("rows", [])]
    rows += [
        (f"{r['family']}: {r['model']}", r, r["goal"])
        for r in results.get("families", {}).get("rows", [])
    ]
    if rows:
        fig, ax = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.4))
        ys = list(range(len(rows)))[::-1]
        med = [r["ratio"]["median"] for _, r, _ in rows]
        lo = [r["ratio"]["median"] - r["ratio"]["min"] for _, r, _ in rows]
        hi = [r["ratio"]["max"] - r["ratio"]["median"] for _, r, _ in rows]
        colors = ["tab:green" if r["ratio"]["median"] <= g else "tab:red" for _, r, g in rows]
        ax.errorbar(med, ys, xerr=[lo, hi], fmt="none", ecolor="black", capsize=3)
        ax.scatter(med, ys, color=colors, zorder=3, s=40)
        for y, (_, _, g) in zip(ys, rows, strict=True):
            ax.plot([g, g], [y - 0.35, y + 0.35], color="tab:red", lw=2, ls="--")
        ax.axvline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_yticks(ys, [n for n, _, _ in rows], fontsize=8)
        lo_x = min(0.8, min(r["ratio"]["min"] for _, r, _ in rows) - 0.05)
        hi_x = max(1.15, max(r["ratio"]["max"] for _, r, _ in rows) + 0.05)
        ax.set_xlim(lo_x, hi_x)
        ax.set_xlabel(
            "step time, paperhooks / hand-written\n(dot: median; bar: min–max over rounds; red dashes: the goal)"
        )
        ax.set_title("Overhead of the core and of each family" + tag)
        fig.tight_layout()
        fig.savefig(figs / f"overhead{suffix}.png", dpi=110)
        plt.close(fig)
        made["overhead"] = f"overhead{suffix}.png"

    surg = results.get("surgery", {}).get("results", [])
    if surg:
        from surgery import ARMS

        cases = list(dict.fromkeys(e["case"] for e in surg))
        for key, ylabel, fname, title in (
            (
                "ms",
                "ms per training step (median, min–max)",
                "surgery_time.png",
                "Gradient surgery: step time",
            ),
            (
                "peak_bytes",
                "peak extra memory in a step (MiB)",
                "surgery_memory.png",
                "Gradient surgery: peak memory",
            ),
        ):
            fig, axes = plt.subplots(1, len(cases), figsize=(6.5 * len(cases), 4.3), squeeze=False)
            for ax, case in zip(axes[0], cases, strict=True):
                es = [e for e in surg if e["case"] == case]
                ks = [e["k"] for e in es]
                for arm in ARMS:
                    if key == "ms":
                        ys = [e["ms"][arm] for e in es]
                        err = [
                            [e["ms"][arm] - e["ms_spread"][arm][0] for e in es],
                            [e["ms_spread"][arm][1] - e["ms"][arm] for e in es],
                        ]
                        ax.errorbar(ks, ys, yerr=err, marker="o", capsize=3, label=arm)
                    else:
                        ax.plot(
                            ks, [e["peak_bytes"][arm] / 2**20 for e in es], marker="o", label=arm
                        )
                ax.set_xscale("log", base=2)
                ax.set_xticks(ks, [str(k) for k in ks])
                ax.set_yscale("log")
                ax.set_xlabel("K objectives")
                ax.set_ylabel(ylabel)
                ax.set_title(case, fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title + tag)
            fig.tight_layout()
            key = fname.removesuffix(".png")
            fname = f"{key}{suffix}.png"
            fig.savefig(figs / fname, dpi=110)
            plt.close(fig)
            made[key] = fname

    traffic = results.get("dist", {}).get("rows", [])
    if traffic:
        arms = list(dict.fromkeys(r["arm"] for r in traffic))
        ks = sorted({r["k"] for r in traffic})
        fig, ax = plt.subplots(figsize=(8, 4.3))
        width = 0.8 / len(arms)
        for i, arm in enumerate(arms):
            vals = [
                next(r for r in traffic if r["k"] == k and r["arm"] == arm)["wire_bytes"] / 1024
                for k in ks
            ]
            ax.bar([j + i * width for j in range(len(ks))], vals, width, label=arm)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ks))], [f"K={k}" for k in ks])
        ax.set_ylabel("KiB sent per rank per step (ring estimate)")
        ax.set_title("Bytes communicated per step, 2-process DDP (gloo)")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(figs / f"dist_traffic{suffix}.png", dpi=110)
        plt.close(fig)
        made["dist"] = f"dist_traffic{suffix}.png"

    cli = results.get("cli", {}).get("rows", [])
    if cli:
        fig, ax = plt.subplots(figsize=(7, 2.8))
        names = [r["command"] for r in cli][::-1]
        med = [r["s"]["median"] for r in cli][::-1]
        err = [
            [r["s"]["median"] - r["s"]["min"] for r in cli][::-1],
            [r["s"]["max"] - r["s"]["median"] for r in cli][::-1],
        ]
        ax.barh(names, med, xerr=err, capsize=3, color="tab:blue", alpha=0.75)
        ax.set_xlabel("seconds (median, min–max)")
        ax.set_title("CLI latency" + tag)
        fig.tight_layout()
        fig.savefig(figs / f"cli_latency{suffix}.png", dpi=110)
        plt.close(fig)
        made["cli"] = f"cli_latency{suffix}.png"
    return made


# -- the page -------------------------------------------------------------------------------------------------
def _img(images: dict[str, str], key: str, rel: str, alt: str) -> str:
    return f"\n![{alt}]({rel}/{images[key]})\n" if key in images else ""


def page(
    results: dict,
    images: dict[str, str],
    figs_rel: str = "benchmarks",
    others: tuple[str, ...] = (),
) -> str:
    q = results.get("quick")
    L: list[str] = [
        "# Benchmarks",
        "",
        "<!-- Generated by benchmarks/run_all.py: rerun it rather than editing this page. -->",
        "",
        "What paperhooks costs, measured side by side against plain Lightning and against the",
        "peer libraries (issue #9). Machines are noisy, so the page reports **ratios** measured",
        "in one run: the arms of a comparison alternate in rounds (the order rotated every round),",
        "each round gives one time per arm after warm-up steps, and a ratio is taken round by",
        "round; tables give the median ratio and its spread (min – max over rounds).",
        "",
    ]
    runs = results.get("runs") or []
    if len(runs) > 1:
        L += [
            "This run was measured part by part (`--only`); the commands, each with the parts it",
            "measured last:",
            "",
            _runs_table(runs),
            "",
        ]
    else:
        L += ["This run:", "", "```bash", results["command"], "```", ""]
    L += [
        "Everything (the `bench` nox session runs the same script: `nox -s bench -- --device cuda`):",
        "",
        "```bash",
        "python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--out docs] [--threads N]",
        "```",
        "",
    ]
    if others:
        L += [
            "The sections up to *5. CLI latency* are this reference run; runs made apart from it",
            "(`--label`, their own results file) follow at the end of the page: "
            + ", ".join(f"`{o}`" for o in others)
            + ".",
            "",
        ]
    if results.get("note"):
        L += [results["note"], ""]
    if q:
        L += [
            '!!! warning "A --quick run"',
            "    This page comes from a `--quick` run (fewer rounds, smaller models; it checks that",
            "    the benchmark works). Its ratios are indicative only: rerun without `--quick` on a",
            "    quiet machine for numbers to quote.",
            "",
        ]
    for part, err in results.get("errors", {}).items():
        L += [f"**Part `{part}` failed** in this run: `{err.splitlines()[-1][:300]}`", ""]
    unfinished = [
        p
        for p in results.get("parts_run", [])
        if p not in results and p not in results.get("errors", {})
    ]
    if unfinished:
        L += [
            f"Parts not finished (the run was cut short, or is still going): {', '.join(unfinished)}.",
            "",
        ]
    not_run = [
        p
        for p in ("core", "families", "surgery", "dist", "cli")
        if p not in results.get("parts_run", [])
    ]
    if not_run:
        L += [f"Parts not run this time (`--only`): {', '.join(not_run)}.", ""]
    L += ["## Machine", "", md_table(["", ""], [(k, v) for k, v in results["machine"].items()]), ""]
    L += [
        f"Measured {results['started']} on `{results['device']}`; the run took "
        f"{results['durations_s'].get('total', 0):.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['durations_s'].items() if k != 'total')}). "
        "Raw numbers: [`benchmarks/results.json`](benchmarks/results.json).",
        "",
    ]

    # goals
    gl = goals(results)
    L += [
        "## Goals",
        "",
        md_table(
            ["part", "comparison", "goal", "result (median, spread)", "verdict"],
            [(g["part"], g["what"], g["goal"], g["result"], g["verdict"]) for g in gl],
        ),
        "",
    ]
    missed = [g for g in gl if "missed" in g["verdict"] or "failed" in g["verdict"]]
    if missed:
        L += [
            f"**{len(missed)} goal(s) missed or not measured because of a failure** in this run: "
            + "; ".join(f"{g['what']} ({g['result']}, goal {g['goal']})" for g in missed)
            + ". The sections below say why where the measurement shows it.",
            "",
            "A verdict marked *spread crosses* means the rounds of this run disagree about it:",
            "rerun on a quiet machine before acting on it.",
            "",
        ]
    else:
        L += ["Every measured goal was met in this run.", ""]

    L += _core(results, images, figs_rel)
    L += _families(results, images, figs_rel)
    L += _surgery(results, images, figs_rel)
    L += _dist(results, images, figs_rel)
    L += _cli(results, images, figs_rel)
    L += _profiles(results)
    return "\n".join(L).rstrip() + "\n"


def _lightning_method() -> list[str]:
    return [
        "Both arms train inside Lightning (`Trainer(max_steps=…)`, no logger, no checkpointing, no",
        "progress bar). A callback times each step from `on_train_batch_start` to",
        "`on_train_batch_end` (forward, backward, optimizer step and every hook in between; the",
        "device is synchronized at both ends); a round's time is the median step after the",
        "warm-up steps. Each round builds fresh modules with the same seed and the same batches.",
        "",
    ]


def _core(results: dict, images: dict, rel: str, short: bool = False) -> list[str]:
    core = results.get("core")
    if not core:
        return []
    L = ["## 1. Core overhead", ""]
    if short:
        L += ["The same arms as in the reference run's section 1. Goal: ≤ 1.02×.", ""]
    else:
        L += [
            "A `HookedModule` with no plugin against the plain `LightningModule` a user would write",
            'for the same training (`F.cross_entropy(..., reduction="none").mean()`, the same',
            "`self.log` call, SGD with lr 0.1). Goal: ≤ 1.02×.",
            "",
            *_lightning_method(),
        ]
    rows = [
        (
            r["model"],
            f"{r['base_ms']:.2f}",
            f"{r['arm_ms']:.2f}",
            fmt_ratio(r["ratio"]),
            fmt_spread(r["ratio"]),
            f"{r['rounds']} × {r['steps']} (+{r['warmup']})",
            verdict(r["ratio"], r["goal"]),
        )
        for r in core["rows"]
    ]
    L += [
        md_table(
            [
                "model",
                "plain ms",
                "HookedModule ms",
                "ratio",
                "spread",
                "rounds × steps (+warm-up)",
                "goal ≤ 1.02",
            ],
            rows,
        ),
        _img(images, "overhead", rel, "Overhead ratios of the core and of each family"),
    ]
    return L


def _families(results: dict, images: dict, rel: str, short: bool = False) -> list[str]:
    fam = results.get("families")
    if not fam:
        return []
    L = ["## 2. Per-family overhead", ""]
    if short:
        L += ["The same arms as in the reference run's section 2. Goal: ≤ 1.05×.", ""]
    else:
        L += [
            "A `HookedModule` with one plugin against a plain `LightningModule` that does the same",
            "math inline. Goal: ≤ 1.05×.",
            "",
            "- **sample weighting**: the installed `loss-reweighting` plugin (LinUpper, r = 1,",
            "  `burnin_steps=0` so that it acts from the first step) against a `training_step` that",
            "  computes the same softmax weights of the normalized losses and logs the same two",
            "  diagnostics (weight entropy and effective sample size) the plugin logs;",
            "- **pruning masks**: a schedule-only pruning plugin (sparsity rising linearly to 50%,",
            "  updated every 5 steps) with the core's built-in magnitude criterion, global allocation",
            "  and `torch.nn.utils.parametrize` masks, against a module that registers the same",
            "  masks itself and prunes in `optimizer_step` (global threshold by a stable sort of",
            "  |w| over all Linear/Conv weights, pruned weights stay pruned);",
            "- **reparameterization**: the installed `weight-compander` plugin (fixed a = 0.8,",
            "  b = 0.5: w = Ψ(v) = a·arctan(v/b) on every Linear/Conv weight as a",
            "  `torch.nn.utils.parametrize` parametrization, v₀ = b·tan(w₀/a), the decay",
            "  (λ/2)‖Ψ(v)‖² with λ = 1e-4 as an objective term, and its two logged diagnostics)",
            "  against a module that stores v in each layer and computes w = a·arctan(v/b) in a",
            "  forward pre-hook (no parametrize), with the same decay and diagnostics;",
            "- **preference objective**: DPO, the core's base objective for preference data",
            "  (`PreferenceModule`: one policy forward over [chosen; rejected], a frozen reference",
            "  forward, the DPO loss with β = 0.1, reward accuracy and margin logged as torchmetrics)",
            "  against a `training_step` that does the same by hand, on a 2-layer GPT-2 (width 64)",
            "  and synthetic preference pairs.",
            "",
            "Same math: before timing, each pair of arms trains a few steps once more (fresh",
            "modules, the same seed and batches) and the benchmark asserts that the per-step losses",
            "and the trained model's outputs on the first batch agree (relative L2 ≤ 1e-4); the",
            "*same math* column gives the differences found.",
            "",
            *_lightning_method(),
        ]
    rows = [
        (
            r["family"],
            r["plugin"],
            r["model"],
            f"{r['base_ms']:.2f}",
            f"{r['arm_ms']:.2f}",
            fmt_ratio(r["ratio"]),
            fmt_spread(r["ratio"]),
            f"{r['rounds']} × {r['steps']} (+{r['warmup']})",
            _check(r.get("check")),
            verdict(r["ratio"], r["goal"]),
        )
        for r in fam["rows"]
    ]
    rows += [
        (name, "—", "—", "—", "—", "—", "—", "—", "—", why)
        for name, why in fam.get("not_measured", {}).items()
    ]
    L += [
        md_table(
            [
                "family",
                "plugin",
                "model",
                "hand-written ms",
                "plugin ms",
                "ratio",
                "spread",
                "rounds × steps (+warm-up)",
                "same math (losses, outputs)",
                "goal ≤ 1.05",
            ],
            rows,
        ),
        "",
    ]
    if fam.get("not_measured"):
        L += [
            f"Not measured in this run: {', '.join(fam['not_measured'])} (the benchmark had no arm",
            "for them when it ran; the last column is the reason it recorded then).",
            "",
        ]
    return L


def _check(c: dict | None) -> str:
    if not c:
        return "not checked (run predates the check)"
    return f"{c['loss_rel']:.0e}, {c['output_rel']:.0e} over {c['steps']} steps"


def _surgery(results: dict, images: dict, rel: str) -> list[str]:
    surg = results.get("surgery")
    if not surg:
        return []
    from surgery import ARMS

    L = [
        "## 3. Gradient surgery",
        "",
        "A multi-task model: a shared trunk and K linear heads (10 classes each), one",
        "cross-entropy loss per head, one fixed batch. Every arm runs whole training steps",
        "(forward, gradients, SGD step) on its own copy of the same initial weights:",
        "",
        "- **one backward**: `(Σ_k L_k).backward()`, training without surgery;",
        "- **K backward**: `L_k.backward(retain_graph=True)` for every k, the K gradients and nothing else;",
        '- **paperhooks batched / loop**: `paperhooks.gradients.Engine("batched")` (one vmapped',
        '  vector-Jacobian product over the K objectives) and `Engine("loop")` (K `autograd.grad`',
        "  calls), with MGDA as the surgery chain, `grads.combine(min_norm_weights(grads.gram()))`,",
        "  on the trunk's parameters (as a `surgery_parameters` hook selects them), then `write_grads`;",
        "- **TorchJD**: `torchjd.autojac.mtl_backward(losses, features=trunk output, …)` then",
        "  `jac_to_grad(trunk parameters, MGDA())` (the torchjd 0.18 API);",
        "- **LibMTL**: its `HPS` architecture combined with its `MGDA` weighting as",
        "  `LibMTL.Trainer` combines them (`class MTLmodel(HPS, MGDA)`), `mgda_gn='none'`, losses in",
        "  a `[K]` tensor, `model.backward(losses, mgda_gn='none')`.",
        "",
        f"LibMTL on this torch: {surg['libmtl_shims']}",
        "",
        f"Peak memory: {surg['memory_method']}.",
        "",
        "Goal: paperhooks faster than both peers at every K, and within 1.2× of the K backward passes.",
        "The goals judge the mode `Engine()` picks on the run's device (`auto`: batched on CUDA, the",
        "loop on a CPU, where vmap's overhead measured slower); the tables give both modes.",
        "",
    ]
    for f in surg.get("failures", []):
        L += [f"**Failed: {f['case']}, K={f['k']}**: `{f['error'][:400]}`", ""]
    entries = surg["results"]
    for case in dict.fromkeys(e["case"] for e in entries):
        es = [e for e in entries if e["case"] == case]
        L += [
            f"### {case}",
            "",
            f"{es[0]['trunk_params']:,} trunk parameters. {es[0]['rounds']} rounds after "
            f"{es[0]['warmup']} warm-up steps per arm; in a round each arm runs about "
            f"{es[0].get('target_s', 0):g} s of steps, at least 1 and at most {es[0]['steps']}. "
            f"Steps per round ({', '.join(ARMS)}): "
            + "; ".join(
                f"K={e['k']}: " + "/".join(str(e["steps_per_round"][a]) for a in ARMS) for e in es
            )
            + ".",
            "",
            "Step time, ms (median over rounds; min – max):",
            "",
            md_table(
                ["K", *ARMS],
                [
                    (
                        e["k"],
                        *(
                            f"{e['ms'][a]:.1f} ({e['ms_spread'][a][0]:.1f} – {e['ms_spread'][a][1]:.1f})"
                            for a in ARMS
                        ),
                    )
                    for e in es
                ],
            ),
            "",
            "Ratios (round by round; median, min – max):",
            "",
            md_table(
                [
                    "K",
                    "batched / K backward",
                    "loop / K backward",
                    "batched / TorchJD",
                    "batched / LibMTL",
                    "loop / TorchJD",
                    "loop / LibMTL",
                    "TorchJD / K backward",
                    "LibMTL / K backward",
                ],
                [
                    (
                        e["k"],
                        *(
                            f"{fmt_ratio(r)} ({fmt_spread(r)})"
                            for r in (
                                e["vs_k_backward"]["paperhooks batched"],
                                e["vs_k_backward"]["paperhooks loop"],
                                e["vs_torchjd"]["paperhooks batched"],
                                e["vs_libmtl"]["paperhooks batched"],
                                e["vs_torchjd"]["paperhooks loop"],
                                e["vs_libmtl"]["paperhooks loop"],
                                e["vs_k_backward"]["TorchJD"],
                                e["vs_k_backward"]["LibMTL"],
                            )
                        ),
                    )
                    for e in es
                ],
            ),
            "",
            "Peak extra memory in one step (the last column is the size of one `[K, P_trunk]`",
            "float32 matrix, the K trunk gradients, for scale):",
            "",
            md_table(
                ["K", *ARMS, "one [K, P_trunk] float32"],
                [
                    (
                        e["k"],
                        *(fmt_bytes(e["peak_bytes"][a]) for a in ARMS),
                        fmt_bytes(4 * e["k"] * e["trunk_params"]),
                    )
                    for e in es
                ],
            ),
            "",
            "Same update? Relative L2 distance of each method's trunk update to paperhooks batched",
            f"(asserted ≤ {surg['tol']:g}; MGDA's solvers stop at different tolerances), and what",
            "each gives the heads:",
            "",
            md_table(
                [
                    "K",
                    "paperhooks loop",
                    "TorchJD",
                    "LibMTL",
                    "heads: paperhooks",
                    "heads: TorchJD",
                    "heads: LibMTL",
                ],
                [
                    (
                        e["k"],
                        f"{e['check']['trunk_rel']['paperhooks loop']:.1e}",
                        f"{e['check']['trunk_rel']['TorchJD']:.1e}",
                        f"{e['check']['trunk_rel']['LibMTL']:.1e}",
                        e["check"]["heads"]["paperhooks batched"],
                        e["check"]["heads"]["TorchJD"],
                        e["check"]["heads"]["LibMTL"],
                    )
                    for e in es
                ],
            ),
            "",
        ]
        last = es[-1]
        unit = 4 * last["k"] * last["trunk_params"]
        if last["peak_bytes"]["paperhooks batched"] > 1.5 * last["peak_bytes"]["TorchJD"]:
            L += [
                f"At K={last['k']} paperhooks peaks at "
                f"{last['peak_bytes']['paperhooks batched'] / unit:.1f} `[K, P_trunk]` float32 matrices, "
                f"TorchJD at {last['peak_bytes']['TorchJD'] / unit:.1f}, LibMTL at "
                f"{last['peak_bytes']['LibMTL'] / unit:.1f}. The paperhooks engine holds the `[K, P]`",
                "gradients of all parameters, a copy of the surgery columns taken out of them when the",
                "surgery set is a subset of the parameters, and `GradientSet.gram()` multiplies a",
                "float64 copy of the rows (`rows.double()`), two matrices' worth.",
                "",
            ]
        heads_differ = any(
            e["check"]["heads"]["paperhooks batched"] != e["check"]["heads"]["TorchJD"] for e in es
        )
        if heads_differ:
            L += [
                "The trunk's update is the same; the heads' is not. TorchJD and LibMTL give head k",
                "the plain gradient of its own loss (Sener & Koltun's update for task-specific",
                "parameters); the paperhooks engine applies the MGDA weights to every parameter",
                "outside the surgery set as well (`Σ_k α_k g_k` restricted to head k is `α_k ∇L_k`),",
                "so its heads move α_k times as far.",
                "",
            ]
        prof = next((e.get("profile") for e in es if e.get("profile")), None)
        k_prof = next((e["k"] for e in es if e.get("profile")), None)
        prof_arm = next((e.get("profile_arm") for e in es if e.get("profile")), None)
        if prof:
            L += [
                f"Where `{prof_arm or 'paperhooks batched'}` spends a step at K={k_prof} (cProfile, "
                "self time per step;",
                f"profiled step {prof['step_ms']:.1f} ms):",
                "",
                md_table(
                    ["function", "ms per step", "share", "calls per step"],
                    [
                        (
                            f"`{t['function']}`",
                            f"{t['ms']:.2f}",
                            f"{100 * t['ms'] / prof['step_ms']:.0f}%",
                            f"{t['calls']:.0f}",
                        )
                        for t in prof["top"]
                    ],
                ),
                "",
            ]
            top = prof["top"][0] if prof["top"] else None
            if (
                top
                and top["function"].endswith("(run)")
                and "gradients.py" in top["function"]
                and top["ms"] > 0.3 * prof["step_ms"]
            ):
                L += [
                    f"Most of the step ({100 * top['ms'] / prof['step_ms']:.0f}%) is the self time of",
                    "`Engine.run` itself, not autograd and not the solver: when the surgery set is a",
                    "subset of the parameters, `run` separates its columns from the others by indexing",
                    "the `[K, P]` gradient matrix with Python lists of column indices",
                    "(`local[:, s_idx]`, `full[s_idx] = …`, `full[o_idx] = …`), built and converted",
                    "every step, which costs far more than the backward passes. Index tensors built",
                    "once (or slices, since each parameter's block is contiguous) would remove it.",
                    "",
                ]
    if results.get("device") == "cpu" and surg.get("results"):
        L += [
            "On a CPU the engine's time over the K backward passes is memory traffic over the",
            "`[K, P]` gradient rows, which plain backward passes never build: each objective's",
            "gradients copied into its row (`copy_`), the Gram matrix and the combination (matrix",
            "products over the rows, `gram`, `combine`), the surgery and head blocks joined (`cat`)",
            "and the private copy `write_grads` keeps (`clone`). On one CPU thread a pass over",
            "resnet18's K × 11 M rows costs tens of milliseconds. Since 2026-11-29 the Gram matrix",
            "is summed over cache-sized column blocks in float64 (closer to float64 and faster: at",
            "K = 8 on resnet18 `gram` took 283 ms of self time per profiled step before, 84 ms in",
            "the profile above), and the engine writes the rows into",
            "the previous step's buffer on a CPU when no plugin kept them: fresh rows page-faulted",
            "every page again (a torch profile of the loop at K = 2 before the change: `copy_`",
            "104 ms per 570 ms step; an A/B of the change alone on resnet18 at K = 2, 6 alternating",
            "rounds: 697 against 746 ms per step, medians). A GPU makes these passes at its memory",
            "bandwidth (the `h200` run",
            "below: 0.90 – 1.18× of the K backward passes on resnet18).",
            "",
        ]
    L += [
        _img(images, "surgery_time", rel, "Step time against K"),
        _img(images, "surgery_memory", rel, "Peak memory against K"),
    ]
    return L


def _dist(results: dict, images: dict, rel: str) -> list[str]:
    d = results.get("dist")
    if not d:
        return []
    L = [
        "## 4. Distributed cost",
        "",
        f"Bytes per training step on {d['world']} processes (DDP, gloo, CPU), counted exactly, not",
        f"timed. Model: an MLP trunk (64-128-32) and K linear heads, {d['batch_per_rank']} samples per",
        "rank. **DDP** is the gradient traffic of DDP itself, counted by a communication hook",
        "(`register_comm_hook`) that adds up the size of each gradient bucket and then calls the",
        "default all-reduce hook; **paperhooks** is `paperhooks.dist.traffic`, the payload this",
        "process hands to each collective of `paperhooks.dist`. Payloads are what a rank hands",
        "to the collective; **sent per rank** estimates what a ring algorithm then sends:",
        "2(R−1)/R × payload for an all-reduce, (R−1)/R × payload for a reduce-scatter (the payload",
        "is the full `[K, P]` input), (R−1) × payload for an all-gather (the payload is this",
        "rank's part).",
        "",
        "Arms: no plugin (`Σ_k L_k`, DDP all-reduces the gradients); `loss-reweighting` (one",
        "all-gather of the per-sample losses for the global weights, one all-reduce of their sum",
        "for the normalization); the built-in magnitude pruning on a step that updates the masks",
        "(masks come from replicated weights: no collective); gradient surgery (MGDA through",
        "`paperhooks.gradients.Engine`, DDP kept out with `no_sync` as `HookedModule` does it) in",
        "the `full` layout (one all-reduce of the `[K, P]` gradients) and the `columns` layout (one",
        "reduce-scatter of `[K, P]`, an all-reduce of the `K×K` Gram matrix and one of the final",
        "direction).",
        "",
    ]
    rows = []
    for r in d["rows"]:
        ph = ", ".join(f"{op} {fmt_bytes(b)}" for op, b in sorted(r["paperhooks"].items())) or "—"
        arm = r["arm"] + (
            f" (sparsity after the step {r['sparsity']:.2f})"
            if r.get("sparsity") is not None
            else ""
        )
        rows.append(
            (
                r["k"],
                arm,
                f"{r['params']:,}",
                f"{fmt_bytes(r['ddp_bytes'])} ({r['ddp_buckets']} bucket{'s' if r['ddp_buckets'] != 1 else ''})",
                ph,
                fmt_bytes(r["total_bytes"]),
                f"{r['ratio']:.3f}",
                fmt_bytes(r["wire_bytes"]),
                f"{r['wire_ratio']:.3f}",
            )
        )
    L += [
        md_table(
            [
                "K",
                "arm",
                "parameters",
                "DDP payload",
                "paperhooks payload",
                "total payload",
                "× no plugin",
                "sent per rank",
                "× no plugin",
            ],
            rows,
        ),
        "",
        "Both ranks counted the same bytes."
        if d.get("ranks_agree")
        else "**The two ranks counted different bytes.**",
        "Not counted by `paperhooks.dist.traffic`: `all_gather_cat` first all-gathers each rank's",
        "row count (one int64 per rank) before the padded payload.",
        "",
        "Under DDP, pruning needs no global top-k over shards: every rank holds all the weights",
        "and computes the same masks. Under FSDP2 a mask update selects over the shards with",
        "`dist.topk_mask`: one all-reduce of the element count, 32 bisection rounds of one",
        "all-reduced int64 count each, and one all-gather of 2 int64 per layer per rank (no score",
        "leaves its rank).",
    ]
    if d.get("topk"):
        t0 = d["topk"][0]
        L += [
            f"Measured on {d['world']} gloo processes, each holding its block of rows of the trunk's",
            f"{t0['layers']} weight matrices ({t0['scores']:,} scores), global magnitude selection:",
            "",
            md_table(
                [
                    "sparsity",
                    "top-k payload",
                    "sent per rank",
                    "gather every score instead",
                    "masks = 1 process",
                ],
                [
                    (
                        f"{t['sparsity']:.2f}",
                        ", ".join(f"{op} {fmt_bytes(b)}" for op, b in sorted(t["traffic"].items())),
                        fmt_bytes(t["wire"]),
                        f"{fmt_bytes(t['gather_payload'])} payload, {fmt_bytes(t['gather_wire'])} sent",
                        "yes" if t["equals_one_process"] and t["ranks_agree"] else "**no**",
                    )
                    for t in d["topk"]
                ],
            ),
            "",
            "The selection's traffic does not grow with the number of weights (only with the",
            "number of layers); gathering the scores grows with it.",
        ]
    L.append(_img(images, "dist", rel, "Bytes per step under 2-process DDP"))
    return L


def _cli(results: dict, images: dict, rel: str) -> list[str]:
    c = results.get("cli")
    if not c:
        return []
    rows = [
        (
            f"`{r['command']}`",
            f"{r['s']['median']:.2f}",
            f"{r['s']['min']:.2f} – {r['s']['max']:.2f}",
        )
        for r in c["rows"]
    ]
    L = [
        "## 5. CLI latency",
        "",
        f"Wall time of a fresh process, median of {c['repeats']} runs"
        + (" after one untimed run" if c.get("warm_run", True) else "")
        + ", with every",
        f"installed plugin ({len(c['plugins'])}: {', '.join(c['plugins'])}). The bare interpreter and",
        "`import torch` are there for scale.",
        "",
        md_table(["command", "median s", "min – max"], rows),
        "",
        f"`paperhooks plugins` takes {c['plugins_vs_import_torch']:.2f}× the time of `import torch`.",
        "",
        *(
            [
                "Where `paperhooks plugins` spends its time (`python -X importtime`, one run; the",
                "slowest imports made by the command itself or by a plugin's entry point, each with",
                "everything it imported first):",
                "",
                md_table(
                    ["module", "cumulative s"],
                    [(f"`{r['module']}`", f"{r['s']:.2f}") for r in c["plugins_imports"]],
                ),
                "",
                "Listing the plugins imports every plugin's module (the entry point is loaded to",
                "read its family and paper), and with it whatever that module imports at the top.",
            ]
            if c.get("plugins_imports")
            else []
        ),
        _img(images, "cli", rel, "CLI latency"),
    ]
    return L


# -- labelled runs ------------------------------------------------------------------------------------------
def no_reference() -> str:
    return "\n".join(
        [
            "# Benchmarks",
            "",
            "<!-- Generated by benchmarks/run_all.py: rerun it rather than editing this page. -->",
            "",
            "No reference run yet (`benchmarks/results.json`): run `python benchmarks/run_all.py`",
            "without `--label`.",
            "",
        ]
    )


def _demote(lines: list[str]) -> list[str]:
    return ["#" + x if x.startswith("#") else x for x in lines]


def labelled_section(
    label: str, results: dict, images: dict[str, str], figs_rel: str = "benchmarks"
) -> str:
    """A run apart from the reference one (``results-LABEL.json``), as one ``##`` section."""
    runs = results.get("runs") or [
        {
            "command": results["command"],
            "started": results["started"],
            "parts": results.get("parts_run", []),
            "load": results.get("machine", {}).get("load average at start", "?"),
            "quick": results.get("quick", False),
        }
    ]
    L = [
        f"## Run `{label}`: {_where_run(results)}",
        "",
        "A run apart from the reference one above, kept in",
        f"[`benchmarks/results-{label}.json`](benchmarks/results-{label}.json) (the reference",
        "run's numbers are not touched by it). Commands that measured it, one per part:",
        "",
        _runs_table(runs),
        "",
        md_table(["", ""], [(k, v) for k, v in results.get("machine", {}).items()]),
        "",
    ]
    if results.get("note"):
        L += [results["note"], ""]
    for part, err in results.get("errors", {}).items():
        L += [f"**Part `{part}` failed** in this run: `{err.splitlines()[-1][:300]}`", ""]
    gl = goals(results)
    if gl:
        L += [
            f"### Goals (`{label}`)",
            "",
            md_table(
                ["part", "comparison", "goal", "result (median, spread)", "verdict"],
                [(g["part"], g["what"], g["goal"], g["result"], g["verdict"]) for g in gl],
            ),
            "",
        ]
    body = _core(results, images, figs_rel, short=True) + _families(
        results, images, figs_rel, short=True
    )
    body += (
        _surgery(results, images, figs_rel)
        + _dist(results, images, figs_rel)
        + _cli(results, images, figs_rel)
    )
    body += _profiles(results)
    L += _demote(body)
    return "\n".join(L).rstrip() + "\n"


def _runs_table(runs: list[dict]) -> str:
    return md_table(
        ["command", "started", "parts", "load average at start", "--quick"],
        [
            (
                f"`{r['command']}`",
                r["started"],
                ", ".join(r["parts"]),
                r.get("load", "?"),
                "yes" if r.get("quick") else "no",
            )
            for r in runs
        ],
    )


def _where_run(results: dict) -> str:
    m = results.get("machine", {})
    if results.get("device") == "cuda":
        return m.get("GPU", "cuda")
    return f"CPU ({m.get('CPU', '?')}), {results.get('started', '')[:10]}"


def _profiles(results: dict) -> list[str]:
    prof = results.get("profiles")
    if not prof:
        return []
    L = [
        "## Profiles of the missed goals",
        "",
        prof.get("method", ""),
        "",
        "Each table lists the functions the paperhooks arm calls more often than the hand-written",
        "one, or alone, by the self time they add per step. Some are paperhooks' own versions of",
        "work both arms do (the hand-written arm's versions, under its own names, are in the line",
        "under each table); the *why* lines are a reading of the whole profile files.",
        "",
    ]
    for p in prof.get("entries", []):
        L += [
            f"**{p['title']}** ([`benchmarks/{p['file']}`](benchmarks/{p['file']})), "
            f"{p['steps']} steps per arm: {p['arm_ms']:.2f} ms per profiled step with paperhooks, "
            f"{p['base_ms']:.2f} ms hand-written ({p['arm_ms'] - p['base_ms']:+.2f} ms in this one "
            f"run); the functions paperhooks calls more often add {p['added_ms']:+.2f} ms of self "
            f"time per step, {p['only_in_paperhooks_ms']:.2f} ms in functions only it calls. The largest:",
            "",
            md_table(
                ["function", "paperhooks ms", "hand-written ms", "extra ms", "calls per step"],
                [
                    (
                        f"`{d['function']}`",
                        f"{d['arm_ms']:.3f}",
                        f"{d['base_ms']:.3f}",
                        f"{d['extra_ms']:+.3f}",
                        f"{d['arm_calls']:g} vs {d['base_calls']:g}",
                    )
                    for d in p["extra"]
                ],
            ),
            "",
        ]
        if p.get("savings"):
            L += [
                "Where the hand-written arm spends more (often the same work under its own function "
                "names): "
                + "; ".join(
                    f"`{d['function']}` {d['base_ms']:.3f} ms vs {d['arm_ms']:.3f} ms"
                    for d in p["savings"]
                )
                + ".",
                "",
            ]
        if p.get("why"):
            L += ["Why: " + p["why"], ""]
    return L
