"""Export a run as a Hugging Face model folder, and push that folder to the Hub.

``paperhooks export RUN`` writes ``RUN/export/``:

- ``model.safetensors``: the weights of the recipe's model, as a freshly built model expects
  them. Parametrizations (pruning masks, reparameterizations) are folded in, so the file
  holds the *effective* weights (e.g. ``original ⊙ mask``) under the plain names;
- ``recipe.yaml``: the run's resolved recipe with ``plugin_versions`` (``run_dir`` dropped);
- ``metrics.json``: the run's final metrics;
- ``README.md``: a model card that lists the plugins and their versions and cites every
  paper used.

A run with ``stages`` exports the model its last stage passed on: that stage's final
checkpoint, or its soup (``soup_weights.pt`` and ``soup_masks.pt``); the card lists the
plugins of every stage. A stage's own directory (``RUN/stages/<i>-<name>``) is a run too and
exports the model at the end of that stage.

``paperhooks push RUN OWNER/REPO`` exports (unless an up-to-date export exists) and uploads
the folder with ``huggingface_hub``. :func:`load_model` builds the model back from a folder.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paperhooks.errors import PaperhooksError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from paperhooks.recipe import Recipe

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
FILES = (WEIGHTS, "recipe.yaml", "metrics.json", "README.md")


class ShareError(PaperhooksError):
    """A run cannot be exported or pushed (missing files, Hub errors)."""


# -- reading a run ------------------------------------------------------------------------------
def read_run_recipe(run: Path) -> dict[str, Any]:
    """The run's ``recipe.yaml`` as plain data (``plugin_versions`` included)."""
    from omegaconf import OmegaConf

    path = run / "recipe.yaml"
    if not path.is_file():
        raise ShareError(f"{run} is not a run directory: it has no recipe.yaml")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def read_metrics(run: Path) -> dict[str, float]:
    path = run / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _validated(raw: Mapping[str, Any]) -> Recipe:
    from paperhooks.recipe import validate

    return validate(raw)


def _build_module(recipe: Recipe, configure: bool = True) -> nn.Module:
    """The run's TaskModule as ``run.build`` makes it, set up (parametrizations registered)
    unless ``configure`` is False."""
    from paperhooks.run import build_module
    from paperhooks.tasks import build_datamodule

    dm = build_datamodule(recipe.data.name, recipe.data.config, recipe.seed)
    module = build_module(recipe, dm.info, (len(dm.train_set), len(dm.val_set)))
    if configure:
        module.configure_model()
    return module


def effective_state_dict(run: Path, checkpoint: str = "last.ckpt") -> dict[str, torch.Tensor]:
    """The model's weights from ``RUN/checkpoints/<checkpoint>``, parametrizations folded in.

    The module is rebuilt from the run's recipe, so every parametrization a plugin registers
    is there to receive its checkpointed tensors; ``remove_parametrizations(...,
    leave_parametrized=True)`` then replaces each by the tensor it computes.
    """
    return _effective(run, checkpoint)[0]


def _final_stage(run: Path) -> Path:
    """The directory of the model a staged run passed on at its end: its last stage's."""
    raw = read_run_recipe(run)
    names = [stage["name"] for stage in raw.get("stages") or []]
    record = run / "stages.json"
    done = json.loads(record.read_text()) if record.is_file() else []
    if len(done) < len(names) or any(e.get("status") != "done" for e in done[-1:]):
        reached = done[-1]["stage"] if done else "none"
        raise ShareError(
            f"{run} has not finished its stages (last finished: {reached}; stages: {', '.join(names)}): "
            f"resume it, or export one stage's directory ({run}/stages/<i>-<name>)"
        )
    return run / done[-1]["dir"]


def _weights_file(run: Path, checkpoint: str = "last.ckpt") -> Path:
    """The file the exported weights come from: the run's checkpoint, or the soup of a staged
    run's last stage (its final checkpoint otherwise)."""
    if not (run / "checkpoints").is_dir() and (run / "stages.json").is_file():
        stage = _final_stage(run)
        soup = stage / "soup_weights.pt"
        return soup if soup.is_file() else stage / "checkpoints" / checkpoint
    return run / "checkpoints" / checkpoint


