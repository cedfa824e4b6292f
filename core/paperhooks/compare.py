"""Plots comparing runs: one PNG per logged metric, and ``compare.md`` with their final metrics.

``paperhooks compare RUN... --out DIR`` reads each run's ``logs/metrics.csv`` (Lightning's
``CSVLogger``: columns ``epoch``, ``step`` and one per metric; a row holds the metrics logged
at that point, the others are empty). A metric is plotted against the step, unless it is an
epoch-level one: its name ends in ``_epoch``, or no run logged it more than once per epoch
(``val/acc``, ``train/acc``); then against the epoch. A run is labelled ``NAME/version_K``;
a folder that holds ``version_*`` run directories stands for all of them. A run with
``stages`` stands for itself (its final metrics: the last stage's) and for each of its fits,
every stage and soup ingredient, labelled ``NAME/version_K/<i>-<stage>[/ingredient-<j>]``,
each with its own logs.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from paperhooks.errors import PaperhooksError

INDEX = ("epoch", "step")


class CompareError(PaperhooksError):
    """Runs cannot be compared as asked (no run directory, unknown metric)."""


@dataclass
class Run:
    """One run directory's logged series and final metrics."""

    path: Path
    label: str
    #: metric -> [(epoch, step, value)] in logging order
    series: dict[str, list[tuple[int, int, float]]] = field(default_factory=dict)
    final: dict[str, float] = field(default_factory=dict)
    plugins: list[str] = field(default_factory=list)


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories (those with a ``recipe.yaml``); a folder of ``version_*`` stands for each."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "recipe.yaml").is_file():
            runs += [p, *_fits(p)]
            continue
        versions = sorted(
            (v for v in p.glob("version_*") if (v / "recipe.yaml").is_file()),
            key=lambda v: int(v.name.split("_")[1]) if v.name.split("_")[1].isdigit() else -1,
        )
        if not versions:
            raise CompareError(
                f"{p} is not a run directory (no recipe.yaml) and holds no version_* runs"
            )
        for v in versions:
            runs += [v, *_fits(v)]
    return runs


def _fits(run: Path) -> list[Path]:
    """The directories of a staged run's fits: each stage's, or its ingredients'."""
    if not (run / "stages.json").is_file():
        return []
    out = []
    stages = sorted(
        (d for d in (run / "stages").glob("*-*") if d.name.split("-")[0].isdigit()),
        key=lambda d: int(d.name.split("-")[0]),
    )
    for stage in stages:
        if (stage / "recipe.yaml").is_file():
            out.append(stage)
        else:
            out += sorted(
                (i for i in stage.glob("ingredient-*") if (i / "recipe.yaml").is_file()),
                key=lambda i: int(i.name.split("-")[1]),
            )
    return out


def _label(path: Path) -> str:
    if path.parent.name == "stages":  # RUN/stages/<i>-<name>
        top = path.parent.parent
        return f"{top.parent.name}/{top.name}/{path.name}"
    if path.parent.parent.name == "stages":  # RUN/stages/<i>-<name>/ingredient-<j>
        top = path.parent.parent.parent
        return f"{top.parent.name}/{top.name}/{path.parent.name}/{path.name}"
    return f"{path.parent.name}/{path.name}"


def read_csv(path: Path) -> dict[str, list[tuple[int, int, float]]]:
    """The series of every metric column of a ``CSVLogger`` file."""
    series: dict[str, list[tuple[int, int, float]]] = {}
    if not path.is_file():
        return series
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            epoch, step = _int(row.get("epoch")), _int(row.get("step"))
            for key, text in row.items():
                if key in INDEX or key is None or text in ("", None):
                    continue
                value = float(text)
                if math.isfinite(value):
                    series.setdefault(key, []).append((epoch, step, value))
    return series


def _int(text: str | None) -> int:
    return int(float(text)) if text not in ("", None) else 0


def load_run(path: Path) -> Run:
    from omegaconf import OmegaConf

    from paperhooks.recipe import raw_plugin_entries

    recipe = OmegaConf.to_container(OmegaConf.load(path / "recipe.yaml"))
    versions = recipe.get("plugin_versions") or {}
    names = dict.fromkeys(p["name"] for p in raw_plugin_entries(recipe))  # stages' too
    plugins = [f"{n} ({versions[n]})" if n in versions else n for n in names]
    final = (
        json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    )
    return Run(
        path,
        _label(path),
        read_csv(path / "logs" / "metrics.csv"),
        final,
        plugins,
    )


