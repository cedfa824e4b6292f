"""The ``paperhooks`` command, run as users run it (subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import write_recipe
from paperhooks.testing import paperhooks_cli

RECIPE = """
seed: 0
name: cli
model: {name: mlp, hidden: [16]}
data: {name: digits, batch_size: 64}
trainer: {max_steps: 3, enable_progress_bar: false}
plugins:
  - {name: loss-reweighting, burnin_steps: 1}
  - {name: class-weight, factor: 2.0}
"""


def test_help_does_not_import_torch(tmp_path):
    code = (
        "import sys\n"
        "from paperhooks.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "usage: paperhooks" in out and "fit" in out and out.strip().endswith("NO-TORCH")


def test_plugins_lists_installed_plugins_with_family_and_paper(tmp_path, test_plugins):
    rows = json.loads(paperhooks_cli("plugins", "--json", cwd=tmp_path).stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["loss-reweighting"]["family"] == "sample-weighting"
    assert by_name["loss-reweighting"]["distribution"] == "paperhooks-loss-reweighting"
    assert "Dynamic Loss-Based Sample Reweighting" in by_name["loss-reweighting"]["paper"]
    assert by_name["class-weight"]["distribution"] == "paperhooks-testplugins"
    table = paperhooks_cli("plugins", cwd=tmp_path).stdout
    assert "loss-reweighting" in table and "sample-weighting" in table


def test_a_plugin_that_fails_to_import_does_not_break_the_listing(tmp_path, test_plugins):
    from helpers import write_distribution

    write_distribution(test_plugins, "paperhooks-broken", {"broken": "no_such_module_xyz:Plugin"})
    rows = {
        r["name"]: r for r in json.loads(paperhooks_cli("plugins", "--json", cwd=tmp_path).stdout)
    }
    assert (
        "paperhooks-broken 0.0.1 failed to import: ModuleNotFoundError" in rows["broken"]["error"]
    )
    assert rows["loss-reweighting"]["error"] == ""


def test_validate_cite_explain(tmp_path, test_plugins, capsys):
    path = write_recipe(tmp_path / "r.yaml", RECIPE)
    assert "ok: " in paperhooks_cli("validate", str(path), cwd=tmp_path).stdout
    # cite and explain through the same entry function, in this process (no interpreter start-up)
    from paperhooks.cli import main

    capsys.readouterr()
    assert main(["cite", str(path)]) == 0
    cite = capsys.readouterr().out
    assert "@inproceedings" in cite or "@article" in cite or "@misc" in cite
    assert "% loss-reweighting:" in cite and "% class-weight:" in cite
    assert main(["explain", str(path)]) == 0
    explain = capsys.readouterr().out
    assert "weighting_sample_weights: loss-reweighting -> class-weight" in explain


STAGED = """
name: staged
model: {name: mlp, hidden: [8]}
data: {name: digits}
trainer: {max_steps: 4}
stages:
  - {name: prune, plugins: [{name: one-shot-pruning, sparsity: 0.5}]}
  - name: soup
    plugins: [{name: loss-reweighting}]
    ingredients: [{seed: 1}, {seed: 2, plugins: [{name: class-weight}]}]
"""


def test_validate_cite_explain_cover_every_stage(tmp_path, test_plugins, capsys):
    from paperhooks.cli import main

    path = write_recipe(tmp_path / "staged.yaml", STAGED)
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    assert (
        "(stages: prune [one-shot-pruning]; soup [loss-reweighting, class-weight]; strategy"
        in capsys.readouterr().out
    )
    assert main(["cite", str(path)]) == 0
    cite = capsys.readouterr().out
    for name in ("one-shot-pruning", "loss-reweighting", "class-weight"):
        assert f"% {name}:" in cite
    assert main(["explain", str(path)]) == 0
    explain = capsys.readouterr().out
    assert "stage prune: 1 plugin(s)" in explain and "stage soup: 1 plugin(s)" in explain
    assert "stage soup, ingredient 1: 1 plugin(s)" in explain  # its own plugins
    assert "stage soup, ingredient 0" not in explain  # the stage's plugins: said once
    assert "pruning_schedule: one-shot-pruning" in explain
    assert "weighting_sample_weights: class-weight" in explain


def test_bad_input_a_plugin_finds_mid_fit_is_one_line_and_exit_2(
    tmp_path, test_plugins, capsys, monkeypatch
):
    """A ValueError raised by a plugin's own code (here at step 2) is said in one line with
    where it was raised; PAPERHOOKS_TRACEBACK=1 lets it through with its traceback."""
    from paperhooks.cli import main

    path = write_recipe(tmp_path / "refuse.yaml", RECIPE)
    args = [
        "fit",
        str(path),
        "plugins=[{name: loss-rank, refuse_at: 2}]",
        f"run_dir={tmp_path}/runs",
    ]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "paperhooks: error: loss-rank: refuse_at = 2: this step's input is refused" in err
    assert "(raised at paperhooks_testplugins:" in err and "Traceback" not in err
    assert list((tmp_path / "runs" / "cli").glob("version_*/checkpoints/*.ckpt"))  # kept
    monkeypatch.setenv("PAPERHOOKS_TRACEBACK", "1")
    with pytest.raises(ValueError, match="refuse_at = 2"):
        main(args)


def test_bad_recipe_exits_2_with_a_message_not_a_traceback(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE)
    proc = paperhooks_cli(
        "validate", str(path), "plugins.loss-reweighting.kl_reg=oops", cwd=tmp_path, check=False
    )
    assert proc.returncode == 2
    assert "paperhooks: error: plugins[0] (loss-reweighting).kl_reg must be float" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fit_prints_a_metrics_table_and_writes_the_run_directory(tmp_path, test_plugins):
    path = write_recipe(tmp_path / "r.yaml", RECIPE)
    proc = paperhooks_cli("fit", str(path), "trainer.max_steps=4", cwd=tmp_path)
    assert "run directory: runs/cli/version_0" in proc.stdout
    assert "val/acc" in proc.stdout and "loss-reweighting/ess" in proc.stdout
    run = tmp_path / "runs" / "cli" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "logs" / "metrics.csv").exists()
    assert list((run / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert "max_steps: 4" in (run / "recipe.yaml").read_text()
