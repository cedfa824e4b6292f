"""The benchmarks' pure helpers and page writer (nothing here times anything; the benchmarks
themselves run with ``nox -s bench`` / ``python benchmarks/run_all.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import _common
    import _report
    import dist_traffic

    return _common, _report, dist_traffic


def test_statistics_and_verdicts(bench):
    c, _, _ = bench
    s = c.summary([3.0, 1.0, 2.0, 10.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1.0, 10.0, 4)
    assert s["q1"] <= s["median"] <= s["q3"]
    assert c.summary([4.0])["q1"] == 4.0
    assert c.paired_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError, match="as many rounds"):
        c.paired_ratios([1.0], [1.0, 2.0])
    assert c.verdict({"median": 1.01, "min": 1.0, "max": 1.015}, 1.02) == "met"
    assert c.verdict({"median": 1.01, "min": 0.9, "max": 1.2}, 1.02) == "met (spread crosses 1.02)"
    assert c.verdict({"median": 1.1, "min": 1.05, "max": 1.2}, 1.02) == "**missed**"


def test_formatting_memory_and_step_helpers(bench):
    c, _, d = bench
    assert c.fmt_bytes(0) == "0 B" and c.fmt_bytes(512) == "512 B"
    assert c.fmt_bytes(3 * 1024) == "3.00 KiB" and c.fmt_bytes(1.5 * 2**20) == "1.50 MiB"
    assert c.md_table(["a", "b"], [(1, 2)]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert c._peak_from_events([100, 50, -120, 30, -60]) == 150
    assert c._peak_from_events([-10, 5]) == 0
    assert c.adaptive_steps(0.1, 1.0, 5) == 5 and c.adaptive_steps(0.25, 1.0, 20) == 4
    assert c.adaptive_steps(3.0, 1.0, 20) == 1
    assert d.wire_bytes("all_reduce", 100, world=2) == 100
    assert d.wire_bytes("reduce_scatter", 100, world=4) == 75
    assert d.wire_bytes("all_gather", 100, world=4) == 300


def _ratio(x: float) -> dict:
    return {"median": x, "min": x - 0.01, "max": x + 0.01, "q1": x, "q3": x, "n": 3}


def fake_results() -> dict:
    arms = (
        "one backward",
        "K backward",
        "paperhooks batched",
        "paperhooks loop",
        "TorchJD",
        "LibMTL",
    )
    surgery = {
        "case": "MLP",
        "k": 2,
        "rounds": 3,
        "steps": 3,
        "warmup": 1,
        "steps_per_round": dict.fromkeys(arms, 3),
        "target_s": 0.3,
        "params": 100,
        "trunk_params": 80,
        "ms": dict.fromkeys(arms, 1.0),
        "ms_spread": dict.fromkeys(arms, [0.9, 1.1]),
        "vs_k_backward": dict.fromkeys(arms, _ratio(1.1)),
        "vs_one_backward": dict.fromkeys(arms, _ratio(1.5)),
        "vs_torchjd": {"paperhooks batched": _ratio(1.1), "paperhooks loop": _ratio(0.8)},
        "vs_libmtl": dict.fromkeys(("paperhooks batched", "paperhooks loop"), _ratio(1.3)),
        "peak_bytes": dict.fromkeys(arms, 1000),
        "check": {
            "trunk_rel": {
                "paperhooks batched": 0.0,
                "paperhooks loop": 0.0,
                "TorchJD": 1e-3,
                "LibMTL": 1e-5,
            },
            "heads": {
                "paperhooks batched": "∇L_k",
                "paperhooks loop": "∇L_k",
                "TorchJD": "∇L_k",
                "LibMTL": "∇L_k",
            },
        },
    }
    return {
        "command": "python benchmarks/run_all.py --quick",
        "started": "now",
        "quick": True,
        "device": "cpu",
        "machine": {"CPU": "test"},
        "parts_run": ["core", "families", "surgery", "dist", "cli"],
        "durations_s": {"core": 1.0, "total": 1.0},
        "core": {
            "rows": [
                {
                    "model": "mlp",
                    "base_ms": 1.0,
                    "arm_ms": 1.0,
                    "ratio": _ratio(1.0),
                    "goal": 1.02,
                    "rounds": 3,
                    "steps": 4,
                    "warmup": 1,
                }
            ]
        },
        "families": {
            "rows": [
                {
                    "family": "sample weighting",
                    "plugin": "x",
                    "model": "mlp",
                    "base_ms": 1.0,
                    "arm_ms": 1.1,
                    "ratio": _ratio(1.1),
                    "goal": 1.05,
                    "rounds": 3,
                    "steps": 4,
                    "warmup": 1,
                }
            ],
            "not_measured": {"reparameterization": "not measured: no plugin yet"},
        },
        "surgery": {
            "results": [surgery],
            "failures": [],
            "memory_method": "m",
            "libmtl_shims": "s",
            "tol": 0.02,
        },
        "dist": {
            "rows": [
                {
                    "k": 2,
                    "arm": "no plugin",
                    "params": 10,
                    "ddp_bytes": 40,
                    "ddp_buckets": 1,
                    "paperhooks": {},
                    "total_bytes": 40,
                    "ratio": 1.0,
                    "wire_bytes": 40,
                    "wire_ratio": 1.0,
                },
            ],
            "world": 2,
            "batch_per_rank": 4,
            "ranks_agree": True,
        },
        "cli": {
            "rows": [{"command": "paperhooks --help", "s": _ratio(0.5)}],
            "repeats": 2,
            "plugins": ["a"],
            "plugins_vs_import_torch": 0.5,
        },
    }


def test_goals_and_page(bench):
    _, report, _ = bench
    results = fake_results()
    goals = {g["what"]: g["verdict"] for g in report.goals(results)}
    assert goals["HookedModule / plain LightningModule, mlp"] == "met"
    assert "missed" in goals["sample weighting (x) / hand-written, mlp"]
    # on a CPU the goals judge the loop, Engine()'s default there; on CUDA the batched mode
    loop = "paperhooks (loop, the engine's default on a CPU)"
    assert goals[f"{loop} / TorchJD at every K, MLP"] == "met"
    assert "missed" in goals[f"{loop} / LibMTL at every K, MLP"]
    on_cuda = {g["what"]: g["verdict"] for g in report.goals({**results, "device": "cuda"})}
    assert "missed" in on_cuda["paperhooks (batched) / TorchJD at every K, MLP"]
    assert goals["reparameterization"] == "not measured: no plugin yet"
    page = report.page(results, {})
    assert page.startswith("# Benchmarks") and "python benchmarks/run_all.py --quick" in page
    assert "goal(s) missed" in page and "## 5. CLI latency" in page
