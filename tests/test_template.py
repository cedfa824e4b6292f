"""The plugin template: ``paperhooks new`` renders a distribution that installs, is discovered
through its entry point and passes its own tests; bad input is refused and writes nothing.

A rendered plugin is installed with ``pip install --no-deps --target DIR`` (a real wheel
build, entry points included) and used with ``PYTHONPATH=DIR``, next to the paperhooks of
this environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from paperhooks.cli import main as cli_main
from paperhooks.new import PaperInfo, default_output, render
from paperhooks.plugin import FAMILIES
from paperhooks.testing import conformance as C
from paperhooks.testing import paperhooks_cli

copier = pytest.importorskip(
    "copier", reason="the template renders with copier (pip install paperhooks[dev])"
)

TEMPLATE = ROOT / "templates" / "plugin"
HEADINGS = [
    "TL;DR",
    "Paper",
    "Equation",
    "Hooks used",
    "Recipe",
    "Hyper-parameters",
    "Composition",
    "Checked against",
    "Measured effect",
]
PAPER = PaperInfo(
    title='A "Quoted" Method for Testing Templates, \\& Friends',
    authors=("Ada Lovelace", "Alan M. Turing"),
    year=2024,
    venue="ICLR 2024",
    arxiv="2401.01234",
    code_url="https://github.com/example/method",
    description='Checks that the template renders "quotes" and \\ backslashes."',
)


def module_of(name: str) -> str:
    return "paperhooks_" + name.replace("-", "_")


def expected_files(name: str) -> set[str]:
    mod = module_of(name)
    return {
        ".copier-answers.yml",
        "README.md",
        "pyproject.toml",
        f"recipes/{name}.yaml",
        f"src/{mod}/__init__.py",
        f"src/{mod}/functional.py",
        f"src/{mod}/plugin.py",
        f"src/{mod}/py.typed",
        "tests/conftest.py",
        f"tests/test_{mod}.py",
    }


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


def pip_install_target(target: Path, *projects: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
    ]
    proc = subprocess.run([*cmd, *map(str, projects)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def env_with(target: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
    }


def run_pytest(
    paths: list[Path], cwd: Path, target: Path, *args: str
) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, *map(str, paths)]
    return subprocess.run(
        cmd, cwd=cwd, env=env_with(target), capture_output=True, text=True, timeout=900
    )


# -- the template itself -----------------------------------------------------------------------------
def test_template_offers_exactly_the_core_families():
    config = yaml.safe_load((TEMPLATE / "copier.yml").read_text())
    assert config["family"]["choices"] == list(FAMILIES)
    assert sorted(p.stem for p in (TEMPLATE / "families").glob("[!_]*.jinja")) == sorted(FAMILIES)
    # renders without --trust: no tasks, migrations or Jinja extensions
    assert not {"_tasks", "_migrations", "_jinja_extensions"} & set(config)


def test_help_of_new_imports_neither_torch_nor_copier(tmp_path):
    code = (
        "import sys\nfrom paperhooks.cli import main\n"
        "try:\n    main(['new', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({'torch', 'copier'} & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    ).stdout
    assert "--family" in out and out.strip().endswith("[]")


# -- rendering through the command line ---------------------------------------------------------------
@pytest.mark.parametrize("family", ["sample-weighting", "gradient-surgery"])
def test_new_renders_a_complete_distribution(tmp_path, family):
    name = f"tpl-{family}"
    args = [
        "--family",
        family,
        "--output",
        str(tmp_path / name),
        "--title",
        PAPER.title,
        "--year",
        "2024",
    ]
    args += ["--author", "Ada Lovelace", "--author", "Alan M. Turing", "--venue", PAPER.venue]
    args += [
        "--arxiv",
        PAPER.arxiv,
        "--code-url",
        PAPER.code_url,
        "--description",
        PAPER.description,
    ]
    out = paperhooks_cli("new", name, *args, cwd=tmp_path).stdout
    dst = tmp_path / name
    assert f"created {name}: distribution paperhooks-{name}, family {family}" in out
    assert files_under(dst) == expected_files(name)

    readme = (dst / "README.md").read_text()
    headings = [line[3:] for line in readme.splitlines() if line.startswith("## ")]
    assert headings == HEADINGS
    assert "Ada Lovelace, Alan M. Turing" in readme and "arXiv [2401.01234]" in readme
    pyproject = (dst / "pyproject.toml").read_text()
    assert f'{name} = "{module_of(name)}:Tpl{family.title().replace("-", "")}"' in pyproject
    plugin = (dst / "src" / module_of(name) / "plugin.py").read_text()
    assert 'title="A \\"Quoted\\" Method for Testing Templates, \\\\& Friends"' in plugin
    assert (
        'arxiv="2401.01234"' in plugin and "author    = {Ada Lovelace and Alan M. Turing}" in plugin
    )
    answers = yaml.safe_load((dst / ".copier-answers.yml").read_text())
    assert answers["name"] == name and answers["family"] == family
    assert Path(answers["_src_path"]) == TEMPLATE


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A sample-weighting plugin rendered by ``paperhooks new`` and pip-installed into a target dir."""
    tmp = tmp_path_factory.mktemp("installed")
    paperhooks_cli(
        "new",
        "tpl-installed",
        "--family",
        "sample-weighting",
        "--output",
        str(tmp / "plugin"),
        cwd=tmp,
    )
    pip_install_target(tmp / "site", tmp / "plugin")
    return tmp


