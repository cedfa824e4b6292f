"""Every paperhooks benchmark in one run; writes ``OUT/benchmarks.md`` and ``OUT/benchmarks/*.png``.

    python benchmarks/run_all.py [--device cpu|cuda] [--quick] [--out docs] [--threads N]

Parts (each also runs alone, see its docstring):

1. ``core_overhead.py``: HookedModule without plugins vs a plain LightningModule (goal ≤ 1.02×);
2. ``families.py``: each family's plugin vs the same math inline in a LightningModule (≤ 1.05×);
3. ``surgery.py``: gradient surgery for K = 2, 4, 8 objectives vs K backward passes, TorchJD and
   LibMTL, with peak memory and a check that all compute the same update;
4. ``dist_traffic.py``: bytes communicated per step under 2-process DDP (gloo), counted exactly;
5. ``cli_latency.py``: ``paperhooks --help`` and ``paperhooks plugins``.

Times are medians over rounds in which the arms alternate, after warm-up; ratios are taken
round by round and given as median with min–max. ``--quick`` (fewer rounds, smaller models)
checks that the whole thing works in about three minutes on a small CPU machine; its numbers
are indicative only. ``--render-only`` rewrites the page and plots from the saved results
without measuring anything.

Results files: ``OUT/benchmarks/results.json`` is the reference run (the page's main
sections); ``--label NAME`` writes ``OUT/benchmarks/results-NAME.json`` instead, shown in a
section of its own after the reference run (e.g. ``--label cpu`` for a run on a CPU machine
next to the GPU reference). ``--only`` runs some parts and merges them into the results file
it writes (the other parts keep their earlier numbers; the page says which command measured
which part); without ``--only`` a run replaces the file.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("core", "families", "surgery", "dist", "cli")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where models train (default cpu)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repeats, smaller sizes (a smoke run, ~3 min on 2 cores)",
    )
    ap.add_argument(
        "--out", default="docs", help="folder for benchmarks.md and benchmarks/*.png (default docs)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's own choice); 1 is steadier on a busy machine",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        help="run only these parts, merged into the results file (the others keep their numbers)",
    )
    ap.add_argument(
        "--label",
        help="a run apart from the reference one: results in OUT/benchmarks/results-LABEL.json, "
        "shown in their own section of the page (results.json is left as it is)",
    )
    ap.add_argument(
        "--note",
        default=None,
        help="a sentence about the machine or the run, printed with its results (e.g. that the "
        "machine was shared with other jobs); kept by later --only runs that give none",
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the core and per-family comparisons (default: 9/7 on CPU, 7/5 on CUDA)",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the page and plots from OUT/benchmarks/results*.json",
    )
    args = ap.parse_args(argv)
    if args.label is not None and not LABEL.fullmatch(args.label):
        ap.error(f"--label {args.label!r}: letters, digits, '-' and '_' only (it names a file)")
    if args.rounds is not None and args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


LABEL = re.compile(r"[A-Za-z0-9_-]+")


def results_file(figs: Path, label: str | None) -> Path:
    """The reference run's ``results.json``, or ``results-LABEL.json``."""
    return figs / ("results.json" if not label else f"results-{label}.json")


def labelled_runs(figs: Path) -> dict[str, dict]:
    """``{label: results}`` of every ``results-LABEL.json`` in ``figs``, by label."""
    out = {}
    for f in sorted(figs.glob("results-*.json")):
        label = f.stem.removeprefix("results-")
        if LABEL.fullmatch(label):
            out[label] = json.loads(f.read_text())
    return out


def merge(old: dict, new: dict) -> dict:
    """``new``'s parts over ``old``'s: the parts ``new`` ran replace the old ones, the others
    stay, and ``runs`` lists which command measured which part, when, on what load."""
    merged = dict(old)
    for part in new["parts_run"]:
        merged.pop(part, None)
        merged.get("errors", {}).pop(part, None)
        if part in new:
            merged[part] = new[part]
    if new.get("errors"):
        merged.setdefault("errors", {}).update(new["errors"])
    if not merged.get("errors"):
        merged.pop("errors", None)
    merged["parts_run"] = [
        p for p in PARTS if p in set(old.get("parts_run", [])) | set(new["parts_run"])
    ]
    durations = dict(old.get("durations_s", {}))
    durations.update({k: v for k, v in new["durations_s"].items() if k != "total"})
    durations["total"] = round(sum(v for k, v in durations.items() if k != "total"), 1)
    merged["durations_s"] = durations
    runs = [r for r in _runs(old) if set(r["parts"]) - set(new["parts_run"])]
    for r in runs:
        r["parts"] = [p for p in r["parts"] if p not in new["parts_run"]]
    merged["runs"] = runs + _runs(new)
    for key in ("command", "started", "quick", "device", "machine", "note"):
        if key in new:
            merged[key] = new[key]
    return merged


