"""Helpers shared by the core's tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
ROOT = HERE.parent

TEST_PLUGINS = {
    "class-weight": "paperhooks_testplugins:ClassWeight",
    "loss-rank": "paperhooks_testplugins:LossRank",
    "no-ddp": "paperhooks_testplugins:NoDDP",
    "conflicting": "paperhooks_testplugins:Conflicting",
    "step-pruning": "paperhooks_testplugins:StepPruning",
    "sum-surgery": "paperhooks_testplugins:SumSurgery",
    "mgda-surgery": "paperhooks_testplugins:MgdaSurgery",
    "mgda-surgery-full": "paperhooks_testplugins:MgdaSurgeryFull",
    "logit-penalty": "paperhooks_testplugins:LogitPenalty",
    "critic": "paperhooks_testplugins:Critic",
    "mask-probe": "paperhooks_testplugins:MaskProbe",
    # deliberately bad, for the conformance kit's own tests
    "bad-forgetful": "paperhooks_testplugins:ForgetfulCounter",
    "bad-local-softmax": "paperhooks_testplugins:LocalSoftmax",
    "bad-list-config": "paperhooks_testplugins:ListConfigPlugin",
    "bad-inf-objective": "paperhooks_testplugins:InfObjective",
}


def write_distribution(
    where: Path, dist: str, entries: dict[str, str], version: str = "0.0.1"
) -> Path:
    """Make ``where`` hold an installed distribution (a .dist-info with entry points)."""
    info = where / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[paperhooks]\n{lines}\n")
    return where


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def fit_here(recipe: Path, overrides: list[str], tmp_path: Path) -> Path:
    """A 1-process reference run in this process (no interpreter start-up, unlike ``fit_cli``);
    its run directory goes under ``tmp_path/runs``. Multi-process runs still go through the CLI."""
    from paperhooks import recipe as R
    from paperhooks.run import fit

    return fit(R.load(recipe, [f"run_dir={tmp_path}/runs", *overrides]))[0].run_dir