def test_installed_plugin_is_discovered_through_its_entry_point(installed):
    site = installed / "site"
    assert (site / "paperhooks_tpl_installed" / "py.typed").is_file()
    rows = json.loads(
        paperhooks_cli("plugins", "--json", cwd=installed, env={"PYTHONPATH": str(site)}).stdout
    )
    (row,) = [r for r in rows if r["name"] == "tpl-installed"]
    assert row["error"] == ""
    assert (row["family"], row["distribution"], row["version"]) == (
        "sample-weighting",
        "paperhooks-tpl-installed",
        "0.1.0",
    )
    assert row["paper"].startswith("Title of the paper behind tpl-installed")


def test_installed_plugin_passes_its_own_tests(installed):
    proc = run_pytest(
        [installed / "plugin" / "tests"], installed / "plugin", installed / "site", "-m", "not slow"
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    # the kit's checks (entry point, metadata, recipe, family, few steps, resume) ran, not just the placeholders
    assert "passed" in proc.stdout and "skipped" not in proc.stdout


# -- every family ---------------------------------------------------------------------------------------------
def _import_file(name: str, path: Path):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_family_renders_code_that_lints_and_passes_the_family_checks(tmp_path, monkeypatch):
    rendered = {f: render(f"tpl-{f}", f, PAPER, output=tmp_path / f) for f in FAMILIES}
    if importlib.util.find_spec("ruff") is not None:
        cmd = [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--config",
            str(ROOT / "pyproject.toml"),
            "--no-cache",
            str(tmp_path),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-6000:]
    for family, dst in rendered.items():
        name = f"tpl-{family}"
        monkeypatch.syspath_prepend(str(dst / "src"))
        cls = getattr(
            importlib.import_module(module_of(name)), f"Tpl{family.title().replace('-', '')}"
        )
        assert cls.family == family and cls.name == name
        C.check_metadata(cls, name)
        tests = _import_file(
            f"tpl_tests_{module_of(name)}", dst / "tests" / f"test_{module_of(name)}.py"
        )
        config = cls.Config(**tests.TestConformance.plugin_config)
        plugin = cls(config)
        plugin.name = name
        C.check_family(plugin)


def test_placeholder_test_fails_once_the_formula_changes(tmp_path, monkeypatch):
    dst = render("tpl-edited", "sample-weighting", output=tmp_path / "p")
    functional = dst / "src" / "paperhooks_tpl_edited" / "functional.py"
    text = functional.read_text()
    assert "return torch.ones_like(losses)  # [B]" in text
    functional.write_text(
        text.replace("return torch.ones_like(losses)  # [B]", "return losses + 1.0  # [B]")
    )
    monkeypatch.syspath_prepend(str(dst / "src"))
    tests = _import_file("tpl_tests_edited", dst / "tests" / "test_paperhooks_tpl_edited.py")
    with pytest.raises(AssertionError):
        tests.test_sample_weights_by_hand()


@pytest.mark.slow
@pytest.mark.full_suite  # default run: one family's own tests (test_installed_plugin_passes_its_own_tests) and every family's lint + family checks
def test_every_family_passes_its_own_tests(tmp_path):
    rendered = [render(f"tpl-all-{f}", f, output=tmp_path / f) for f in FAMILIES]
    pip_install_target(tmp_path / "site", *rendered)
    proc = run_pytest(
        [d / "tests" for d in rendered],
        tmp_path,
        tmp_path / "site",
        "-m",
        "not slow",
        "-W",
        "ignore::pytest.PytestUnknownMarkWarning",
    )
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-3000:]


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["My-Method", "--family", "sample-weighting"],
            "invalid plugin name 'My-Method': use lowercase letters",
        ),
        (["my_method", "--family", "sample-weighting"], "invalid plugin name 'my_method'"),
        (["2fast", "--family", "sample-weighting"], "invalid plugin name '2fast'"),
        (["my--method", "--family", "sample-weighting"], "invalid plugin name 'my--method'"),
        (["my-method-", "--family", "sample-weighting"], "invalid plugin name 'my-method-'"),
        (
            ["loss-reweighting", "--family", "sample-weighting"],
            "plugin name 'loss-reweighting' is taken: paperhooks-loss-reweighting",
        ),
        (
            ["my-method", "--family", "weighting"],
            "unknown family 'weighting'; choose one of: " + ", ".join(FAMILIES),
        ),
        (
            ["my-method", "--family", "pruning", "--arxiv", "arXiv:1234"],
            "arXiv id 'arXiv:1234' should look like",
        ),
        (
            ["my-method", "--family", "pruning", "--code-url", "github.com/x"],
            "must be an http(s) URL or 'none found'",
        ),
        (["my-method", "--family", "pruning", "--title", 'Bad """ title'], "triple quotes"),
        (["my-method", "--family", "pruning", "--year", "20"], "year 20 is not a publication year"),
    ],
)
def test_bad_input_fails_with_a_clear_message_and_writes_nothing(
    tmp_path, monkeypatch, capsys, args, message
):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    assert cli_main(["new", *args, "--output", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert (
        cli_main(["new", "my-method", "--family", "metric", "--output", str(tmp_path / "taken")])
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert files_under(tmp_path / "taken") == {"mine.txt"}


def test_the_command_line_exits_2_on_a_bad_name(tmp_path):
    proc = paperhooks_cli("new", "Bad_Name", "--family", "pruning", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "paperhooks: error: invalid plugin name 'Bad_Name'" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_default_output_is_plugins_inside_the_repo_else_the_current_directory(
    tmp_path, monkeypatch, capsys
):
    assert default_output("x", cwd=ROOT) == ROOT / "plugins" / "x"
    assert default_output("x", cwd=ROOT / "tests") == ROOT / "plugins" / "x"
    assert default_output("x", cwd=tmp_path) == tmp_path / "x"
    monkeypatch.chdir(tmp_path)
    assert cli_main(["new", "here-method", "--family", "objective"]) == 0
    assert "created here-method:" in capsys.readouterr().out
    assert files_under(tmp_path / "here-method") == expected_files("here-method")


# -- copier update --------------------------------------------------------------------------------------
def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="copier update needs git")
def test_copier_update_brings_template_changes_and_keeps_the_authors_code(tmp_path, monkeypatch):
    for key, value in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }.items():
        monkeypatch.setenv(key, value)
    # The template published as a repository of its own, as `copier update` needs.
    tpl = tmp_path / "template"
    shutil.copytree(TEMPLATE, tpl, ignore=shutil.ignore_patterns("__pycache__"))
    _git("init", "-q", cwd=tpl)
    _git("add", "-A", cwd=tpl)
    _git("commit", "-q", "-m", "v1", cwd=tpl)
    _git("tag", "v0.1.0", cwd=tpl)
    dst = render(
        "tpl-update", "pruning", template=str(tpl), vcs_ref="v0.1.0", output=tmp_path / "plugin"
    )
    answers = yaml.safe_load((dst / ".copier-answers.yml").read_text())
    assert answers["_commit"] == "v0.1.0" and answers["_src_path"] == str(tpl)
    _git("init", "-q", cwd=dst)
    functional = dst / "src" / "paperhooks_tpl_update" / "functional.py"
    functional.write_text(functional.read_text() + "\nPAPER_CONSTANT = 0.5  # the author's code\n")
    _git("add", "-A", cwd=dst)
    _git("commit", "-q", "-m", "the author's plugin", cwd=dst)

    readme = tpl / "template" / "README.md.jinja"
    readme.write_text(
        readme.read_text() + "\n## Citing\n\n`paperhooks cite recipes/{{ name }}.yaml`\n"
    )
    _git("commit", "-q", "-am", "v2", cwd=tpl)
    _git("tag", "v0.2.0", cwd=tpl)
    copier.run_update(
        str(dst),
        defaults=True,
        overwrite=True,
        unsafe=False,
        quiet=True,
        settings=copier.Settings(),
    )

    assert "`paperhooks cite recipes/tpl-update.yaml`" in (dst / "README.md").read_text()
    assert "PAPER_CONSTANT = 0.5  # the author's code" in functional.read_text()
    assert yaml.safe_load((dst / ".copier-answers.yml").read_text())["_commit"] == "v0.2.0"


def test_rendered_plugin_installs_and_is_found_in_a_fresh_virtual_environment(installed):
    """``python -m venv`` + ``pip install`` of the rendered package, then the fresh venv's CLI.

    The fresh environment reuses this environment's packages (torch, the core) through a
    ``site.addsitedir`` line, so nothing heavy is reinstalled; the plugin itself is installed
    into the fresh venv by pip, as an author would.
    """
    import site
    import sysconfig
    import venv

    env_dir = installed / "fresh-venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    fresh_python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(ours))
    Path(purelib, "_paperhooks_parent_env.pth").write_text(lines)
    install = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(fresh_python),
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        str(installed / "plugin"),
    ]
    proc = subprocess.run(install, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(Path(purelib).glob("paperhooks_tpl_installed-0.1.0.dist-info"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    listing = subprocess.run(
        [str(fresh_python), "-m", "paperhooks.cli", "plugins", "--json"],
        cwd=installed,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert listing.returncode == 0, listing.stderr[-3000:]
    (row,) = [r for r in json.loads(listing.stdout) if r["name"] == "tpl-installed"]
    assert (row["family"], row["error"]) == ("sample-weighting", "")
