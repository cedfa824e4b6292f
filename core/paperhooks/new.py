"""``paperhooks new NAME --family F``: render a plugin distribution from the copier template.

Everything is checked before anything is written: the name (a valid distribution and module
name, not taken by an installed plugin or an existing directory), the family, and the paper
fields. The template is ``templates/plugin`` of the paperhooks source tree, rendered with
copier without tasks or migrations (so without ``--trust``); any copier source can be given
instead (a directory, or a git URL whose template root holds ``copier.yml``).

The rendered ``.copier-answers.yml`` lets ``copier update`` bring later template changes
into the plugin. copier versions a template by git only when the template is the root of a
repository: rendered from ``templates/plugin`` of a checkout, it records the path without a
commit, so ``copier recopy`` works and ``copier update`` needs the template published as a
repository of its own (``--template gh:OWNER/REPO``).

Importing this module imports neither torch nor copier.
"""

from __future__ import annotations

import argparse
import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path

from paperhooks.errors import PaperhooksError

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
ARXIV_RE = re.compile(r"^(\d{4}\.\d{4,5}|[a-z-]+(\.[A-Z]{2})?/\d{7})(v\d+)?$")


class TemplateError(PaperhooksError):
    """``paperhooks new`` cannot render the plugin as asked; nothing was written."""


@dataclass(frozen=True)
class PaperInfo:
    """What the template asks about the paper; the defaults are placeholders to replace."""

    title: str = ""
    authors: tuple[str, ...] = ("First Author", "Second Author")
    year: int = field(default_factory=lambda: datetime.date.today().year)
    venue: str = "arXiv preprint"
    arxiv: str = ""
    code_url: str = "none found"
    description: str = "Describe the method in one line."


def template_dir() -> Path:
    """``templates/plugin`` of the source tree this ``paperhooks`` was installed from."""
    path = Path(__file__).resolve().parents[2] / "templates" / "plugin"
    if not (path / "copier.yml").is_file():
        raise TemplateError(
            f"the plugin template is not at {path} (it ships with the paperhooks source tree, "
            "not with the wheel); pass --template PATH_OR_GIT_URL, e.g. a checkout's templates/plugin"
        )
    return path


def default_output(name: str, cwd: Path | None = None) -> Path:
    """``<repo>/plugins/NAME`` inside a paperhooks checkout (found upwards from ``cwd``), else ``./NAME``."""
    cwd = (cwd or Path.cwd()).resolve()
    for root in (cwd, *cwd.parents):
        if (root / "plugins").is_dir() and (root / "templates" / "plugin" / "copier.yml").is_file():
            return root / "plugins" / name
    return cwd / name


def check_name(name: str) -> None:
    """Refuse a name that is not a valid plugin name or that an installed plugin already uses."""
    import importlib.metadata as md

    from paperhooks import discovery

    if not NAME_RE.match(name):
        raise TemplateError(
            f"invalid plugin name {name!r}: use lowercase letters, digits and single hyphens, starting "
            "with a letter (e.g. my-method); it becomes the distribution paperhooks-NAME and the "
            "module paperhooks_NAME"
        )
    found = discovery.entry_points()
    if name in found:
        item = found[name]
        raise TemplateError(
            f"plugin name {name!r} is taken: {item.distribution} {item.version} is installed with it"
        )
    try:
        dist = md.distribution(f"paperhooks-{name}")
    except md.PackageNotFoundError:
        return
    raise TemplateError(
        f"plugin name {name!r} is taken: distribution paperhooks-{name} {dist.version} is installed"
    )


def check_family(family: str) -> None:
    from paperhooks.plugin import FAMILIES

    if family not in FAMILIES:
        raise TemplateError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")


def check_paper(paper: PaperInfo) -> None:
    """Refuse paper fields the template cannot write into Python, TOML and BibTeX as given."""
    texts = {"title": paper.title, "venue": paper.venue, "description": paper.description}
    texts.update({f"author {i + 1}": a for i, a in enumerate(paper.authors)})
    for what, text in texts.items():
        if not text.strip() and what != "title":
            raise TemplateError(f"the {what} is empty")
        if any(ord(c) < 32 for c in text) or '"""' in text:
            raise TemplateError(
                f"the {what} must be one line without control characters or triple quotes: {text!r}"
            )
    if not paper.authors:
        raise TemplateError("give at least one author")
    if not 1900 <= paper.year <= datetime.date.today().year + 1:
        raise TemplateError(f"year {paper.year} is not a publication year")
    if paper.arxiv and not ARXIV_RE.match(paper.arxiv):
        raise TemplateError(
            f"arXiv id {paper.arxiv!r} should look like 2502.06733 (or hep-th/9901001)"
        )
    if paper.code_url != "none found" and not re.match(r"^https?://\S+$", paper.code_url):
        raise TemplateError(f"code URL {paper.code_url!r} must be an http(s) URL or 'none found'")


