"""nox sessions for paperhooks (``nox -l`` lists them; ``nox -s NAME`` runs one).

- ``tests``: core and every plugin, the whole suite (what ``python3.11 dev.py test`` runs).
- ``plugin-<slug>``: one per ``plugins/<slug>/pyproject.toml``: only the core and that plugin
  installed, that plugin's tests run (it must not depend on another plugin being there).
- ``lint``: ``ruff check`` and ``ruff format --check``.
- ``docs``: ``mkdocs build --strict`` (skipped while there is no ``mkdocs.yml``).
- ``demo``: the README's demo, uniform vs loss-reweighting.
- ``bench``: ``benchmarks/run_all.py``, every benchmark in one run (results in ``docs/benchmarks.md``).

Every install goes through ``constraints.txt`` (torch and torchvision must come as a matched
pair). Each session has its own virtualenv under ``.nox/``; torch makes the first install of
each one slow, ``nox -R`` reuses them.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", "constraints.txt")

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests", "lint"]


def _plugins() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "plugins").glob("*/pyproject.toml"))


def _core(extras: str = "") -> str:
    """The core distribution, with ``extras`` (e.g. ``dev``) where pyproject.toml has them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        have = tomllib.load(f).get("project", {}).get("optional-dependencies", {})
    return f".[{extras}]" if extras and extras in have else "."


def _install_all(session: nox.Session, *more: str) -> None:
    editable = []
    for d in _plugins():
        editable += ["-e", str(d.relative_to(ROOT))]
    session.install(*CONSTRAINTS, "-e", _core("dev"), *editable, *more)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite: tests/ and plugins/*/tests, with every plugin installed."""
    _install_all(session, "pytest")
    session.run("python", "-m", "pytest", *session.posargs)


def _plugin_session(plugin: Path) -> None:
    slug = plugin.name

    @nox.session(name=f"plugin-{slug}")
    def session_(session: nox.Session) -> None:
        tests_dir = plugin / "tests"
        if not any(tests_dir.glob("test_*.py")):
            session.skip(f"plugins/{slug} has no tests (plugins/{slug}/tests/test_*.py)")
        session.install(
            *CONSTRAINTS, "-e", _core("test"), "-e", str(plugin.relative_to(ROOT)), "pytest"
        )
        session.run("python", "-m", "pytest", str(tests_dir.relative_to(ROOT)), *session.posargs)

    session_.__doc__ = f"plugins/{slug} alone: core + paperhooks-{slug}, its own tests"


for _plugin in _plugins():
    _plugin_session(_plugin)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff check and ruff format --check over the repository (settings in pyproject.toml)."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".", *session.posargs)
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """mkdocs build --strict (the site's hooks generate the plugin and recipe reference)."""
    if not (ROOT / "mkdocs.yml").is_file():
        session.skip("no mkdocs.yml yet: nothing to build")
    _install_all(session, "mkdocs-material")
    session.run(
        "python",
        "-m",
        "mkdocs",
        "build",
        "--strict",
        *session.posargs,
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def demo(session: nox.Session) -> None:
    """The README's demo: the same run with uniform weights and with loss-reweighting."""
    _install_all(session)
    session.run("python", "dev.py", "demo", "--no-setup", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """benchmarks/run_all.py: writes docs/benchmarks.md and docs/benchmarks/*.png.

    Arguments after ``--`` go to the script, e.g. ``nox -s bench -- --quick`` (a smoke run of
    about three minutes) or ``nox -s bench -- --device cuda``.
    """
    script = ROOT / "benchmarks" / "run_all.py"
    if not script.is_file():
        session.skip("no benchmarks/run_all.py")
    # the peers the gradient-surgery benchmark compares against, and the plots
    _install_all(session, "torchjd>=0.18", "LibMTL>=1.1.5", "matplotlib")
    session.run("python", str(script.relative_to(ROOT)), *session.posargs)
