"""The ``paperhooks`` command. Importing this module does not import torch."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

STEP_ORDER = (
    ("perturb_inputs", "1. input perturbation (chained)"),
    ("objective_terms", "2-4. forward, module losses, objective terms (added by name)"),
    (
        "weighting_sample_weights",
        "5. sample weights (multiplied, normalized over the global batch)",
    ),
    ("objweight_coefficients", "6. objective coefficients (one owner)"),
    ("surgery_parameters", "7. gradient surgery: the parameters it acts on (intersection)"),
    ("surgery_combine", "7. gradient surgery (chained; manual optimization)"),
    ("lifecycle_before_optimizer_step", "7. before the optimizer step (gradients final)"),
    ("optimizer_build", "   optimizer (one owner)"),
    ("reparam_setup", "   set-up: reparameterizations (stacked)"),
    ("lifecycle_setup", "   set-up: lifecycle"),
    ("metric_build", "   set-up: metrics (union)"),
    ("reparam_after_step", "8. after the optimizer step: reparameterization updates"),
    ("reparam_merge", "export: undo wrapper modules before parametrizations are folded"),
    ("pruning_schedule", "8. pruning schedule (one owner)"),
    ("pruning_scores", "8. pruning criterion (one owner)"),
    ("pruning_allocate", "8. pruning allocation (one owner)"),
    ("lifecycle_step_end", "8. step end"),
    ("lifecycle_epoch_end", "   epoch end"),
    ("lifecycle_fit_end", "   fit end (reverse order)"),
    ("transform_after_fit", "   post-training transforms (chained)"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="paperhooks",
        description="Training techniques from research papers, as composable PyTorch Lightning plugins.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    s = sub.add_parser("plugins", help="list installed plugins (family, paper, version)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    for name, text in (
        ("validate", "check a recipe without training"),
        ("cite", "print the BibTeX of every paper a recipe uses"),
        ("explain", "show the order in which plugins run at each hook"),
        ("fit", "train a recipe"),
    ):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("recipe", help="a YAML file or hf://OWNER/REPO/PATH.yaml")
        s.add_argument(
            "overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=3"
        )
        if name == "fit":
            s.add_argument(
                "--resume",
                metavar="CKPT",
                help="resume from a checkpoint file (e.g. RUN/checkpoints/last.ckpt)",
            )
    _add_run_commands(sub)
    # paperhooks.new imports only the standard library at import: --help stays torch-free
    from paperhooks.new import add_arguments as add_new_arguments

    text = "render a new plugin package (paperhooks-NAME) from the template"
    add_new_arguments(sub.add_parser("new", help=text, description=text))
    return p


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    """``export``, ``push``, ``compare`` and ``docs`` (implemented in share, compare, docgen)."""
    s = sub.add_parser(
        "export", help="write a run as a model folder: safetensors, recipe, metrics, model card"
    )
    s.add_argument("run", help="a run directory (runs/NAME/version_K)")
    s.add_argument("--out", metavar="DIR", help="output folder (default RUN/export)")
    s = sub.add_parser("push", help="export a run and upload it to the Hugging Face Hub")
    s.add_argument("run", help="a run directory (runs/NAME/version_K)")
    s.add_argument(
        "repo_id", metavar="REPO_ID", help="OWNER/NAME of the model repository (created if missing)"
    )
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--token", help="Hub token (default: the saved login or HF_TOKEN)")
    s = sub.add_parser(
        "compare", help="plot runs' metrics as PNGs and tabulate their final metrics"
    )
    s.add_argument(
        "runs", nargs="+", metavar="RUN", help="run directories, or folders of version_* runs"
    )
    s.add_argument(
        "--out", metavar="DIR", default="compare", help="output folder (default ./compare)"
    )
    s.add_argument(
        "--metrics", metavar="M1,M2", help="only these metrics (e.g. val/acc,train/loss)"
    )
    s = sub.add_parser(
        "docs", help="generate the reference pages of the docs from the code and installed plugins"
    )
    s.add_argument(
        "--out",
        metavar="DIR",
        default="docs/generated",
        help="output folder (default docs/generated)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from paperhooks.errors import PaperhooksError

    try:
        return _COMMANDS[args.command](args)
    except PaperhooksError as e:
        print(f"paperhooks: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # bad input that only shows once a fit runs (a plugin's check of the data, the trainer
        # settings or its own state) is raised as ValueError by paperhooks' or a plugin's own
        # code: say it in one line, not through Lightning's and torch's frames. Errors raised
        # anywhere else keep their traceback, and PAPERHOOKS_TRACEBACK=1 keeps every one.
        where = _raised_by_paperhooks(e)
        if where is None or os.environ.get("PAPERHOOKS_TRACEBACK"):
            raise
        print(
            f"paperhooks: error: {e}\n  (raised at {where}; PAPERHOOKS_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 2


def _raised_by_paperhooks(e: BaseException) -> str | None:
    """``module:line`` of the frame that raised ``e`` when it is paperhooks' or a plugin's
    (``paperhooks_*``) code, else None."""
    tb = e.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = str(tb.tb_frame.f_globals.get("__name__", ""))
    if module == "paperhooks" or module.startswith(("paperhooks.", "paperhooks_")):
        return f"{module}:{tb.tb_lineno}"
    return None


def _plugins(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from paperhooks.discovery import list_plugins

    rows = list_plugins()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return 0
    if not rows:
        print("no paperhooks plugins installed (pip install paperhooks-<name>)")
        return 0
    header = ("name", "family", "distribution", "version", "paper")
    table = [
        (r.name, r.family or "ERROR", r.distribution, r.version, r.paper or r.error) for r in rows
    ]
    _print_table(header, table)
    return 0


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for i, row in enumerate([header, *rows]):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _load(args: argparse.Namespace):  # noqa: ANN202
    from paperhooks.recipe import load

    return load(args.recipe, args.overrides)


def _names(entries: Sequence[Any]) -> str:
    return ", ".join(dict.fromkeys(p.name for p in entries)) or "no plugins"


def _validate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    names = _names(recipe.plugins)
    if recipe.stages:  # what each fit runs
        names = "stages: " + "; ".join(
            f"{name} [{_names(stage.all_plugins)}]" for name, stage in recipe.stages
        )
    print(
        f"ok: {args.recipe} ({names}; strategy {recipe.trainer.strategy_kind}, {recipe.trainer.devices} device(s))"
    )
    return 0


def _cite(args: argparse.Namespace) -> int:
    recipe = _load(args)
    seen = set()
    for p in recipe.all_plugins:  # every stage's too
        paper = p.cls.paper
        if paper is None or paper.bibtex in seen:
            continue
        seen.add(paper.bibtex)
        print(f"% {p.name}: {paper.title}")
        print(paper.bibtex.strip() + "\n")
    if not seen:
        print("% this recipe uses no paper plugins")
    return 0


def _explain(args: argparse.Namespace) -> int:
    recipe = _load(args)
    fits = [("", recipe)]
    if recipe.stages:  # each stage (and each ingredient with plugins of its own) is a fit
        fits = []
        for name, stage in recipe.stages:
            fits.append((f"stage {name}", stage))
            fits += [
                (f"stage {name}, ingredient {j}", r)
                for j, r in enumerate(stage.ingredients)
                if r.plugins != stage.plugins
            ]
    for label, fit in fits:
        _explain_fit(args.recipe, label, fit)
    return 0


def _explain_fit(path: str, label: str, recipe: Any) -> None:
    from paperhooks.manager import PluginSet

    plugins = []
    for e in recipe.plugins:
        p = e.cls(e.config)
        p.name = e.name
        plugins.append(p)
    order = PluginSet(plugins).order()
    where = f"recipe {path}" + (f", {label}" if label else "")
    print(f"{where}: {len(plugins)} plugin(s), strategy {recipe.trainer.strategy_kind}")
    for hook, text in STEP_ORDER:
        if hook in order:
            print(f"{text}\n    {hook}: {' -> '.join(order[hook])}")
    if any(p.replaces_task_loss for p in plugins):
        print("the module's own losses are replaced by an objective plugin")


def _quiet_lightning() -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # paperhooks' sampler resumes mid-epoch exactly (tests/test_resume.py), whatever Lightning guesses
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def _fit(args: argparse.Namespace) -> int:
    from paperhooks.run import fit

    _quiet_lightning()

    recipe = _load(args)
    built, metrics = fit(recipe, resume=args.resume)
    if built.trainer.is_global_zero:
        print(f"\nrun directory: {built.run_dir}")
        _print_table(("metric", "value"), [(k, f"{v:.4f}") for k, v in sorted(metrics.items())])
    return 0


_COMMANDS = {
    "plugins": _plugins,
    "validate": _validate,
    "cite": _cite,
    "explain": _explain,
    "fit": _fit,
}


def _export(args: argparse.Namespace) -> int:
    from paperhooks.share import export

    print(f"exported {args.run} to {export(args.run, args.out)}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from paperhooks.share import push

    print(
        f"pushed {args.run} to {push(args.run, args.repo_id, private=args.private, token=args.token)}"
    )
    return 0


def _compare(args: argparse.Namespace) -> int:
    from paperhooks.compare import compare

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    print(f"wrote {compare(args.runs, args.out, metrics)}")
    return 0


def _docs(args: argparse.Namespace) -> int:
    from paperhooks.docgen import generate

    written = generate(args.out)
    print(f"generated the reference pages in {args.out} ({len(written)} rewritten)")
    return 0


_COMMANDS.update({"export": _export, "push": _push, "compare": _compare, "docs": _docs})


def _new(args: argparse.Namespace) -> int:
    from paperhooks.new import command

    return command(args)


_COMMANDS["new"] = _new

if __name__ == "__main__":
    sys.exit(main())
