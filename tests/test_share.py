"""``paperhooks export`` / ``push``: effective weights in safetensors, a model card citing the
papers, and an upload checked against a local stand-in for the Hugging Face Hub."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paperhooks import cli
from paperhooks import recipe as R
from paperhooks.run import fit
from paperhooks.tasks import build_datamodule, build_model

RECIPE = """\
name: {name}
seed: 0
model: {{name: mlp, hidden: [16]}}
data: {{name: digits, batch_size: 64}}
optimizer: {{name: sgd, lr: 0.1}}
trainer: {{max_steps: 4, enable_progress_bar: false, log_every_n_steps: 1}}
run_dir: {run_dir}
plugins: {plugins}
"""
FILES = {"model.safetensors", "recipe.yaml", "metrics.json", "README.md"}


def fit_tiny(tmp: Path, name: str, plugins: str):
    path = tmp / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, run_dir=tmp / "runs", plugins=plugins))
    built, _ = fit(R.load(path))
    return built


def fresh_model(recipe):
    info = build_datamodule(recipe.data.name, recipe.data.config, recipe.seed).info
    return build_model(recipe.model.name, recipe.model.config, info), info


@pytest.fixture(scope="module")
def reweighted(tmp_path_factory):
    """A 4-step run with loss-reweighting, and its export folder."""
    tmp = tmp_path_factory.mktemp("share")
    built = fit_tiny(tmp, "reweighted", "[{name: loss-reweighting, burnin_steps: 0}]")
    assert cli.main(["export", str(built.run_dir)]) == 0
    return built, built.run_dir / "export"


def test_export_writes_the_four_files_of_a_model_repository(reweighted):
    built, out = reweighted
    assert {p.name for p in out.iterdir()} == FILES
    assert json.loads((out / "metrics.json").read_text()) == json.loads(
        (built.run_dir / "metrics.json").read_text()
    )
    raw = R.load_raw(out / "recipe.yaml")
    assert raw["plugin_versions"] == {"loss-reweighting": "paperhooks-loss-reweighting==0.1.0"}
    assert raw["plugins"] == [{"name": "loss-reweighting", "burnin_steps": 0}]
    assert "run_dir" not in raw  # a local path means nothing on the Hub


def test_exported_weights_give_the_trained_model_outputs_in_a_fresh_model(reweighted):
    built, out = reweighted
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == set(built.module.model.state_dict())  # no "model." prefix
    model, info = fresh_model(built.recipe)
    model.load_state_dict(tensors)
    x = torch.randn(8, *info.input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), built.module.model.eval()(x))


def test_model_card_has_front_matter_plugins_metrics_and_the_papers_bibtex(reweighted):
    from huggingface_hub import ModelCard

    from paperhooks_loss_reweighting import LossReweighting

    built, out = reweighted
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "paperhooks"
    assert {"paperhooks", "sample-weighting", "loss-reweighting"} <= set(card.data.tags)
    metrics = json.loads((out / "metrics.json").read_text())
    assert card.data.metrics == sorted(metrics)
    text = card.text
    assert (
        "| `loss-reweighting` | sample-weighting | `paperhooks-loss-reweighting==0.1.0` |" in text
    )
    assert "https://arxiv.org/abs/2502.06733" in text
    assert LossReweighting.paper.bibtex.strip() in text
    assert f"| `val/acc` | {metrics['val/acc']:.4f} |" in text
    assert "burnin_steps: 0" in text  # the recipe


def test_load_model_builds_the_exported_model(reweighted):
    from paperhooks.share import load_model

    built, out = reweighted
    model = load_model(out)
    for k, v in built.module.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_export_folds_pruning_masks_into_the_plain_weights(tmp_path, test_plugins):
    built = fit_tiny(tmp_path, "pruned", "[{name: step-pruning, final: 0.5, every: 2}]")
    out = tmp_path / "exported"
    assert cli.main(["export", str(built.run_dir), "--out", str(out)]) == 0
    ckpt = torch.load(built.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    original = ckpt["model.1.parametrizations.weight.original"]
    mask = ckpt["model.1.parametrizations.weight.0.mask"]
    assert 0 < int((~mask).sum()) < mask.numel()  # the run pruned something, not everything

    tensors = load_file(out / "model.safetensors")
    model, info = fresh_model(built.recipe)
    assert set(tensors) == set(model.state_dict())  # plain names: no parametrizations left
    assert torch.equal(tensors["1.weight"], original * mask)
    model.load_state_dict(tensors)
    x = torch.randn(8, *info.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(x), built.module.model.eval()(x))


STAGES = """\
stages:
  - {{name: prune, plugins: [{{name: one-shot-pruning, sparsity: 0.5, step: 2}}]}}
  - {{name: {last}, {body}}}
