"""``paperhooks compare``: PNG plots of runs' logged metrics and a Markdown table of their final metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from paperhooks import cli
from paperhooks import recipe as R
from paperhooks.compare import CompareError, by_epoch, find_runs, load_run, read_csv
from paperhooks.run import fit

RECIPE = """\
name: {name}
seed: 0
model: {{name: mlp, hidden: [16]}}
data: {{name: digits, batch_size: 64}}
trainer: {{max_steps: 6, enable_progress_bar: false, log_every_n_steps: 1}}
run_dir: {run_dir}
plugins: {plugins}
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Two 6-step runs: plain, and with loss-reweighting (which logs its own scalars)."""
    tmp = tmp_path_factory.mktemp("compare")
    out = []
    for name, plugins in (
        ("plain", "[]"),
        ("reweighted", "[{name: loss-reweighting, burnin_steps: 0}]"),
    ):
        path = tmp / f"{name}.yaml"
        path.write_text(RECIPE.format(name=name, run_dir=tmp / "runs", plugins=plugins))
        built, _ = fit(R.load(path))
        out.append(built.run_dir)
    return out


def test_plots_are_png_images_one_per_metric(runs, tmp_path):
    assert cli.main(["compare", *map(str, runs), "--out", str(tmp_path)]) == 0
    pngs = {p.name: p for p in tmp_path.glob("*.png")}
    for name in (
        "train-loss_step.png",
        "val-acc.png",
        "loss-reweighting-weight_entropy.png",
        "loss-reweighting-ess.png",
    ):
        assert name in pngs, sorted(pngs)
    for path in pngs.values():
        with Image.open(path) as img:
            img.load()
            assert img.format == "PNG"
            assert img.width >= 400 and img.height >= 250
            low, high = img.convert("L").getextrema()
            assert high - low > 100  # lines and text on a background, not a blank canvas


def test_compare_md_tabulates_each_runs_final_metrics_and_plugins(runs, tmp_path):
    assert cli.main(["compare", *map(str, runs), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "compare.md").read_text()
    plain, reweighted = (json.loads((r / "metrics.json").read_text()) for r in runs)
    assert "| metric | plain/version_0 | reweighted/version_0 |" in text
    assert f"| `val/acc` | {plain['val/acc']:.4f} | {reweighted['val/acc']:.4f} |" in text
    # a metric only one run has is a dash for the other
    ess = reweighted["loss-reweighting/ess"]
    assert f"| `loss-reweighting/ess` | – | {ess:.4f} |" in text
    assert "| plain/version_0 | none |" in text
    assert (
        "| reweighted/version_0 | loss-reweighting (paperhooks-loss-reweighting==0.1.0) |" in text
    )
    assert "![val/acc](val-acc.png)" in text


def test_step_metrics_are_plotted_by_step_and_epoch_metrics_by_epoch(runs):
    loaded = [load_run(r) for r in runs]
    assert len(loaded[1].series["train/loss_step"]) == 6  # log_every_n_steps=1, 6 steps
    assert not by_epoch("train/loss_step", loaded)
    assert not by_epoch("loss-reweighting/weight_entropy", loaded)
    assert by_epoch("val/acc", loaded)
    assert by_epoch("train/acc", loaded)  # no suffix, but once per epoch
    assert by_epoch("train/loss_epoch", loaded)


def test_metrics_option_keeps_only_the_named_metrics(runs, tmp_path):
    assert (
        cli.main(
            ["compare", *map(str, runs), "--out", str(tmp_path), "--metrics", "val/acc,train/loss"]
        )
        == 0
    )
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "train-loss_epoch.png",
        "train-loss_step.png",
        "val-acc.png",
    ]
    text = (tmp_path / "compare.md").read_text()
    assert "`val/acc`" in text and "`train/loss`" in text and "`loss-reweighting/ess`" not in text


def test_unknown_metric_is_an_error_listing_the_logged_ones(runs, tmp_path, capsys):
    assert (
        cli.main(["compare", str(runs[0]), "--out", str(tmp_path), "--metrics", "val/accuracy"])
        == 2
    )
    err = capsys.readouterr().err
    assert "no run logged the metric 'val/accuracy'" in err and "val/acc" in err


def test_a_folder_of_versions_stands_for_all_its_runs(runs, tmp_path):
    assert find_runs([runs[0].parent]) == [runs[0]]
    with pytest.raises(CompareError, match="not a run directory"):
        find_runs([tmp_path])


def test_a_staged_run_stands_for_itself_and_each_of_its_fits(tmp_path):
    path = tmp_path / "staged.yaml"
    path.write_text(
        RECIPE.format(name="staged", run_dir=tmp_path / "runs", plugins="[]")
        + "stages:\n"
        + "  - {name: prune, plugins: [{name: one-shot-pruning, sparsity: 0.5, step: 2}]}\n"
        + "  - {name: soup, ingredients: [{seed: 1}, {seed: 2}], soup: {recalibrate_bn: false}}\n"
    )
    built, metrics = fit(R.load(path))
    run = built.run_dir
    found = find_runs([run.parent])
    assert found == [
        run,
        run / "stages" / "0-prune",
        run / "stages" / "1-soup" / "ingredient-0",
        run / "stages" / "1-soup" / "ingredient-1",
    ]
    loaded = [load_run(r) for r in found]
    assert [r.label for r in loaded] == [
        "staged/version_0",
        "staged/version_0/0-prune",
        "staged/version_0/1-soup/ingredient-0",
        "staged/version_0/1-soup/ingredient-1",
    ]
    assert loaded[0].final == metrics and not loaded[0].series  # the soup's metrics; no logs
    assert loaded[0].plugins[0].startswith("one-shot-pruning (paperhooks==")
    assert all("train/loss_step" in r.series for r in loaded[1:])  # each fit's own logs
    assert cli.main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "# Comparison of 4 run(s)" in md and "| staged/version_0/1-soup/ingredient-1 |" in md


def test_read_csv_keeps_each_metric_with_its_epoch_and_step(tmp_path):
    # CSVLogger rows are sparse: each holds the metrics logged at that point.
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,train/loss_step,val/acc\n0,0,2.5,\n0,1,2.25,\n0,1,,0.5\n1,3,2.0,\n1,3,,0.75\n"
    )
    assert read_csv(path) == {
        "train/loss_step": [(0, 0, 2.5), (0, 1, 2.25), (1, 3, 2.0)],
        "val/acc": [(0, 1, 0.5), (1, 3, 0.75)],
    }
