"""Reproduces the method card's seed sweeps (not collected by pytest).

    python plugins/done/tests/_sweep.py loop 8-29 out.jsonl   # test_effect's loop, 5 settings
    python plugins/done/tests/_sweep.py fit 6-23 out.jsonl    # recipes/done.yaml via paperhooks fit
    python plugins/done/tests/_sweep.py summary out.jsonl     # the card's table rows

``loop`` trains uniform AT and DONE at (r, β) ∈ {(2, .5), (2, 1), (1, .5), (3, .5)} with
test_effect's ``train`` and records per-class PGD-20 robust and clean accuracy. ``fit`` runs
the shipped recipe with and without ``done`` and records its final ``val/`` metrics.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import torch

LOOP = {
    "uniform": None,
    "r2b05": (2.0, 0.5),
    "r2b1": (2.0, 1.0),
    "r1b05": (1.0, 0.5),
    "r3b05": (3.0, 0.5),
}


def seeds(spec: str) -> list[int]:
    lo, _, hi = spec.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def loop(spec: str, out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    import test_effect as T  # noqa: PLC0415 (the test module is the experiment)

    from paperhooks_done import DONEConfig  # noqa: PLC0415
    from paperhooks_pgd import class_means  # noqa: PLC0415

    for seed in seeds(spec):
        row: dict = {"seed": seed}
        for name, rb in LOOP.items():
            module, val = T.train(seed, None if rb is None else DONEConfig(*rb))
            with torch.no_grad():
                hit = (module(val["input"]).argmax(-1) == val["target"]).float()
            rob = T.class_robust_accuracy(module, val)
            row[name] = {"rob": rob.tolist(), "clean": class_means(hit, val["target"], 10).tolist()}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def fit_runs(spec: str, out: Path) -> None:
    from omegaconf import OmegaConf  # noqa: PLC0415

    from paperhooks import recipe as R  # noqa: PLC0415
    from paperhooks.run import fit  # noqa: PLC0415

    root = Path(__file__).parents[3]
    base = OmegaConf.to_container(OmegaConf.load(root / "recipes" / "done.yaml"))
    for seed in seeds(spec):
        row: dict = {"seed": seed}
        for name in ("uniform", "done"):
            raw = copy.deepcopy(base)
            raw.update(seed=seed, name=f"{name}-{seed}", run_dir=str(out.parent / "done_runs"))
            raw["trainer"]["enable_progress_bar"] = False
            if name == "uniform":
                raw["plugins"] = [p for p in raw["plugins"] if p["name"] != "done"]
            _, metrics = fit(R.validate(raw))
            row[name] = {k: float(v) for k, v in metrics.items() if k.startswith("val/")}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def summary(out: Path) -> None:
    rows = [json.loads(line) for line in out.open()]
    if "rob" not in rows[0]["uniform"]:  # fit rows: worst class and averages as logged
        key = "val/pgd/worst_class_robust_acc"
        rows = [
            {
                "seed": r["seed"],
                **{
                    k: {"worst": v[key], "mean": v["val/pgd/robust_acc"], "clean": v["val/acc"]}
                    for k, v in r.items()
                    if k != "seed"
                },
            }
            for r in rows
        ]
    else:
        rows = [
            {
                "seed": r["seed"],
                **{
                    k: {
                        "worst": min(v["rob"]),
                        "mean": sum(v["rob"]) / 10,
                        "tail": sum(sorted(v["rob"])[:3]) / 3,
                        "clean": sum(v["clean"]) / 10,
                    }
                    for k, v in r.items()
                    if k != "seed"
                },
            }
            for r in rows
        ]
    n = len(rows)
    for k in rows[0]:
        if k == "seed":
            continue
        d = [r[k]["worst"] - r["uniform"]["worst"] for r in rows]
        m = sum(d) / n
        se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
        means = {q: sum(r[k][q] for r in rows) / n for q in rows[0][k]}
        ahead, tied = sum(x > 1e-9 for x in d), sum(abs(x) <= 1e-9 for x in d)
        print(
            f"{k:8s} n={n} "
            + " ".join(f"{q} {v:.3f}" for q, v in means.items())
            + f" | Δworst {m:+.3f} ± {se:.3f}, ahead/tied/behind {ahead}/{tied}/{n - ahead - tied}"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd = sys.argv[1]
    if cmd == "summary":
        summary(Path(sys.argv[2]))
    else:
        {"loop": loop, "fit": fit_runs}[cmd](sys.argv[2], Path(sys.argv[3]))