"""


def write_staged(tmp: Path, last: str, body: str) -> Path:
    path = tmp / "staged.yaml"
    head = RECIPE.format(name="staged", run_dir=tmp / "runs", plugins="[]")
    path.write_text(head + STAGES.format(last=last, body=body))
    return path


def _exported(run: Path, out: Path) -> dict[str, torch.Tensor]:
    assert cli.main(["export", str(run), "--out", str(out)]) == 0
    return load_file(out / "model.safetensors")


def test_a_staged_run_exports_what_its_last_stage_passed_on(tmp_path):
    """The last stage's final checkpoint; its recipe has no pruning plugin, so the masks it
    carried are put back from the checkpoint. Each stage's directory exports its own end."""
    from huggingface_hub import ModelCard

    path = write_staged(tmp_path, "retrain", "plugins: []")
    built, _ = fit(R.load(path))
    run = built.run_dir
    tensors = _exported(run, tmp_path / "out")
    ckpt = torch.load(run / "stages/1-retrain/checkpoints/last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    mask = sd["model.1.parametrizations.weight.0.mask"]
    assert torch.equal(tensors["1.weight"], sd["model.1.parametrizations.weight.original"] * mask)
    assert int((~mask).sum()) > 0 and bool((tensors["1.weight"][~mask] == 0).all())
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "| `one-shot-pruning` | pruning | `paperhooks==" in card.text  # a stage's plugin
    first = _exported(run / "stages" / "0-prune", tmp_path / "first")
    first_sd = torch.load(run / "stages/0-prune/checkpoints/last.ckpt", weights_only=True)
    w = first_sd["state_dict"]["model.1.parametrizations.weight.original"]
    assert torch.equal(
        first["1.weight"], w * first_sd["state_dict"]["model.1.parametrizations.weight.0.mask"]
    )
    assert not torch.equal(first["1.weight"], tensors["1.weight"])  # retraining moved it

    (run / "stages.json").write_text(json.dumps(json.loads((run / "stages.json").read_text())[:1]))
    from paperhooks.share import ShareError, export

    with pytest.raises(ShareError, match="has not finished its stages .last finished: prune"):
        export(run, tmp_path / "unfinished")


def test_a_soup_stage_exports_its_soup(tmp_path):
    # the stage prunes further at its step 0 (identical masks in both ingredients, as SMS does):
    # the export loads the soup as a stage is started, before the pruning set-up
    body = (
        "plugins: [{name: one-shot-pruning, sparsity: 0.7, step: 0}], "
        "ingredients: [{seed: 1}, {seed: 2}], soup: {method: uniform, recalibrate_bn: false}"
    )
    path = write_staged(tmp_path, "soup", body)
    built, _ = fit(R.load(path))
    stage = built.run_dir / "stages" / "1-soup"
    soup = torch.load(stage / "soup_weights.pt", weights_only=True)
    masks = torch.load(stage / "soup_masks.pt", weights_only=True)
    tensors = _exported(built.run_dir, tmp_path / "out")
    assert set(tensors) == set(soup) and set(masks) == {"1", "3"}  # plain weights, both masked
    for layer in ("1", "3"):
        w = tensors[f"{layer}.weight"]
        assert torch.equal(w, soup[f"{layer}.weight"]) and bool((w[~masks[layer]] == 0).all())
        effective = [
            sd[f"model.{layer}.parametrizations.weight.original"]
            * sd[f"model.{layer}.parametrizations.weight.0.mask"]
            for sd in (
                torch.load(stage / f"ingredient-{j}/checkpoints/last.ckpt", weights_only=True)[
                    "state_dict"
                ]
                for j in (0, 1)
            )
        ]
        assert torch.allclose(w, (effective[0] + effective[1]) / 2)  # the uniform soup


RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipes_module_rebuilds_outside_a_fit_as_export_does(path):
    """``export`` rebuilds the run's module from its recipe, with no Trainer and no data
    attached (kernel-balancing's set-up refused that), then merges every parametrization:
    the result must have the names and shapes of a freshly built model, which is what
    ``load_model`` loads the export into."""
    from paperhooks.reparam import merge
    from paperhooks.share import _build_module

    recipe = R.load(path)
    for _, fit_recipe in recipe.stages or (("", recipe),):
        for r in (fit_recipe, *fit_recipe.ingredients):
            module = _build_module(r)
            merged = merge(module.model, module.plugins).state_dict()
            fresh = fresh_model(r)[0].state_dict()
            assert {k: v.shape for k, v in merged.items()} == {
                k: v.shape for k, v in fresh.items()
            }, r.name


def test_export_of_a_folder_without_a_run_is_an_error(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path)]) == 2
    assert "has no recipe.yaml" in capsys.readouterr().err


