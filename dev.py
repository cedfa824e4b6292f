#!/usr/bin/env python3
"""Developer bootstrap for paperhooks. Standard library only; run it with Python 3.11+.

    python3.11 dev.py setup          create .venv and install core + every plugin (editable)
    python3.11 dev.py test [ARGS]    setup, then run the test suite on 2 workers (ARGS go to pytest);
                                     the plugins' multi-process checks are skipped (conftest.py)
    python3.11 dev.py test --all     the same with the plugins' multi-process checks
    python3.11 dev.py demo [K=V]     setup, then train the demo twice: uniform vs loss-reweighting
                                     (K=V overrides go to both runs, e.g. seed=1)

``setup`` creates ``.venv`` next to this file (if it is missing) and runs::

    pip install -c constraints.txt -e .[dev] -e plugins/<each plugin with a pyproject.toml> pytest pytest-xdist ruff nox

It records a hash of ``constraints.txt``, every ``pyproject.toml`` and the Python version in
``.venv/.paperhooks-setup``; while that hash is unchanged, ``setup`` does nothing. ``--force``
reinstalls anyway. ``demo --no-setup`` and ``test --no-setup`` use the Python running this
script instead of ``.venv`` (that is how the nox sessions call them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".paperhooks-setup"
CONSTRAINTS = ROOT / "constraints.txt"
TOOLS = ("pytest", "pytest-xdist", "ruff", "nox")
MIN_PYTHON = (3, 11)
#: about what a fresh install takes on disk (torch's CUDA wheel and its nvidia-* libraries
#: are most of it; measured 6.5 GB for .venv, plus pip's unpacked wheels while installing)
INSTALL_GB = 8.0

#: the two arms of the demo, in the order they are printed
DEMO = (
    ("uniform", ROOT / "recipes" / "demo-digits-uniform.yaml"),
    ("loss-reweighting", ROOT / "recipes" / "demo-digits-reweighted.yaml"),
)
DEMO_METRICS = ("val/acc", "val/loss")


def say(msg: str) -> None:
    print(f"dev.py: {msg}", flush=True)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def plugin_dirs() -> list[Path]:
    """Every ``plugins/<slug>/`` that is a distribution (has a ``pyproject.toml``), sorted."""
    return sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def has_dev_extra() -> bool:
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        extras = tomllib.load(f).get("project", {}).get("optional-dependencies", {})
    return "dev" in extras


def _extras(pyproject: Path) -> dict:
    import tomllib

    with open(pyproject, "rb") as f:
        return tomllib.load(f).get("project", {}).get("optional-dependencies", {})


def install_args() -> list[str]:
    core = ".[dev]" if has_dev_extra() else "."
    args = ["-c", str(CONSTRAINTS.relative_to(ROOT)), "-e", core]
    for d in plugin_dirs():
        # a plugin's own test dependencies (e.g. a reference library) come with its ``test`` extra
        extra = "[test]" if "test" in _extras(d / "pyproject.toml") else ""
        args += ["-e", str(d.relative_to(ROOT)) + extra]
    return args + list(TOOLS)


def setup_key() -> str:
    """Hash of everything that decides what gets installed."""
    h = hashlib.sha256()
    h.update(f"{sys.version_info[:2]}\n".encode())
    h.update(" ".join(install_args()).encode())
    for path in [
        CONSTRAINTS,
        ROOT / "pyproject.toml",
        *(d / "pyproject.toml" for d in plugin_dirs()),
    ]:
        h.update(f"\n{path.relative_to(ROOT)}\n".encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def check_python() -> None:
    if sys.version_info[:2] < MIN_PYTHON:
        sys.exit(
            f"dev.py: needs Python {'.'.join(map(str, MIN_PYTHON))}+, this is {sys.version.split()[0]} "
            f"({sys.executable}); run it as: python3.11 dev.py ..."
        )


def setup(force: bool = False) -> Path:
    """Create ``.venv`` and install everything into it, unless the stamp says it is done."""
    check_python()
    py = venv_python()
    key = setup_key()
    if not force and py.is_file() and STAMP.is_file() and STAMP.read_text().strip() == key:
        return py
    if py.is_file() and not _works(py):
        say(f"{VENV} is broken (its python does not run); recreating it")
        shutil.rmtree(VENV)
    if not py.is_file():
        say(f"creating {VENV.relative_to(ROOT)} with Python {sys.version.split()[0]}")
        venv.EnvBuilder(with_pip=True, clear=VENV.exists()).create(VENV)
    STAMP.unlink(missing_ok=True)
    plugins = ", ".join(d.name for d in plugin_dirs()) or "none"
    say(
        f"installing paperhooks and plugins ({plugins}) editable; the first time takes a few minutes"
    )
    free_gb = _free_gb(VENV)
    if free_gb < INSTALL_GB:
        say(
            f"warning: {free_gb:.1f} GB free on the disk of {VENV}; a fresh install needs about "
            f"{INSTALL_GB:.0f} GB (torch's CUDA wheel and its nvidia libraries)"
        )
    log = VENV / "pip-install.log"
    start = time.monotonic()
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *install_args()]
    with open(log, "w") as out:
        out.write(" ".join(cmd) + "\n")
        out.flush()
        rc = subprocess.call(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        print("\n".join(lines[-60:]), file=sys.stderr)
        if any("No space left on device" in line for line in lines[-60:]):
            sys.exit(
                f"dev.py: pip install failed (exit {rc}): the disk is full ({_free_gb(VENV):.1f} GB "
                f"free now; a fresh install needs about {INSTALL_GB:.0f} GB). Free space (old "
                f"virtual environments, clones) and run it again; full log: {log}"
            )
        sys.exit(f"dev.py: pip install failed (exit {rc}); full log: {log}")
    STAMP.write_text(key + "\n")
    say(f"set up in {time.monotonic() - start:.0f}s (log: {log.relative_to(ROOT)})")
    return py


def _free_gb(path: Path) -> float:
    """Free space, in GB, on the disk that holds ``path`` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def _works(py: Path) -> bool:
    try:
        return (
            subprocess.run([str(py), "-c", "pass"], capture_output=True, timeout=60).returncode == 0
        )
    except (OSError, subprocess.SubprocessError):
        return False


