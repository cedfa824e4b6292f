"""Test helpers for the core and for plugins: run recipes as users do, compare the results.

Multi-process runs go through the real command line in a subprocess: under pytest an
in-process ``strategy="ddp"`` would re-run the pytest command as rank 1.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def paperhooks_cli(
    *args: str,
    cwd: Path | str,
    timeout: int = 600,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m paperhooks.cli ARGS`` in ``cwd``; fail with its output when it fails."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "paperhooks.cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"paperhooks {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def fit_cli(
    recipe: Path | str,
    overrides: Sequence[str] = (),
    *,
    cwd: Path | str,
    resume: Path | str | None = None,
    timeout: int = 600,
) -> Path:
    """``paperhooks fit`` in a subprocess; returns the run directory it reported."""
    args = ["fit", str(recipe), *overrides]
    if resume is not None:
        args += ["--resume", str(resume)]
    proc = paperhooks_cli(*args, cwd=cwd, timeout=timeout)
    match = re.search(r"^run directory: (.+)$", proc.stdout, re.M)
    if match is None:
        raise AssertionError(
            f"no run directory in the output of paperhooks fit:\n{proc.stdout[-3000:]}"
        )
    path = Path(match.group(1).strip())
    return path if path.is_absolute() else Path(cwd) / path


def load_checkpoint(run_dir: Path | str, name: str = "last.ckpt") -> dict[str, Any]:
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


def final_state(run_dir: Path | str) -> dict[str, torch.Tensor]:
    """The model weights at the end of a run (from ``checkpoints/last.ckpt``)."""
    return load_checkpoint(run_dir)["state_dict"]


def assert_states_close(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, atol: float, rtol: float = 0.0
) -> None:
    """Same keys, and every tensor equal within tolerance (``atol=0`` asks for bit equality)."""
    assert sorted(a) == sorted(b), f"different keys: {sorted(set(a) ^ set(b))}"
    for k in a:
        if atol == 0 and rtol == 0:
            assert torch.equal(a[k], b[k]), (
                f"{k} differs: max |Δ| = {(a[k].double() - b[k].double()).abs().max().item():.3e}"
            )
        else:
            torch.testing.assert_close(
                a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}"
            )


def assert_nested_equal(a: Any, b: Any, where: str = "") -> None:
    """Bit equality of nested checkpoint content (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and sorted(map(str, a)) == sorted(map(str, b)), (
            f"{where}: keys differ"
        )
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


__all__ = [
    "assert_nested_equal",
    "assert_states_close",
    "final_state",
    "fit_cli",
    "load_checkpoint",
    "paperhooks_cli",
]
