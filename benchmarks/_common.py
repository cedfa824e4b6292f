"""Helpers shared by the benchmarks: settings, statistics, timing, memory, machine description.

Nothing here is timed by the test suite; ``tests/test_benchmarks.py`` only checks the pure
helpers (statistics, formatting).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Settings:
    """What every part of the benchmark needs to know about this run."""

    device: str = "cpu"  # "cpu" or "cuda"
    quick: bool = False
    seed: int = 0
    rounds: int | None = None  # overrides the rounds of the core and per-family comparisons

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def pick_rounds(self, quick: int, full: int, cuda: int | None = None) -> int:
        """Rounds of a comparison: ``rounds`` when given, else :meth:`pick`."""
        return self.rounds or self.pick(quick, full, cuda)

    def pick(self, quick: Any, full: Any, cuda: Any = None) -> Any:
        """A size or count: ``quick`` under --quick, else ``cuda`` on a GPU (when given), else ``full``."""
        if self.quick:
            return quick
        if self.cuda and cuda is not None:
            return cuda
        return full


def quiet() -> None:
    """Silence Lightning's banners and the warnings it prints for tiny synthetic runs."""
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")


# -- statistics ---------------------------------------------------------------------------------
def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max and the quartiles (inclusive method) of ``values``."""
    v = sorted(float(x) for x in values)
    if not v:
        raise ValueError("summary of no values")
    if len(v) >= 2:
        q1, _, q3 = statistics.quantiles(v, n=4, method="inclusive")
    else:
        q1 = q3 = v[0]
    return {
        "median": statistics.median(v),
        "min": v[0],
        "max": v[-1],
        "q1": q1,
        "q3": q3,
        "n": len(v),
    }


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``num[i] / den[i]`` (both arms measured in the same round)."""
    if len(num) != len(den):
        raise ValueError(
            f"paired ratios need as many rounds on both sides, got {len(num)} and {len(den)}"
        )
    return [a / b for a, b in zip(num, den, strict=True)]


def verdict(ratio: dict[str, float], goal: float) -> str:
    """``met`` / ``missed`` by the median, with a warning when the spread straddles the goal."""
    median_ok = ratio["median"] <= goal
    straddles = ratio["min"] <= goal < ratio["max"]
    word = "met" if median_ok else "**missed**"
    return f"{word} (spread crosses {goal:g})" if straddles else word


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f}"


def fmt_spread(r: dict[str, float]) -> str:
    return f"{r['min']:.3f} – {r['max']:.3f}"


def fmt_bytes(n: float) -> str:
    """Bytes with a binary unit: ``0 B``, ``512 B``, ``3.00 KiB``, ``1.25 MiB``..."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"  # pragma: no cover


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# -- timing -----------------------------------------------------------------------------------------
def bench_trainer(steps: int, device: str, callback: Any) -> Any:
    """The Lightning Trainer every benchmark arm fits with: one device, ``steps`` steps, no
    logger, checkpoints, progress bar or model summary; ``callback`` times or records."""
    import lightning.pytorch as L

    return L.Trainer(
        max_steps=steps,
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: str, n: int = 1) -> float:
    """Seconds per call of ``fn`` over ``n`` calls, the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / n


def round_robin(
    arms: dict[str, Callable[[], Any]],
    device: str,
    rounds: int,
    steps: int,
    warmup: int,
    target_s: float | None = None,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per-round seconds per step of each arm; arms alternate within every round (order rotated).

    Each arm first runs ``warmup`` steps (at least one), the last of them timed. With
    ``target_s``, an arm then runs ``round(target_s / that time)`` steps per round, clamped to
    ``[1, steps]``, so that a slow arm does not stretch the run; else ``steps``. Returns the
    times and the steps per round of each arm.
    """
    names = list(arms)
    per_round: dict[str, int] = {}
    for name in names:
        for _ in range(max(0, warmup - 1)):
            arms[name]()
        t = time_call(arms[name], device, 1)
        per_round[name] = steps if target_s is None else adaptive_steps(t, target_s, steps)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            out[name].append(time_call(arms[name], device, per_round[name]))
    return out, per_round


def adaptive_steps(step_s: float, target_s: float, cap: int) -> int:
    """Steps that take about ``target_s`` at ``step_s`` each, between 1 and ``cap``."""
    return max(1, min(cap, round(target_s / max(step_s, 1e-9))))


# -- memory -------------------------------------------------------------------------------------------
def memory_method(device: str) -> str:
    if device == "cuda":
        return (
            "CUDA: `torch.cuda.max_memory_allocated()` during one step minus "
            "`torch.cuda.memory_allocated()` at its start (stats reset before each arm)"
        )
    return (
        "CPU: peak of the bytes held by tensors during one step above the level at its start, "
        "rebuilt from the allocation and free events of `torch.profiler` (`profile_memory=True`); "
        "RSS is not used (the C allocator keeps freed pages) and tracemalloc does not see tensors"
    )


def peak_step_memory(fn: Callable[[], Any], device: str) -> int:
    """Peak extra bytes allocated while ``fn`` runs (see :func:`memory_method`)."""
    if device == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    return _peak_from_events(
        (e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage) for e in events
    )


def _peak_from_events(deltas: Any) -> int:
    """Highest running sum of allocation (+) and free (−) byte counts, at least 0."""
    cur = peak = 0
    for d in deltas:
        cur += int(d)
        peak = max(peak, cur)
    return peak


# -- the machine --------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(settings: Settings) -> dict[str, str]:
    import lightning

    info = {
        "CPU": f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
    }
    try:
        load = os.getloadavg()
        info["load average at start"] = ", ".join(f"{x:.2f}" for x in load)
    except OSError:
        pass
    if settings.cuda:
        p = torch.cuda.get_device_properties(0)
        info["GPU"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    else:
        info["GPU"] = "none used (--device cpu)"
    for mod in ("torchjd", "LibMTL", "timm"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = "not installed"
    return info
