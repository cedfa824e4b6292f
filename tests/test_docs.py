"""The docs site: generated reference pages, ``mkdocs build --strict``, and the docs' own
examples (recipes validate and train, commands exist)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest

from helpers import ROOT
from paperhooks import cli, docgen
from paperhooks import recipe as R

DOCS = ROOT / "docs"
#: nav pages other people write; a copy that lacks them gets a stub (with a warning) so the
#: build still checks everything else
OTHERS_PAGES = ("index.md", "benchmarks.md")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "generated"
    assert cli.main(["docs", "--out", str(out)]) == 0
    return out


def test_plugin_directory_lists_loss_reweighting_under_sample_weighting(generated):
    page = (generated / "plugins.md").read_text()
    family = docgen.sections(page)["sample-weighting"]
    assert "### loss-reweighting" in family
    entry = family.split("### loss-reweighting", 1)[1]
    assert (
        "[Dynamic Loss-Based Sample Reweighting for Improved Large Language Model Pretraining](https://arxiv.org/abs/2502.06733)"
        in entry
    )
    assert (
        "| ✅ tested | ✅ tested | ✅ tested | ⚪ untested | ⚪ untested |" in entry
    )  # single ddp fsdp2 fsdp deepspeed
    assert "**Checked against:** sowmaster/Sample-Level-Loss-Reweighting-ICLR-2025" in entry
    assert "Measured effect" in entry and "| **linupper** |" in entry  # the card's section, quoted
    assert "| `kl_reg` | float | `1.0` |" in entry  # the config, with the paper's default
    assert "[method card](plugins/loss-reweighting.md)" in entry
    assert "### loss-reweighting" not in docgen.sections(page)["pruning"]


def test_each_plugin_gets_its_method_card_as_a_page(generated):
    card = (generated / "plugins" / "loss-reweighting.md").read_text()
    readme = (ROOT / "plugins" / "loss-reweighting" / "README.md").read_text()
    assert card.endswith(readme.strip() + "\n")


def test_recipe_reference_lists_every_field_with_type_and_default(generated):
    from paperhooks.schema import type_name
    from paperhooks.tasks import DATASETS, MODELS, load_tasks

    load_tasks()  # the page documents the built-in tasks and every installed plugin's
    assert (
        "reward-mlp" in MODELS and "digits-difficulty" in DATASETS
    )  # registered by plugins (more, rerank-curriculum)
    page = (generated / "recipe.md").read_text()
    for cls in (R.OptimizerSection, R.TrainerSection):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert (
                f"| `{f.name}` | {type_name(hints[f.name]).replace('|', chr(92) + '|')} |" in page
            ), f.name
    for section, table in (("model", MODELS), ("data", DATASETS)):
        for name in table:
            assert f"### `{section}.name: {name}`" in page
    assert "| `duplicates.fraction` | float | `0.0` |" in page  # nested dataclasses as dotted keys
    assert "| `max_epochs` | int \\| null | `null` |" in page


def test_generation_rewrites_only_changed_pages_and_drops_uninstalled_cards(tmp_path):
    out = tmp_path / "generated"
    assert docgen.generate(out)  # first run writes everything
    assert docgen.generate(out) == []
    (out / "plugins" / "gone.md").write_text("# a plugin no longer installed\n")
    docgen.generate(out)
    assert not (out / "plugins" / "gone.md").exists()


def test_mkdocs_build_strict(tmp_path, generated):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install mkdocs-material)")
    pytest.importorskip(
        "material", reason="mkdocs-material is not installed (pip install mkdocs-material)"
    )
    site_src = tmp_path / "src"
    shutil.copytree(
        DOCS, site_src / "docs", ignore=shutil.ignore_patterns("generated", "__pycache__")
    )
    shutil.copy(ROOT / "mkdocs.yml", site_src / "mkdocs.yml")
    shutil.copytree(generated, site_src / "docs" / "generated")
    for page in OTHERS_PAGES:
        if not (DOCS / page).is_file():
            warnings.warn(
                f"docs/{page} does not exist yet; the build test uses a stub", stacklevel=1
            )
            (site_src / "docs" / page).write_text(f"# {page}\n")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(site_src / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    site = tmp_path / "site"
    directory = (site / "generated" / "plugins" / "index.html").read_text()
    assert 'id="sample-weighting"' in directory and 'id="loss-reweighting"' in directory
    assert (
        directory.index('id="sample-weighting"')
        < directory.index('id="loss-reweighting"')
        < directory.index('id="objective"')
    )
    assert (site / "generated" / "plugins" / "loss-reweighting" / "index.html").is_file()
    home = (site / "index.html").read_text()
    assert 'href="generated/plugins/loss-reweighting/"' in home  # the method card is in the nav
    concepts = (site / "concepts" / "index.html").read_text()
    assert (
        "weighting_sample_weights" in concepts and "perturb_inputs" in concepts
    )  # the included snippets


# -- the docs' own examples -------------------------------------------------------------------------
def _blocks(lang: str) -> list[tuple[str, str]]:
    out = []
    for page in sorted(DOCS.glob("*.md")):
        for m in re.finditer(rf"^```{lang}\n(.*?)^```", page.read_text(), re.M | re.S):
            out.append((page.name, m.group(1)))
    return out


def test_docs_recipes_validate_and_the_first_one_trains(tmp_path):
    recipes = [(page, text) for page, text in _blocks("yaml") if re.search(r"^model:", text, re.M)]
    assert any(page == "getting-started.md" for page, _ in recipes)
    for i, (_, text) in enumerate(recipes):
        path = tmp_path / f"{i}.yaml"
        path.write_text(text)
        R.load(path)  # raises with the key at fault
    from paperhooks.run import fit

    first = next(
        tmp_path / f"{i}.yaml"
        for i, (page, _) in enumerate(recipes)
        if page == "getting-started.md"
    )
    overrides = [
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        f"run_dir={tmp_path / 'runs'}",
        "trainer.enable_progress_bar=false",
    ]
    _, metrics = fit(R.load(first, overrides))
    assert "train/loss" in metrics


def test_docs_commands_are_real_subcommands(capsys):
    used = set()
    for _, text in _blocks("bash"):
        used |= set(re.findall(r"^paperhooks ([a-z]+)", text, re.M))
    assert {"fit", "compare", "export", "push"} <= used
    missing = []
    for command in sorted(used):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"])
        if exit_.value.code != 0:
            missing.append(command)
    capsys.readouterr()
    assert missing == [], f"the docs use commands that do not exist: {missing}"
