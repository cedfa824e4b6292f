"""The ``paperhooks`` command. Importing this module does not import torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

STEP_ORDER = (
    ("perturb_inputs", "1. input perturbation (chained)"),
    ("objective_terms", "2-4. forward, module losses, objective terms (added by name)"),
    ("weighting_sample_weights", "5. sample weights (multiplied, normalized over the global batch)"),
    ("objweight_coefficients", "6. objective coefficients (one owner)"),
    ("surgery_combine", "7. gradient surgery (chained; manual optimization)"),
    ("optimizer_build", "   optimizer (one owner)"),
    ("reparam_setup", "   set-up: reparameterizations (stacked)"),
    ("lifecycle_setup", "   set-up: lifecycle"),
    ("metric_build", "   set-up: metrics (union)"),
    ("reparam_after_step", "8. after the optimizer step: reparameterization updates"),
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
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_epochs=3")
        if name == "fit":
            s.add_argument("--resume", metavar="CKPT", help="resume from a checkpoint file (e.g. RUN/checkpoints/last.ckpt)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from paperhooks.errors import PaperhooksError

    try:
        return _COMMANDS[args.command](args)
    except PaperhooksError as e:
        print(f"paperhooks: error: {e}", file=sys.stderr)
        return 2


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
    table = [(r.name, r.family or "ERROR", r.distribution, r.version, r.paper or r.error) for r in rows]
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


def _validate(args: argparse.Namespace) -> int:
    recipe = _load(args)
    names = ", ".join(p.name for p in recipe.plugins) or "no plugins"
    print(f"ok: {args.recipe} ({names}; strategy {recipe.trainer.strategy_kind}, {recipe.trainer.devices} device(s))")
    return 0


def _cite(args: argparse.Namespace) -> int:
    recipe = _load(args)
    seen = set()
    for p in recipe.plugins:
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
    from paperhooks.manager import PluginSet

    recipe = _load(args)
    plugins = []
    for e in recipe.plugins:
        p = e.cls(e.config)
        p.name = e.name
        plugins.append(p)
    order = PluginSet(plugins).order()
    print(f"recipe {args.recipe}: {len(plugins)} plugin(s), strategy {recipe.trainer.strategy_kind}")
    for hook, text in STEP_ORDER:
        if hook in order:
            print(f"{text}\n    {hook}: {' -> '.join(order[hook])}")
    if any(p.replaces_task_loss for p in plugins):
        print("the module's own losses are replaced by an objective plugin")
    return 0


def _quiet_lightning() -> None:
    import logging
    import warnings

    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")


def _fit(args: argparse.Namespace) -> int:
    from paperhooks.run import fit

    _quiet_lightning()

    recipe = _load(args)
    built, metrics = fit(recipe, resume=args.resume)
    if built.trainer.is_global_zero:
        print(f"\nrun directory: {built.run_dir}")
        _print_table(("metric", "value"), [(k, f"{v:.4f}") for k, v in sorted(metrics.items())])
    return 0


_COMMANDS = {"plugins": _plugins, "validate": _validate, "cite": _cite, "explain": _explain, "fit": _fit}

if __name__ == "__main__":
    sys.exit(main())
