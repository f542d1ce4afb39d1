"""fz.push_to_hub / ``fusionzoo push``: the uploaded folder is what from_pretrained reads, plus a model card.

No test touches the network. :class:`FakeHub` replaces ``HfApi.create_repo``, ``create_branch`` and
``upload_folder`` (same keyword signatures, so a wrong call fails as it would against the Hub) and
lays every uploaded folder out as huggingface-hub's cache holds a downloaded snapshot; loading
``"owner/name"`` then goes through ``hf_hub_download`` in offline mode (``HF_HUB_OFFLINE``), the
way a user on another machine gets it once downloaded. :class:`HttpHub` stands in one level lower,
for the Hub's HTTP endpoints (huggingface_hub's client factory with an ``httpx2.MockTransport``):
the real ``create_repo`` and ``upload_folder`` run, LFS included. The run is a real ``train.py``
run (3 s).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import huggingface_hub.constants as hf_constants
import pytest
import torch
import yaml
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from huggingface_hub.utils._http import default_client_factory
from PIL import Image
from process_helpers import train_script

import fusionzoo as fz
from fusionzoo.cli import main
from fusionzoo.engine.config import config_from_dict
from fusionzoo.hub import from_pretrained
from fusionzoo.hub_push import push_to_hub, write_hub_folder
from fusionzoo.weights import CheckpointError

NAME = "early_concat_resnet18"  # smallest registered model: one ResNet-18
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished train.py run (2 epochs on 8 synthetic images) with two report plots."""
    out = tmp_path_factory.mktemp("runs")
    train = train_script()
    train.main(["--model", NAME, "--image-size", "32,32", "--train-samples", "8", "--val-samples", "4",
                "--batch-size", "4", "--epochs", "2", "--threads", "1", "--no-progress", "--no-report",
                "--out-dir", str(out), "--run-name", "run"])
    run = out / "run"
    (run / "report").mkdir()
    for i, name in enumerate(("contribution.png", "cka_stages.png")):
        Image.new("RGB", (8, 6), (40 * i, 90, 200)).save(run / "report" / name)
    return run