def _runs(results: dict) -> list[dict]:
    if "runs" in results:
        return [dict(r) for r in results["runs"]]
    return [
        {
            "command": results["command"],
            "started": results["started"],
            "parts": list(results.get("parts_run", [])),
            "load": results.get("machine", {}).get("load average at start", "?"),
            "quick": results.get("quick", False),
        }
    ]


def command_line(argv: list[str]) -> str:
    return "python benchmarks/run_all.py" + ("" if not argv else " " + shlex.join(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    figs = out / "benchmarks"
    if args.render_only:
        sys.path.insert(0, str(HERE))
        import _report as report

        results = json.loads((figs / "results.json").read_text())
        images = render(results, out, figs)
        print(f"rewrote {out / 'benchmarks.md'} and {images} plots from {figs}/results*.json")
        print(report.summary_text(results))
        for label, extra in labelled_runs(figs).items():
            print(f"[{label}] " + report.summary_text(extra))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "run_all.py --device cuda: CUDA is not available (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built for CUDA {torch.version.cuda}). Run with --device cpu, "
            "or on a machine with an NVIDIA GPU and a CUDA build of torch.",
            file=sys.stderr,
        )
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, str(HERE))
    import _common
    import _report as report

    settings = _common.Settings(device=args.device, quick=args.quick, rounds=args.rounds)
    _common.quiet()
    parts = args.only or list(PARTS)
    results: dict = {
        "command": command_line(argv),
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "device": args.device,
        "machine": _common.machine(settings),
        "parts_run": parts,
        "durations_s": {},
    }
    if args.label:
        results["label"] = args.label
    if args.note:
        results["note"] = args.note
    target = results_file(figs, args.label)
    earlier = json.loads(target.read_text()) if args.only and target.exists() else None
    runners = {
        "core": ("core_overhead", "1. core overhead"),
        "families": ("families", "2. per-family overhead"),
        "surgery": ("surgery", "3. gradient surgery"),
        "dist": ("dist_traffic", "4. distributed traffic"),
        "cli": ("cli_latency", "5. CLI latency"),
    }
    t_all = time.perf_counter()
    failed = []
    figs.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        if part not in parts:
            continue
        module, title = runners[part]
        print(f"{title} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[part] = __import__(module).run(settings)
        except Exception as e:  # noqa: BLE001 - one broken part must not cost the others
            failed.append(part)
            results.setdefault("errors", {})[part] = "".join(
                traceback.format_exception_only(type(e), e)
            ).strip()
            traceback.print_exc()
        results["durations_s"][part] = round(time.perf_counter() - t0, 1)
        results["durations_s"]["total"] = round(time.perf_counter() - t_all, 1)
        print(f"{title}: {results['durations_s'][part]:.0f} s", flush=True)
        write(results, earlier, target, out, figs)  # after every part: a cut run leaves a page

    images = write(results, earlier, target, out, figs)
    print(
        f"wrote {target}, {out / 'benchmarks.md'} and {images} plots in {figs} "
        f"({results['durations_s']['total']:.0f} s)"
    )
    print(report.summary_text(results))
    if results.get("surgery", {}).get("failures"):
        failed.append("surgery (some cases)")
    if failed:
        print(
            f"FAILED parts: {', '.join(failed)} (see the page and the tracebacks above)",
            file=sys.stderr,
        )
        return 1
    return 0


def write(results: dict, earlier: dict | None, target: Path, out: Path, figs: Path) -> int:
    """Save this run (merged into ``earlier`` under ``--only``) and rewrite the whole page."""
    saved = merge(earlier, results) if earlier is not None else results
    target.write_text(json.dumps(saved, indent=1, default=str))
    main_file = figs / "results.json"
    reference = json.loads(main_file.read_text()) if main_file.exists() else None
    return render(reference, out, figs)


def render(reference: dict | None, out: Path, figs: Path) -> int:
    """The page: the reference run (``results.json``), then one section per labelled run.
    Returns the number of plots written."""
    import _report as report

    images = report.plots(reference, figs) if reference else {}
    extras = labelled_runs(figs)
    text = (
        report.page(reference, images, figs_rel="benchmarks", others=tuple(extras))
        if reference
        else report.no_reference()
    )
    n = len(images)
    for label, extra in extras.items():
        extra_images = report.plots(extra, figs, suffix=f"-{label}")
        text += "\n" + report.labelled_section(label, extra, extra_images, figs_rel="benchmarks")
        n += len(extra_images)
    (out / "benchmarks.md").write_text(text)
    return n


if __name__ == "__main__":
    raise SystemExit(main())