def by_epoch(metric: str, runs: Sequence[Run]) -> bool:
    """Whether ``metric`` is plotted against the epoch (see the module docstring)."""
    if metric.endswith("_step"):
        return False
    if metric.endswith("_epoch"):
        return True
    for run in runs:
        epochs = [e for e, _, _ in run.series.get(metric, [])]
        if len(epochs) != len(set(epochs)):
            return False
    return True


def select(names: Sequence[str], wanted: Sequence[str] | None) -> list[str]:
    """``names`` filtered by ``wanted`` (a name also selects its ``_step``/``_epoch`` columns)."""
    if not wanted:
        return sorted(names)
    out = []
    for w in wanted:
        hits = [n for n in names if n == w or re.sub(r"_(step|epoch)$", "", n) == w]
        if not hits:
            raise CompareError(
                f"no run logged the metric {w!r}; logged: {', '.join(sorted(names)) or 'nothing'}"
            )
        out += [h for h in sorted(hits) if h not in out]
    return out


def file_name(metric: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", metric).strip("-") or "metric"
    name, k = f"{stem}.png", 1
    while name in taken:
        k += 1
        name = f"{stem}-{k}.png"
    taken.add(name)
    return name


def plot(metric: str, runs: Sequence[Run], path: Path) -> None:
    """One PNG: ``metric`` of every run that logged it, one labelled line per run."""
    from matplotlib.figure import Figure

    epoch_axis = by_epoch(metric, runs)
    fig = Figure(figsize=(6.4, 4.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for run in runs:
        points = run.series.get(metric)
        if not points:
            continue
        xs = [e if epoch_axis else s for e, s, _ in points]
        ys = [v for _, _, v in points]
        ax.plot(xs, ys, label=run.label, marker="o" if len(xs) <= 30 else None, markersize=3)
    ax.set_title(metric)
    ax.set_xlabel("epoch" if epoch_axis else "step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)


def compare(
    paths: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None
) -> Path:
    """Write one PNG per metric and ``compare.md`` into ``out``; return the path of ``compare.md``."""
    runs = [load_run(p) for p in find_runs(paths)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logged = sorted({m for r in runs for m in r.series})
    plotted = select(logged, metrics)
    taken: set[str] = set()
    files = {}
    for m in plotted:
        files[m] = file_name(m, taken)
        plot(m, runs, out / files[m])
    finals = sorted({m for r in runs for m in r.final})
    if metrics:
        finals = [m for m in finals if m in plotted or re.sub(r"_(step|epoch)$", "", m) in metrics]
    md = out / "compare.md"
    md.write_text(report(runs, finals, files))
    return md


def report(runs: Sequence[Run], finals: Sequence[str], files: dict[str, str]) -> str:
    """``compare.md``: the runs and their plugins, final metrics side by side, then the plots."""
    lines = [
        f"# Comparison of {len(runs)} run(s)",
        "",
        "| run | plugins | directory |",
        "|---|---|---|",
    ]
    lines += [f"| {r.label} | {', '.join(r.plugins) or 'none'} | `{r.path}` |" for r in runs]
    lines += ["", "## Final metrics", ""]
    if finals:
        lines += [
            "| metric | " + " | ".join(r.label for r in runs) + " |",
            "|---" * (len(runs) + 1) + "|",
        ]
        for m in finals:
            cells = [f"{r.final[m]:.4f}" if m in r.final else "–" for r in runs]
            lines.append(f"| `{m}` | " + " | ".join(cells) + " |")
    else:
        lines.append("No run has final metrics (metrics.json).")
    lines += ["", "## Plots", ""]
    for m, name in files.items():
        axis = "epoch" if by_epoch(m, runs) else "step"
        lines += [f"### {m} (by {axis})", "", f"![{m}]({name})", ""]
    if not files:
        lines.append("No run logged any metric (logs/metrics.csv).")
    return "\n".join(lines).rstrip() + "\n"


__all__ = [
    "CompareError",
    "Run",
    "by_epoch",
    "compare",
    "find_runs",
    "load_run",
    "read_csv",
    "report",
]