class FakeHub:
    """Stands in for the Hub: records calls; an uploaded folder becomes a cached snapshot."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.uploads: list[Path] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, *, token=None, private=None, visibility=None, repo_type=None,
                        exist_ok=False, **kwargs):
            hub.calls.append(("create_repo", {"repo_id": repo_id, "private": private, "exist_ok": exist_ok,
                                              "token": self.token}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False):
            hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok}))

        def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None,
                          commit_description=None, token=None, repo_type=None, revision=None, create_pr=None,
                          parent_commit=None, allow_patterns=None, ignore_patterns=None, delete_patterns=None,
                          run_as_future=False):
            hub.calls.append(("upload_folder", {"repo_id": repo_id, "commit_message": commit_message,
                                                "revision": revision}))
            commit = hashlib.sha1(f"{repo_id}{len(hub.uploads)}".encode()).hexdigest()
            repo = hub.cache / f"models--{repo_id.replace('/', '--')}"
            snap = repo / "snapshots" / commit
            shutil.copytree(folder_path, snap)  # the temporary folder is gone after push_to_hub returns
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / (revision or "main")).write_text(commit)
            hub.uploads.append(snap)
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{commit}",
                              commit_message=commit_message, commit_description="", oid=commit)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self

    def names(self, i: int = -1) -> list[str]:
        root = self.uploads[i]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    return FakeHub(tmp_path / "hub-cache").install(monkeypatch)


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _card(folder: Path) -> tuple[ModelCard, str]:
    card = ModelCard.load(folder / "README.md")  # parses the YAML front matter as the Hub does
    return card, card.text


def test_push_run_uploads_what_from_pretrained_reads(run_dir, hub, monkeypatch):
    url = push_to_hub(run_dir, "someone/tiny-fusion", private=True, token="hf_test")
    commit = hub.uploads[0].name
    assert url == f"https://huggingface.co/someone/tiny-fusion/commit/{commit}"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][1] == {"repo_id": "someone/tiny-fusion", "private": True, "exist_ok": True, "token": "hf_test"}
    assert hub.calls[1][1]["commit_message"] == f"Upload {NAME} with fusionzoo {fz.__version__}"
    assert hub.names() == ["README.md", "config.json", "model.safetensors", "report/cka_stages.png",
                           "report/contribution.png"]

    # Another machine, offline, with the snapshot in its cache: the hub id loads the run's best weights.
    _offline(monkeypatch)
    best = from_pretrained(run_dir / "best")
    loaded = fz.from_pretrained("someone/tiny-fusion", cache_dir=hub.cache)
    _same_weights(best, loaded)
    x = {"rgb": torch.randn(1, 3, 32, 32), "depth": torch.randn(1, 1, 32, 32)}
    with torch.no_grad():
        assert torch.equal(best(x), loaded(x))
    assert loaded.pretrained_cfg["class_names"] == best.pretrained_cfg["class_names"]
    assert loaded.pretrained_cfg["normalization"] == best.pretrained_cfg["normalization"]
    for png in ("contribution.png", "cka_stages.png"):
        assert (hub.uploads[0] / "report" / png).read_bytes() == (run_dir / "report" / png).read_bytes()


def test_card_of_a_run(run_dir, hub):
    push_to_hub(run_dir, "someone/tiny-fusion")
    card, text = _card(hub.uploads[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    data = card.data
    assert data.library_name == "fusionzoo" and data.pipeline_tag == "image-segmentation"
    assert {"fusionzoo", "semantic-segmentation", "early-fusion", "rgb-d"} <= set(data.tags)
    assert data.datasets == ["synthetic_rgbd"] and data.metrics == ["mean_iou"]
    (result,) = data.eval_results
    assert result.metric_type == "mean_iou" and result.dataset_split == "val"
    assert result.metric_value == pytest.approx(summary["best_value"], rel=1e-12)
    # loading example, scores, per-class table, images
    assert 'fz.from_pretrained("someone/tiny-fusion")' in text
    assert f"**{summary['best_value']:.4f}** at epoch {summary['best_epoch'] + 1} (summary.json)" in text
    for name, iou in zip(summary["class_names"], summary["best_val_iou"]):
        assert f"| {name} | {iou:.4f} |" in text
    assert "![contribution](report/contribution.png)" in text
    # the recipe block retrains: it parses into the run's training config
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1))
    run_cfg = json.loads((run_dir / "config.json").read_text())
    cfg = config_from_dict(recipe, None, where="card recipe")
    assert cfg.model == NAME and cfg.epochs == run_cfg["epochs"] and cfg.train_samples == 8
    assert "out_dir" not in recipe and "run_name" not in recipe


def test_card_without_summary_reads_metrics_jsonl(run_dir, tmp_path):
    run = tmp_path / "killed"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "report"))
    (run / "summary.json").unlink()  # a run killed before its summary
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line).get("kind") == "epoch"]
    best = max(epochs, key=lambda r: r["val_miou"])
    out = write_hub_folder(run, tmp_path / "out", repo_id="a/b")
    card, text = _card(out)
    assert f"**{best['val_miou']:.4f}** at epoch {best['epoch'] + 1} (metrics.jsonl" in text
    assert card.data.eval_results[0].metric_value == pytest.approx(best["val_miou"], rel=1e-12)
    assert not (out / "report").exists() and "Interpretability report" not in text


def test_push_model_object_and_plain_folder(hub, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = fz.create_model(NAME, num_classes=3, modalities=("rgb", "thermal")).eval()
    push_to_hub(model, "someone/untrained", revision="v1")
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[0][1]["private"] is None  # the Hub's default visibility, not forced public
    assert hub.calls[1][1] == {"repo_id": "someone/untrained", "branch": "v1", "exist_ok": True}
    assert hub.calls[2][1]["revision"] == "v1"
    assert hub.names(0) == ["README.md", "config.json", "model.safetensors"]
    card, text = _card(hub.uploads[0])
    assert "rgb-t" in card.data.tags and card.data.datasets is None and card.data.eval_results is None
    assert "no training run" in text and "## Training recipe" not in text and "## Scores" not in text
    _offline(monkeypatch)
    _same_weights(model, fz.from_pretrained("someone/untrained", cache_dir=hub.cache, revision="v1"))

    # a save_pretrained folder outside a run: the card has what its config.json records
    folder = model.save_pretrained(tmp_path / "saved", class_names=["x", "y", "z"],
                                   extra={"val_miou": 0.625, "epoch": 4, "dataset": "mfnet"})
    out = write_hub_folder(folder, tmp_path / "out")
    card, text = _card(out)
    assert card.data.datasets == ["mfnet"] and card.data.eval_results[0].metric_value == 0.625
    assert "Validation miou 0.6250 (epoch 5)" in text and "0 `x`, 1 `y`, 2 `z`" in text
    assert json.loads((out / "config.json").read_text())["class_names"] == ["x", "y", "z"]


def test_best_folder_of_a_run_gets_the_run_card(run_dir, tmp_path):
    out = write_hub_folder(run_dir / "best", tmp_path / "out")
    _, text = _card(out)
    assert "(summary.json)" in text and "## Training recipe" in text and (out / "report" / "contribution.png").is_file()
    # a model folder beside an unrelated config.json (a project root) is not a run
    project = tmp_path / "project"
    shutil.copytree(run_dir / "best", project / "best")
    (project / "config.json").write_text(json.dumps({"model": "bert-base", "lr": 1}))
    _, text = _card(write_hub_folder(project / "best", tmp_path / "out2"))
    assert "no training run" in text and "bert-base" not in text and "## Training recipe" not in text


def test_errors_upload_nothing(run_dir, hub, tmp_path):
    empty = tmp_path / "no-weights"
    shutil.copytree(run_dir, empty, ignore=shutil.ignore_patterns("best", "checkpoints"))
    with pytest.raises(FileNotFoundError, match="nothing to push: .*no trained weights found"):
        push_to_hub(empty, "someone/x")
    for bad in ("no-owner", "a/b/c", "someone/bad name!"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))) as e:
            push_to_hub(run_dir, bad)
        assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        push_to_hub(tmp_path, "someone/x")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir / "best", corrupt)
    data = bytearray((corrupt / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (corrupt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        push_to_hub(corrupt, "someone/x")
    assert hub.calls == []


def test_cli_push(run_dir, hub, tmp_path, capsys, monkeypatch):
    assert main(["push", str(run_dir), "someone/cli-run", "--private", "--message", "first"]) == 0
    out = capsys.readouterr().out
    assert hub.uploads[0].name in out and "from_pretrained('someone/cli-run')" in out
    assert hub.calls[0][1]["private"] is True and hub.calls[1][1]["commit_message"] == "first"

    assert main(["push", str(run_dir), "someone/cli-run", "--out", str(tmp_path / "look")]) == 0
    assert "nothing uploaded" in capsys.readouterr().out and len(hub.uploads) == 1
    assert sorted(p.name for p in (tmp_path / "look").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                     "report"]
    assert main(["push", str(run_dir), "someone/cli-run", "--out", str(tmp_path / "look")]) == 2
    assert "not an empty folder" in capsys.readouterr().err

    empty = tmp_path / "no-weights"
    shutil.copytree(run_dir, empty, ignore=shutil.ignore_patterns("best", "checkpoints"))
    for argv, needle in (([str(empty), "someone/x"], "no trained weights"),
                         ([str(run_dir), "bad/repo/id"], "'owner/name'"),
                         ([str(tmp_path / "missing"), "someone/x"], "no such folder")):
        assert main(["push", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fusionzoo: error: push:") and needle in err and err.count("\n") == 1
    assert len(hub.uploads) == 1


def test_cli_push_offline_is_one_line(run_dir, monkeypatch, capsys):
    """The real HfApi (no stand-in) in huggingface-hub's offline mode: refused before any request."""
    _offline(monkeypatch)
    assert main(["push", str(run_dir), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert "offline mode" in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1


class HttpHub:
    """The Hub's HTTP endpoints that ``create_repo`` and ``upload_folder`` call (huggingface_hub's
    single-commit path: preupload, LFS batch + PUT for binary files, NDJSON commit), keeping what
    they receive: ``repos`` (create bodies), ``trees`` (path -> bytes per committed repo)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.trees: dict[str, dict[str, bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.readmes: list[str] = []

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        method, path = request.method, request.url.path
        if method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            self.repos[f"{body['organization']}/{body['name']}"] = body
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{body['organization']}/{body['name']}"})
        if method == "GET" and path.startswith("/api/models/") and "/tree/" in path:
            repo_id = path[len("/api/models/"):].split("/tree/")[0]
            return httpx2.Response(200, json=[  # oid: the git blob id
                {"type": "file", "path": p, "size": len(d), "oid": hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest()}
                for p, d in self.trees.get(repo_id, {}).items()])
        if method == "POST" and path == "/api/validate-yaml":
            self.readmes.append(json.loads(request.content)["content"])
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if method == "POST" and "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular" if f["path"].endswith((".md", ".json")) else "lfs",
                 "shouldIgnore": False} for f in files]})
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(200, json={"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"https://huggingface.co/lfs-upload/{o['oid']}"}}} for o in objects]})
        if method == "PUT" and path.startswith("/lfs-upload/"):
            data = bytes(request.content)
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(data).hexdigest() != oid:
                return httpx2.Response(400, json={"error": "sha256 does not match the oid"})
            self.blobs[oid] = data
            return httpx2.Response(200)
        if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
            repo_id = path[len("/api/models/"):].split("/commit/")[0]
            tree = self.trees.setdefault(repo_id, {})
            for line in request.content.decode().splitlines():
                rec = json.loads(line)
                if rec["key"] == "file":
                    tree[rec["value"]["path"]] = base64.b64decode(rec["value"]["content"])
                elif rec["key"] == "lfsFile":
                    tree[rec["value"]["path"]] = self.blobs[rec["value"]["oid"]]
                elif rec["key"] == "deletedFile":
                    del tree[rec["value"]["path"]]
            oid = hashlib.sha1(request.content).hexdigest()
            return httpx2.Response(200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/{oid}",
                                              "commitOid": oid})
        return httpx2.Response(404, json={"error": f"the stand-in Hub has no {method} {path}"})


@pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")  # inside huggingface_hub's LFS upload
def test_push_over_http(run_dir, tmp_path, monkeypatch):
    """The real HfApi against the stand-in HTTP Hub; the committed tree loads from the cache."""
    http = HttpHub()
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # the LFS protocol, not hf_xet's own client
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(http)))
    try:
        url = push_to_hub(run_dir, "someone/over-http", private=True, token="hf_test")
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
    assert http.repos["someone/over-http"]["visibility"] == "private"
    tree = http.trees["someone/over-http"]
    assert url.startswith("https://huggingface.co/someone/over-http/commit/")
    assert sorted(tree) == ["README.md", "config.json", "model.safetensors", "report/cka_stages.png",
                            "report/contribution.png"]
    assert tree["report/contribution.png"] == (run_dir / "report" / "contribution.png").read_bytes()
    assert ModelCard(tree["README.md"].decode()).data.library_name == "fusionzoo"
    assert http.readmes and http.readmes[0] == tree["README.md"].decode()  # the Hub's YAML check saw the card

    snapshot = tmp_path / "cache" / "models--someone--over-http" / "snapshots" / url.rsplit("/", 1)[1]
    for name, data in tree.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_bytes(data)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(snapshot.name)
    _offline(monkeypatch)
    _same_weights(from_pretrained(run_dir / "best"), fz.from_pretrained("someone/over-http", cache_dir=tmp_path / "cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)

    # pushing a model without a report to the same repository removes the earlier plots with their card
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(http)))
    try:
        push_to_hub(fz.create_model(NAME, num_classes=5), "someone/over-http", token="hf_test")
    finally:
        huggingface_hub.set_client_factory(default_client_factory)
    assert sorted(tree) == ["README.md", "config.json", "model.safetensors"]


def test_lazy_export():
    assert fz.push_to_hub is push_to_hub and "push_to_hub" in fz.__all__
    assert huggingface_hub.HfApi is HfApi