# -- push, against a local stand-in for the Hub ----------------------------------------------------
class FakeHub(ThreadingHTTPServer):
    """The endpoints ``create_repo`` + ``upload_folder`` call, on 127.0.0.1. Every file is
    declared a regular (non-LFS, non-Xet) upload, so its content arrives in the commit."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), FakeHubHandler)
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.repos: dict[str, dict] = {}  # repo id -> create payload
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.commits: list[dict] = []
        self.read_only: set[str] = set()  # repositories that refuse uploads (403)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class FakeHubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub = self.server
        hub.requests.append(
            ("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        )
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            if repo in hub.repos:
                return self._reply(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"},
                )
            hub.repos[repo] = payload
            hub.files[repo] = {}
            return self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": "0" * 24})
        if parts == ["api", "validate-yaml"]:
            return self._reply(200, {"errors": [], "warnings": []})
        if (
            len(parts) == 6
            and parts[:2] == ["api", "models"]
            and parts[4] in ("preupload", "commit")
        ):
            repo = f"{parts[2]}/{parts[3]}"
            if repo not in hub.repos:
                return self._reply(404, {"error": "Repository not found"})
            if repo in hub.read_only:
                return self._reply(
                    403, {"error": "You don't have the rights to push to this repository"}
                )
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._reply(
                    200,
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "regular",
                                "shouldIgnore": False,
                                "oid": None,
                            }
                            for f in files
                        ]
                    },
                )
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            hub.commits.append({"repo": repo, "revision": parts[5], "lines": lines})
            for item in lines:
                if item["key"] == "file":
                    assert item["value"]["encoding"] == "base64"
                    hub.files[repo][item["value"]["path"]] = base64.b64decode(
                        item["value"]["content"]
                    )
            oid = f"{len(hub.commits):040x}"
            return self._reply(
                200,
                {
                    "commitUrl": f"{hub.url}/{repo}/commit/{oid}",
                    "commitOid": oid,
                    "pullRequestUrl": None,
                },
            )
        return self._reply(404, {"error": f"the fake Hub has no endpoint POST {self.path}"})

    def do_GET(self) -> None:
        self.server.requests.append(
            ("GET", self.path, {k.lower(): v for k, v in self.headers.items()}, b"")
        )
        self._reply(404, {"error": f"the fake Hub has no endpoint GET {self.path}"})

    do_HEAD = do_GET


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    hub = FakeHub()
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setattr(
        constants, "ENDPOINT", hub.url
    )  # read once, when huggingface_hub is imported
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login is used
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        yield hub
    finally:
        hub.shutdown()
        hub.server_close()
        thread.join(timeout=5)


def test_push_creates_the_repository_and_uploads_the_export(reweighted, fake_hub, capsys):
    built, out = reweighted
    exported_at = (out / "model.safetensors").stat().st_mtime_ns
    args = [
        "push",
        str(built.run_dir),
        "someone/tiny-reweighted",
        "--private",
        "--token",
        "hf_fake",
    ]
    assert cli.main(args) == 0
    assert f"{fake_hub.url}/someone/tiny-reweighted" in capsys.readouterr().out

    created = fake_hub.repos["someone/tiny-reweighted"]
    assert created["name"] == "tiny-reweighted" and created["organization"] == "someone"
    assert created.get("visibility") == "private" or created.get("private") is True
    posts = [(p, h) for m, p, h, _ in fake_hub.requests if m == "POST"]
    assert all(h.get("authorization") == "Bearer hf_fake" for _, h in posts)
    received = fake_hub.files["someone/tiny-reweighted"]
    assert set(received) == FILES
    for name in FILES:
        assert received[name] == (out / name).read_bytes(), name
    assert (
        out / "model.safetensors"
    ).stat().st_mtime_ns == exported_at  # up to date: not exported again
    assert 'snapshot_download("someone/tiny-reweighted")' in received["README.md"].decode()
    known = ("/api/repos/create", "/api/validate-yaml", "/api/models/someone/tiny-reweighted/")
    assert [p for p, _ in posts if not p.startswith(known)] == []
    # huggingface_hub's best-effort agent detection reads this registry (a 404 is ignored)
    assert {p for m, p, _, _ in fake_hub.requests if m != "POST"} <= {"/api/agent-harnesses"}

    # Pushing again: the repository exists (409, exist_ok) and a second commit lands.
    assert cli.main(args) == 0
    assert len(fake_hub.commits) == 2


def test_push_reports_hub_errors(reweighted, fake_hub, capsys):
    built, _ = reweighted
    fake_hub.read_only.add("someone/read-only")
    assert cli.main(["push", str(built.run_dir), "someone/read-only", "--token", "hf_fake"]) == 2
    err = capsys.readouterr().err
    assert "cannot push" in err and "someone/read-only" in err and "403" in err


# -- the download side -------------------------------------------------------------------------
def test_fit_a_recipe_from_the_hub_cache(tmp_path, monkeypatch):
    """``paperhooks fit hf://owner/repo/path.yaml`` trains from a prepared offline Hub cache."""
    from huggingface_hub import constants as C

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (snap / "recipe.yaml").write_text(
        RECIPE.format(name="from-hub", run_dir=tmp_path / "runs", plugins="[]")
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    assert cli.main(["fit", "hf://someone/tiny/recipe.yaml", "trainer.max_steps=2"]) == 0
    run = tmp_path / "runs" / "from-hub" / "version_0"
    assert "train/loss" in json.loads((run / "metrics.json").read_text())
    assert R.load_raw(run / "recipe.yaml")["trainer"]["max_steps"] == 2