def _effective(
    run: Path, checkpoint: str = "last.ckpt"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """:func:`effective_state_dict` and the keys of the weights a pruning mask was folded into."""
    import torch

    from paperhooks import pruning
    from paperhooks.reparam import merge

    path = _weights_file(run, checkpoint)
    if path.name == "soup_weights.pt":  # plain weights + masks, as a stage passes them on
        from paperhooks.stages import Carried, start_from

        (first, *_) = sorted(path.parent.glob("ingredient-*"))
        module = _build_module(_validated(read_run_recipe(first)), configure=False)
        load = functools.partial(torch.load, map_location="cpu", weights_only=True)
        # as a stage starts from what it is passed: plain weights, then set-up, then the masks
        start_from(module, Carried(load(path), load(path.parent / "soup_masks.pt")))
    else:
        if not path.is_file():
            raise ShareError(
                f"{path.parent.parent} has no checkpoints/{checkpoint}; has the run trained a step?"
            )
        module = _build_module(_validated(read_run_recipe(path.parent.parent)))
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        if not module.masks and pruning.has_masks(state):
            module.masks = pruning.add_masks(module.model)  # masks an earlier stage passed on
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ShareError(
                f"{path} does not match the model its recipe builds: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    pruned = [f"{name}.weight" for name in getattr(module, "masks", {})]
    model = merge(module.model, module.plugins)
    # Clones: safetensors refuses tensors that share memory (tied weights load back fine).
    return {
        k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
    }, pruned


def size_report(tensors: Mapping[str, torch.Tensor], pruned: Sequence[str] = ()) -> dict[str, Any]:
    """Real size of exported weights: nonzero counts and sparsity per pruned layer and overall.

    ``bytes_dense`` is what the safetensors file stores (every entry, zeros included);
    ``bytes_sparse`` what the same weights take with each pruned layer stored as its nonzero
    values plus a one-bit-per-entry mask (other tensors dense).
    """
    layers = {}
    for k in pruned:
        t = tensors[k]
        nnz = _nonzero(t)
        layers[k] = {"numel": t.numel(), "nonzero": nnz, "sparsity": 1.0 - nnz / max(t.numel(), 1)}
    numel = sum(t.numel() for t in tensors.values())
    nonzero = sum(_nonzero(t) for t in tensors.values())
    dense = sum(t.numel() * t.element_size() for t in tensors.values())
    sparse = dense
    for k, v in layers.items():
        itemsize = tensors[k].element_size()
        sparse += (
            v["nonzero"] * itemsize + -(-v["numel"] // 8) - v["numel"] * itemsize
        )  # values + bitmask
    p_numel = sum(v["numel"] for v in layers.values())
    p_nonzero = sum(v["nonzero"] for v in layers.values())
    return {
        "layers": layers,
        "pruned": {
            "numel": p_numel,
            "nonzero": p_nonzero,
            "sparsity": 1.0 - p_nonzero / p_numel if p_numel else 0.0,
        },
        "model": {"numel": numel, "nonzero": nonzero, "bytes_dense": dense, "bytes_sparse": sparse},
    }


def _nonzero(t: torch.Tensor) -> int:
    import torch

    return int(torch.count_nonzero(t).item())


def read_size(folder: Path) -> dict[str, Any] | None:
    """The size report an export stored in its safetensors metadata (``None`` for unpruned runs)."""
    from safetensors import safe_open

    path = folder / WEIGHTS
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        text = (f.metadata() or {}).get("paperhooks_size")
    return json.loads(text) if text else None


# -- export ------------------------------------------------------------------------------------
def export(run: str | Path, out: str | Path | None = None, repo_id: str | None = None) -> Path:
    """Write the export folder of ``run`` (default ``RUN/export``); return its path."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    run = Path(run)
    out = Path(out) if out is not None else run / "export"
    raw = read_run_recipe(run)
    tensors, pruned = _effective(run)
    size = size_report(tensors, pruned) if pruned else None
    out.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "model": str(raw["model"]["name"])}
    if size is not None:
        metadata["paperhooks_size"] = json.dumps(size, sort_keys=True)
        p, m = size["pruned"], size["model"]
        log.info(
            "pruned weights: %d of %d nonzero (sparsity %.4f); model %d bytes dense, %d bytes as values + bitmask",
            p["nonzero"],
            p["numel"],
            p["sparsity"],
            m["bytes_dense"],
            m["bytes_sparse"],
        )
    save_file(tensors, out / WEIGHTS, metadata=metadata)
    shared = {
        k: v for k, v in raw.items() if k != "run_dir"
    }  # a local path means nothing elsewhere
    (out / "recipe.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(shared)))
    if (run / "metrics.json").is_file():
        shutil.copyfile(run / "metrics.json", out / "metrics.json")
    else:
        (out / "metrics.json").write_text("{}\n")
    (out / "README.md").write_text(
        model_card(shared, read_metrics(run), repo_id=repo_id, run_name=_run_name(run), size=size)
    )
    log.info("exported %s to %s", run, out)
    return out


def _run_name(run: Path) -> str:
    return f"{run.parent.name}/{run.name}"


def load_model(folder: str | Path) -> nn.Module:
    """The model of an export folder (``recipe.yaml`` + ``model.safetensors``), weights loaded."""
    from safetensors.torch import load_file

    from paperhooks.tasks import build_datamodule, build_model

    folder = Path(folder)
    recipe = _validated(read_run_recipe(folder))
    info = build_datamodule(recipe.data.name, recipe.data.config, recipe.seed).info
    model = build_model(recipe.model.name, recipe.model.config, info)
    model.load_state_dict(load_file(folder / WEIGHTS))
    return model.eval()


# -- the model card ----------------------------------------------------------------------------
def venue_year(paper: Any) -> str:
    """``"ICLR 2025"`` from a :class:`~paperhooks.plugin.Paper`, whether or not its venue names the year."""
    return paper.venue if str(paper.year) in paper.venue else f"{paper.venue} {paper.year}"


def _plugin_rows(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each recipe plugin with its recorded version and the installed class's paper and family."""
    from paperhooks import discovery
    from paperhooks.recipe import raw_plugin_entries

    versions = raw.get("plugin_versions") or {}
    found = discovery.entry_points()
    rows, seen = [], set()
    for entry in raw_plugin_entries(raw):  # a staged run: every stage's and ingredient's
        name = entry["name"]
        if name in seen:
            continue
        seen.add(name)
        cls = discovery.load(name, found)
        rows.append(
            {
                "name": name,
                "version": versions.get(name, "unknown"),
                "family": cls.family,
                "paper": cls.paper,
            }
        )
    return rows


def model_card(
    raw: Mapping[str, Any],
    metrics: Mapping[str, float],
    repo_id: str | None = None,
    run_name: str = "",
    size: Mapping[str, Any] | None = None,
) -> str:
    """A Hugging Face model card (front matter + Markdown) for an exported run.

    ``size`` (from :func:`size_report`, for pruned runs) adds a *Size and sparsity* section.
    """
    from huggingface_hub import ModelCardData
    from omegaconf import OmegaConf

    plugins = _plugin_rows(raw)
    model, data = raw["model"]["name"], raw["data"]["name"]
    tags = ["paperhooks", "pytorch-lightning", f"model:{model}", f"dataset:{data}"]
    tags += sorted({p["family"] for p in plugins}) + [p["name"] for p in plugins]
    front = ModelCardData(
        library_name="paperhooks", tags=list(dict.fromkeys(tags)), metrics=sorted(metrics)
    ).to_yaml()

    lines = [f"---\n{front}\n---", "", f"# {raw.get('name', 'run')}", ""]
    used = ", ".join(f"`{p['name']}`" for p in plugins) or "no paper plugins"
    lines += [
        f"Model `{model}` trained on `{data}` with [paperhooks](https://pypi.org/project/paperhooks/) "
        f"using {used}" + (f" (run `{run_name}`)." if run_name else "."),
        "",
        "## Plugins",
        "",
    ]
    if plugins:
        lines += ["| plugin | family | distribution | paper |", "|---|---|---|---|"]
        for p in plugins:
            paper = p["paper"]
            title = "none" if paper is None else f"{paper.title} ({venue_year(paper)})"
            if paper is not None and paper.arxiv:
                title = f"[{title}](https://arxiv.org/abs/{paper.arxiv})"
            lines.append(f"| `{p['name']}` | {p['family']} | `{p['version']}` | {title} |")
    else:
        lines.append("This run used no plugins.")
    lines += ["", "## Final metrics", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("The run recorded no final metrics.")
    if size:
        lines += _size_lines(size)
    pins = " ".join(sorted({f"'{p['version']}'" for p in plugins if "==" in str(p["version"])}))
    source = f'snapshot_download("{repo_id}")' if repo_id else '"path/to/this/folder"'
    lines += [
        "",
        "## Use",
        "",
        "`model.safetensors` holds the effective weights (pruning masks and other",
        "parametrizations folded in) of the model `recipe.yaml` builds:",
        "",
        "```python",
        *(["from huggingface_hub import snapshot_download"] if repo_id else []),
        "from paperhooks.share import load_model",
        "",
        f"model = load_model({source})",
        "```",
        "",
        "Train it again:",
        "",
        "```bash",
        f"pip install paperhooks {pins}".rstrip(),
        f"paperhooks fit {'hf://' + repo_id + '/recipe.yaml' if repo_id else 'recipe.yaml'}",
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        OmegaConf.to_yaml(OmegaConf.create(dict(raw))).rstrip(),
        "```",
        "",
        "## Citations",
        "",
    ]
    seen: set[str] = set()
    for p in plugins:
        paper = p["paper"]
        if paper is None or paper.bibtex in seen:
            continue
        seen.add(paper.bibtex)
        lines += [
            f"`{p['name']}`: {paper.title}. {', '.join(paper.authors)}. {venue_year(paper)}.",
            "",
        ]
        lines += ["```bibtex", paper.bibtex.strip(), "```", ""]
    if not seen:
        lines.append("This run used no paper plugins.")
    return "\n".join(lines).rstrip() + "\n"


def _size_lines(size: Mapping[str, Any]) -> list[str]:
    p, m = size["pruned"], size["model"]
    lines = [
        "",
        "## Size and sparsity",
        "",
        f"Pruned weights: {p['nonzero']:,} of {p['numel']:,} nonzero, sparsity {p['sparsity']:.4f}. "
        f"Whole model: {m['nonzero']:,} of {m['numel']:,} entries nonzero; `model.safetensors` stores them "
        f"densely ({m['bytes_dense']:,} bytes of tensors), {m['bytes_sparse']:,} bytes as nonzero values "
        "plus a one-bit mask per pruned weight.",
        "",
        "| weight | entries | nonzero | sparsity |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| `{k}` | {v['numel']:,} | {v['nonzero']:,} | {v['sparsity']:.4f} |"
        for k, v in size["layers"].items()
    ]
    return lines


# -- push --------------------------------------------------------------------------------------
def _stale(run: Path, folder: Path) -> bool:
    weights = folder / WEIGHTS
    if not all((folder / f).is_file() for f in FILES):
        return True
    try:
        ckpt = _weights_file(run)
    except ShareError:
        return True  # an unfinished staged run: export says why
    return ckpt.is_file() and ckpt.stat().st_mtime > weights.stat().st_mtime


def push(run: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Export ``run`` (unless ``RUN/export`` is up to date) and upload it to ``repo_id``; return its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    run = Path(run)
    folder = run / "export"
    if _stale(run, folder):
        export(run, folder, repo_id=repo_id)
    else:  # the card's snippets name the repository
        card = model_card(
            read_run_recipe(folder),
            read_metrics(folder),
            repo_id=repo_id,
            run_name=_run_name(run),
            size=read_size(folder),
        )
        (folder / "README.md").write_text(card)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=folder,
            repo_type="model",
            allow_patterns=list(FILES),
            commit_message=f"paperhooks export of {_run_name(run)}",
        )
    except HfHubHTTPError as e:
        raise ShareError(f"cannot push {run} to {repo_id}: {e}") from None
    return str(url)


__all__ = [
    "ShareError",
    "effective_state_dict",
    "export",
    "load_model",
    "model_card",
    "push",
    "read_size",
    "size_report",
    "venue_year",
]