def answers(name: str, family: str, paper: PaperInfo) -> dict[str, object]:
    """The template's answers (``copier.yml`` questions) for this plugin."""
    return {
        "name": name,
        "family": family,
        "paper_title": paper.title or f"Title of the paper behind {name}",
        "authors": list(paper.authors),
        "year": paper.year,
        "venue": paper.venue,
        "arxiv": paper.arxiv,
        "code_url": paper.code_url,
        "description": paper.description,
    }


def render(
    name: str,
    family: str,
    paper: PaperInfo | None = None,
    *,
    output: Path | str | None = None,
    template: str | None = None,
    vcs_ref: str | None = None,
) -> Path:
    """Check everything, then render the plugin into ``output`` (default :func:`default_output`).

    :param template: a copier source (directory or git URL); default :func:`template_dir`.
    :param vcs_ref: the git ref of ``template`` to render (copier's ``vcs_ref``).
    :return: the directory written.
    :raises TemplateError: on bad input, before anything is written.
    """
    paper = paper or PaperInfo()
    check_name(name)
    check_family(family)
    check_paper(paper)
    dst = Path(output) if output is not None else default_output(name)
    if dst.exists():
        raise TemplateError(f"{dst} already exists; choose another --output or remove it")
    src = template or str(template_dir())

    import copier

    try:
        copier.run_copy(
            src,
            dst,
            data=answers(name, family, paper),
            vcs_ref=vcs_ref,
            settings=copier.Settings(),  # the user's copier defaults must not change the answers
            defaults=True,
            unsafe=False,
            quiet=True,
        )
    except Exception as e:  # noqa: BLE001 - copier's errors (bad template, bad answer) reach the user as one error
        raise TemplateError(
            f"copier could not render {src} into {dst}: {type(e).__name__}: {e}"
        ) from e
    return dst


# -- command line -----------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``paperhooks new``."""
    parser.add_argument(
        "name", help="plugin name (lowercase letters, digits, hyphens), e.g. my-method"
    )
    parser.add_argument(
        "--family",
        required=True,
        help="hook family: sample-weighting, objective, gradient-surgery, ...",
    )
    parser.add_argument(
        "--output",
        metavar="DIR",
        help="where to write (default: plugins/NAME in a paperhooks checkout, else ./NAME)",
    )
    parser.add_argument("--title", default="", help="the paper's title")
    parser.add_argument(
        "--author",
        action="append",
        dest="authors",
        metavar="NAME",
        help="an author (repeat for each)",
    )
    parser.add_argument("--year", type=int, help="year of publication (default: this year)")
    parser.add_argument(
        "--venue", default=PaperInfo.venue, help="e.g. 'ICLR 2025' (default: %(default)s)"
    )
    parser.add_argument("--arxiv", default="", metavar="ID", help="arXiv id, e.g. 2502.06733")
    parser.add_argument(
        "--code-url", default=PaperInfo.code_url, help="official code URL (default: %(default)s)"
    )
    parser.add_argument(
        "--description", default=PaperInfo.description, help="one line on what the method does"
    )
    parser.add_argument(
        "--template",
        metavar="SRC",
        help="copier template source (default: templates/plugin of this checkout)",
    )
    parser.add_argument("--vcs-ref", metavar="REF", help="git ref of --template to render")


def command(args: argparse.Namespace) -> int:
    """Run ``paperhooks new`` from parsed arguments; print what was written and what to do next."""
    defaults = PaperInfo()
    paper = PaperInfo(
        title=args.title,
        authors=tuple(args.authors) if args.authors else defaults.authors,
        year=args.year if args.year is not None else defaults.year,
        venue=args.venue,
        arxiv=args.arxiv,
        code_url=args.code_url,
        description=args.description,
    )
    dst = render(
        args.name,
        args.family,
        paper,
        output=args.output,
        template=args.template,
        vcs_ref=args.vcs_ref,
    )
    module = "paperhooks_" + args.name.replace("-", "_")
    shown = _shown(dst)
    print(
        f"created {shown}: distribution paperhooks-{args.name}, family {args.family}, entry point {args.name}"
    )
    steps = [
        (f"pip install -e {shown}", "then `paperhooks plugins` lists it"),
        (f"pytest {shown}", "the conformance kit and the placeholder tests pass as rendered"),
    ]
    todo = [
        (f"src/{module}/functional.py", "the paper's formula, in its notation"),
        (f"src/{module}/plugin.py", "config defaults (the paper's), metadata, BibTeX"),
        (f"tests/test_{module}.py", "test_*_by_hand: values derived by hand"),
        ("README.md", "the method card"),
    ]
    width = max(len(a) for a, _ in steps + todo)
    print("next:")
    for a, b in steps:
        print(f"  {a:<{width}}  # {b}")
    print("then replace the template's placeholders in:")
    for a, b in todo:
        print(f"  {a:<{width}}  {b}")
    return 0


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


__all__ = [
    "PaperInfo",
    "TemplateError",
    "add_arguments",
    "answers",
    "check_family",
    "check_name",
    "check_paper",
    "command",
    "default_output",
    "render",
    "template_dir",
]