def parallel_args(pytest_args: list[str], python: Path) -> list[str]:
    """``-n 2 --dist worksteal`` (pytest-xdist) unless the caller chose ``-n`` or ``-p no:xdist``.

    Most of the suite's time is subprocesses importing Lightning and small CPU fits, so two
    workers use both cores of a CI machine; the tests share no files (each has its tmp_path).
    """
    if any(
        a.startswith("-n") or a.startswith("--numprocesses") or "no:xdist" in a for a in pytest_args
    ):
        return []
    probe = subprocess.run([str(python), "-c", "import xdist"], capture_output=True)
    return ["-n", "2", "--dist", "worksteal"] if probe.returncode == 0 else []


def test(pytest_args: list[str], python: Path) -> int:
    cmd = [str(python), "-m", "pytest", *parallel_args(pytest_args, python), *pytest_args]
    say("running " + " ".join(["python", *cmd[1:]]))
    rc = subprocess.call(cmd, cwd=ROOT)
    if rc == 5:
        print("dev.py: pytest collected no tests; that counts as a failure", file=sys.stderr)
        return 1
    return rc


def demo(python: Path, extra: list[str]) -> int:
    """Train both demo recipes (in parallel on two cores), then print their metrics side by side."""
    env = dict(os.environ)
    # Two runs of a tiny model on a small machine: one thread each is faster than two
    # processes fighting over every core. Set OMP_NUM_THREADS yourself to change it.
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    parallel = (os.cpu_count() or 1) >= 2
    say(
        f"training {len(DEMO)} runs {'in parallel' if parallel else 'one after the other'} (about a minute each on 2 cores):"
    )
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="paperhooks-demo-") as tmp:
        procs = []
        for i, (label, recipe) in enumerate(DEMO):
            log = Path(tmp) / f"{i}.log"
            args = [
                "fit",
                str(recipe.relative_to(ROOT)),
                "trainer.enable_progress_bar=false",
                *extra,
            ]
            print(f"  {label:<18} paperhooks {' '.join(args)}", flush=True)
            cmd = [str(python), "-m", "paperhooks.cli", *args]
            with open(log, "w") as out:
                p = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            procs.append((label, recipe, cmd, log, p))
            if not parallel:
                p.wait()
        results = []
        failed = False
        for label, recipe, cmd, log, p in procs:
            rc = p.wait()
            text = log.read_text(errors="replace")
            run_dir = _run_dir(text)
            if rc != 0 or run_dir is None or not (ROOT / run_dir / "metrics.json").is_file():
                print(text, file=sys.stderr)
                print(
                    f"dev.py: the {label} run failed (exit {rc}): {' '.join(cmd)}", file=sys.stderr
                )
                failed = True
                continue
            metrics = json.loads((ROOT / run_dir / "metrics.json").read_text())
            results.append((label, recipe, run_dir, metrics))
    if failed:
        return 1
    elapsed = time.monotonic() - start
    print()
    print(f"demo: {len(results)} runs on digits with near-duplicates, trained in {elapsed:.0f}s")
    header = ("setting", *DEMO_METRICS, "run directory")
    rows = [
        (label, *(f"{m[k]:.4f}" if k in m else "-" for k in DEMO_METRICS), str(run_dir))
        for label, _, run_dir, m in results
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for j, row in enumerate((header, *rows)):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            print("-|-".join("-" * w for w in widths))
    if len(results) == 2 and all("val/acc" in m for *_, m in results):
        d = results[1][3]["val/acc"] - results[0][3]["val/acc"]
        print(
            f"\nloss-reweighting - uniform: {d * 100:+.2f} points of val/acc (seed from the recipes; add seed=N to try another)"
        )
    return 0


def _run_dir(text: str) -> str | None:
    for line in reversed(text.splitlines()):
        if line.startswith("run directory:"):
            return line.split(":", 1)[1].strip()
    return None


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n", 2)[1]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "setup":
        unknown = [a for a in rest if a != "--force"]
        if unknown:
            sys.exit(f"dev.py setup: unknown arguments {unknown}\n{usage}")
        setup(force="--force" in rest)
        say(f"ready: {venv_python().relative_to(ROOT)} (activate with: source .venv/bin/activate)")
        return 0
    if command in ("test", "demo"):
        check_python()
        if rest[:1] == ["--no-setup"]:
            python, rest = Path(sys.executable), rest[1:]
        else:
            python = setup()
        if command == "test":
            if "--all" in rest:  # the plugins' multi-process checks too (see conftest.py)
                rest = [a for a in rest if a != "--all"]
                os.environ["PAPERHOOKS_FULL_SUITE"] = "1"
            return test(rest, python)
        return demo(python, rest)
    sys.exit(f"dev.py: unknown command {command!r}\n{usage}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
