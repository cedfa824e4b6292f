"""CLI latency: wall time of ``paperhooks --help`` and ``paperhooks plugins`` in a fresh process,
with every installed plugin, next to the bare interpreter and ``import torch`` for scale.

Each command runs 5 times after one untimed run that warms the file cache (``--quick``: twice,
no untimed run); the median and the min–max are reported.

Part of ``benchmarks/run_all.py``; alone: ``python benchmarks/cli_latency.py [--quick]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import Settings, summary


def paperhooks_exe() -> list[str]:
    """The ``paperhooks`` console script next to this interpreter (else on PATH, else ``-m``)."""
    here = Path(sys.executable).parent / "paperhooks"
    if here.exists():
        return [str(here)]
    found = shutil.which("paperhooks")
    return [found] if found else [sys.executable, "-m", "paperhooks.cli"]


def commands() -> list[tuple[str, list[str]]]:
    exe = paperhooks_exe()
    py = sys.executable
    return [
        ("python -c pass (interpreter start)", [py, "-c", "pass"]),
        ("python -c 'import torch'", [py, "-c", "import torch"]),
        ("paperhooks --help", [*exe, "--help"]),
        ("paperhooks plugins", [*exe, "plugins"]),
    ]


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def import_profile(top: int = 8) -> list[dict]:
    """``python -X importtime`` of ``paperhooks plugins``: the slowest top-level imports.

    Top-level means imported by the command itself (or a plugin's entry point), not by
    another module; the time is cumulative (the module and everything it imported first).
    """
    code = "import sys; from paperhooks.cli import main; sys.exit(main(['plugins']))"
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if name.startswith("  ") or not cumulative.strip().isdigit():
            continue  # nested import, or the header line
        rows.append({"module": name.strip(), "s": int(cumulative) / 1e6})
    rows.sort(key=lambda r: -r["s"])
    return rows[:top]


def installed_plugins() -> list[str]:
    from importlib.metadata import entry_points

    return sorted(ep.name for ep in entry_points(group="paperhooks"))


def run(s: Settings) -> dict:
    repeats = s.pick(2, 5)
    warm = not s.quick  # --quick: the earlier parts have already read the same files
    rows = []
    for name, cmd in commands():
        if warm:
            wall(cmd)  # warm the file cache
        times = [wall(cmd) for _ in range(repeats)]
        rows.append({"command": name, "argv": cmd, "s": summary(times)})
        st = rows[-1]["s"]
        print(f"  cli {name}: {st['median']:.2f} s [{st['min']:.2f}, {st['max']:.2f}]", flush=True)
    torch_import = next(r for r in rows if "import torch" in r["command"])["s"]["median"]
    plugins_cmd = next(r for r in rows if r["command"] == "paperhooks plugins")
    probe = subprocess.run(
        [*paperhooks_exe(), "plugins"], capture_output=True, text=True, check=False
    )
    return {
        "rows": rows,
        "repeats": repeats,
        "warm_run": warm,
        "plugins": installed_plugins(),
        "plugins_vs_import_torch": plugins_cmd["s"]["median"] / torch_import,
        "plugins_output_lines": len(probe.stdout.splitlines()),
        "plugins_imports": import_profile(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ignored")
    args = ap.parse_args()
    run(Settings(quick=args.quick))


if __name__ == "__main__":
    main()
