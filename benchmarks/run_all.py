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
are indicative only. ``--only`` runs some parts (for debugging; the page then says which
parts did not run); ``--render-only`` rewrites the page and plots from the saved
``results.json`` without measuring anything.
"""

from __future__ import annotations

import argparse
import json
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
    ap.add_argument("--only", nargs="+", choices=PARTS, help="run only these parts (debugging)")
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: rewrite the page and plots from OUT/benchmarks/results.json",
    )
    return ap.parse_args(argv)


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
        images = report.plots(results, figs)
        (out / "benchmarks.md").write_text(report.page(results, images, figs_rel="benchmarks"))
        print(
            f"rewrote {out / 'benchmarks.md'} and {len(images)} plots from {figs / 'results.json'}"
        )
        print(report.summary_text(results))
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

    settings = _common.Settings(device=args.device, quick=args.quick)
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
        write(results, out, figs)  # after every part: a run cut short still leaves a page

    images = write(results, out, figs)
    print(
        f"wrote {out / 'benchmarks.md'} and {len(images)} plots in {figs} "
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


def write(results: dict, out: Path, figs: Path) -> dict[str, str]:
    import _report as report

    (figs / "results.json").write_text(json.dumps(results, indent=1, default=str))
    images = report.plots(results, figs)
    (out / "benchmarks.md").write_text(report.page(results, images, figs_rel="benchmarks"))
    return images


if __name__ == "__main__":
    raise SystemExit(main())
