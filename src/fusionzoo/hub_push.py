"""Publish a trained model on the Hugging Face Hub: the folder ``from_pretrained`` reads, plus a model card.

>>> import fusionzoo as fz
>>> url = fz.push_to_hub("runs/esanet_resnet18-synthetic_rgbd-all-20261207-120000", "me/esanet-synthetic")
>>> model = fz.from_pretrained("me/esanet-synthetic")          # anyone, anywhere

What is uploaded (:func:`write_hub_folder` writes it; ``fusionzoo push --out DIR`` stops there):

- ``config.json`` + ``model.safetensors``: written by :func:`fusionzoo.hub.save_pretrained` from the
  model as :func:`fusionzoo.hub.from_pretrained` rebuilt it, so the upload is proven to load with
  this fusionzoo (a corrupt or unregistered checkpoint is refused before anything is sent), and
  the sha256 manifest travels with it;
- ``README.md``: a model card with YAML front matter (``library_name: fusionzoo``, tags, datasets,
  metrics and a ``model-index`` entry for the headline score, as huggingface_hub's ``ModelCard``
  writes it), how to load and call the model, its classes and input statistics, and for a run
  folder the training recipe (the run's ``config.json``), the scores (``summary.json``, else the
  best epoch of ``metrics.jsonl``) and the interpretability report's plots;
- ``report/*.png``: those plots, when the run has a report (``train.py --report`` or
  ``fusionzoo interpret RUN --out RUN/report``).

The upload goes through ``huggingface_hub.HfApi``: ``create_repo(exist_ok=True)``, then
``upload_folder`` (one commit; report plots of an earlier push that this one lacks are deleted). This module reads run folders as files through
:mod:`fusionzoo.interpret.runs` and sits beside ``interpret``, above the models layer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn

from . import __version__, _registry
from .hub import CONFIG_NAME, FORMAT, WEIGHTS_NAME, from_pretrained, save_pretrained
from .interpret.runs import WEIGHT_DIRS, find_weights, is_pretrained_dir, log_records, run_config
from .weights import unwrap_model

__all__ = ["CARD_NAME", "REPORT_DIR", "check_repo_id", "push_to_hub", "write_hub_folder"]

CARD_NAME = "README.md"
REPORT_DIR = "report"
# Keys of a run's config.json that describe the machine it ran on, not the recipe: left out of the card.
LOCAL_KEYS = ("out_dir", "run_name", "resume", "data_root")
# Our metric names -> the Hub's metric ids (huggingface/evaluate), for the card's front matter.
HUB_METRICS = {"miou": "mean_iou", "ap": "map"}
HUB_PIPELINES = {"segmentation": "image-segmentation", "detection": "object-detection"}
TASK_TAGS = {"segmentation": "semantic-segmentation", "detection": "object-detection"}


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model id ``owner/name`` (what :func:`from_pretrained` resolves).

    Raises:
        ValueError: one line naming the id and the expected form.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo id {repo_id!r} is not of the form 'owner/name' (e.g. 'me/esanet-nyuv2'), which "
                         "fusionzoo.from_pretrained resolves")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"repo id {repo_id!r} is not a valid Hub id: {' '.join(str(e).split())}") from None
    return repo_id


def push_to_hub(
    model_or_run: nn.Module | str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> str:
    """Upload a model, with a model card, to the Hugging Face Hub in one commit.

    Args:
        model_or_run: a training run folder (``train.py``'s ``runs/<run>``: its ``best/`` weights,
            recipe, scores and report plots), a folder written by ``save_pretrained`` (inside a run
            folder, e.g. ``runs/<run>/best``, the card also covers that run), or a model built by
            ``fusionzoo.create_model`` / ``from_pretrained`` (the card then says what its config says).
        repo_id: ``owner/name``; created if it does not exist.
        private: create the repository private (default: the Hub's default for the owner, public
            unless an organization defaults to private); an existing repository keeps its visibility.
        token: Hub token (default: huggingface_hub's, from ``HF_TOKEN`` or ``hf auth login``).
        commit_message: default ``"Upload <model> with fusionzoo <version>"``.
        revision: branch to commit to (created from main when missing; default main).

    Returns:
        The URL of the commit.

    Raises:
        ValueError: ``repo_id`` is not ``owner/name``.
        FileNotFoundError: the folder does not exist, is not a run or model folder, or the run has no weights.
        CheckpointError: the weights are corrupt or do not fit their config (nothing is uploaded).
        huggingface_hub.errors.HfHubHTTPError: the Hub refused (no or wrong token, no write access).

    Example:
        >>> push_to_hub("runs/cmx_resnet50-nyuv2-all-20261207-120000", "me/cmx-nyuv2", private=True)
        'https://huggingface.co/me/cmx-nyuv2/commit/...'
    """
    check_repo_id(repo_id)
    with tempfile.TemporaryDirectory(prefix="fusionzoo-push-") as tmp:
        folder = write_hub_folder(model_or_run, tmp, repo_id=repo_id)
        name = json.loads((folder / CONFIG_NAME).read_text())["model"]["name"]
        api = HfApi(token=token)
        # False -> None: a new repository gets the Hub's default (public, unless the owner
        # organization defaults to private) instead of being forced public.
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id, folder_path=folder, revision=revision,
            commit_message=commit_message or f"Upload {name} with fusionzoo {__version__}",
            # plots of an earlier push that this one does not have would outlive the card that showed them
            delete_patterns=[f"{REPORT_DIR}/*.png"],
        )
    return str(info.commit_url)


def write_hub_folder(model_or_run: nn.Module | str | os.PathLike, out_dir: str | os.PathLike,
                     repo_id: str | None = None) -> Path:
    """Write what :func:`push_to_hub` uploads into ``out_dir``: ``config.json``, ``model.safetensors``,
    ``README.md`` and, for a run with a report, ``report/*.png``.

    Args:
        model_or_run: as :func:`push_to_hub`.
        out_dir: a new or empty folder (a non-empty one would mix older files into the upload).
        repo_id: shown in the card's loading example (default ``"<owner>/<name>"``).

    Returns:
        ``out_dir``.

    Raises:
        FileExistsError: ``out_dir`` is not empty.
        FileNotFoundError, CheckpointError: as :func:`push_to_hub`.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; give a new folder to write the upload into")
    run_dir: Path | None = None
    if isinstance(model_or_run, nn.Module):
        model = unwrap_model(model_or_run)
        saved = getattr(model, "pretrained_cfg", None)
        saved = saved if isinstance(saved, Mapping) and saved.get("format") == FORMAT else {}
    else:
        weights_dir, run_dir = _locate(Path(model_or_run))
        model = from_pretrained(weights_dir)  # checks the sha256 manifest and that the weights fit
        saved = model.pretrained_cfg
    save_pretrained(model, out, class_names=saved.get("class_names"), normalization=saved.get("normalization"),
                    extra=saved.get("extra"))
    config = json.loads((out / CONFIG_NAME).read_text())
    images = _copy_report_images(run_dir, out) if run_dir is not None else []
    card = model_card(config, repo_id or "<owner>/<name>", run_dir, images)
    card.save(out / CARD_NAME)
    return out


def _locate(path: Path) -> tuple[Path, Path | None]:
    """``(weights folder, run folder or None)`` of a run folder or a ``save_pretrained`` folder."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected a run folder written by train.py or a folder "
                                "written by save_pretrained)")
    if is_pretrained_dir(path):
        # runs/<run>/best: the card covers the run. Only a training config that names this model
        # counts, not any config.json that happens to sit in the folder above.
        saved = (_read_json(path / CONFIG_NAME) or {}).get("model") or {}
        parent = run_config(path.parent) or {}
        in_run = path.name in WEIGHT_DIRS and parent.get("model") == saved.get("name")
        return path, (path.parent if in_run else None)
    if run_config(path) is None:
        raise FileNotFoundError(f"{path} is neither a run folder (config.json written by train.py) nor a "
                                f"save_pretrained folder ({CONFIG_NAME} with \"format\": \"{FORMAT}\" + {WEIGHTS_NAME})")
    try:
        return find_weights(path), path
    except FileNotFoundError as e:
        raise FileNotFoundError(f"nothing to push: {e}") from None


def _copy_report_images(run_dir: Path, out: Path) -> list[str]:
    """Copy ``<run>/report/*.png`` to ``out/report/``; their paths relative to ``out``, sorted."""
    found = sorted((run_dir / REPORT_DIR).glob("*.png"))
    if found:
        (out / REPORT_DIR).mkdir(exist_ok=True)
    for png in found:
        shutil.copyfile(png, out / REPORT_DIR / png.name)
    return [f"{REPORT_DIR}/{png.name}" for png in found]


# -- the model card ------------------------------------------------------------------------------
def read_scores(run_dir: Path) -> dict[str, Any]:
    """A run's scores: ``summary.json`` when the run finished, plus the ``epoch`` records of
    ``metrics.jsonl`` (every epoch's validation scalars).

    Returns:
        ``{"summary": dict | None, "epochs": [record, ...], "metric": "miou" | "ap" | None,
        "best": {"value", "epoch"} | None}``; ``best`` is the summary's, else the best epoch's.
    """
    summary = _read_json(run_dir / "summary.json")
    epochs = log_records(run_dir, ("epoch",)).get("epoch", [])
    metric = (summary or {}).get("metric") or next(
        (m for m in HUB_METRICS if any(f"val_{m}" in r for r in epochs)), None)
    best = None
    if summary is not None and isinstance(summary.get("best_value"), (int, float)):
        best = {"value": summary["best_value"], "epoch": summary.get("best_epoch")}
    elif metric is not None:
        scored = [r for r in epochs if _finite(r.get(f"val_{metric}"))]
        if scored:
            top = max(scored, key=lambda r: r[f"val_{metric}"])
            best = {"value": top[f"val_{metric}"], "epoch": top.get("epoch")}
    return {"summary": summary, "epochs": epochs, "metric": metric, "best": best}


def model_card(config: Mapping[str, Any], repo_id: str, run_dir: Path | None = None,
               images: list[str] | tuple[str, ...] = ()) -> ModelCard:
    """The card of a model folder (``config`` = its ``config.json``), and of its run when given.

    Front matter: ``library_name: fusionzoo``, ``pipeline_tag``, tags (task, fusion family, the
    method, ``rgb-d`` / ``rgb-t``), ``datasets``, ``metrics`` and a ``model-index`` result for the
    headline validation score.
    """
    name = config["model"]["name"]
    entry = _registry.model_entry(name)
    mods = list(config["modalities"])
    recipe = run_config(run_dir) if run_dir is not None else None
    scores = read_scores(run_dir) if run_dir is not None else None
    extra = config.get("extra") or {}
    dataset = (recipe or {}).get("dataset") or extra.get("dataset")
    metric = scores["metric"] if scores else next((m for m in HUB_METRICS if f"val_{m}" in extra), None)
    best = scores["best"] if scores else None
    if best is None and metric is not None and _finite(extra.get(f"val_{metric}")):
        best = {"value": extra[f"val_{metric}"], "epoch": extra.get("epoch")}

    tags = ["fusionzoo", TASK_TAGS.get(entry.task, entry.task), f"{entry.fusion}-fusion", entry.method]
    tags += [t for t, m in (("rgb-d", "depth"), ("rgb-d", "hha"), ("rgb-t", "thermal")) if m in mods and t not in tags]
    eval_results = None
    if dataset and metric and best is not None and _finite(best["value"]):
        eval_results = [EvalResult(
            task_type=HUB_PIPELINES.get(entry.task, entry.task), dataset_type=dataset, dataset_name=dataset,
            dataset_split=(recipe or {}).get("val_split"), metric_type=HUB_METRICS.get(metric, metric),
            metric_name=f"val {metric}", metric_value=float(best["value"]))]
    data = ModelCardData(
        library_name="fusionzoo", pipeline_tag=HUB_PIPELINES.get(entry.task), tags=tags,
        datasets=[dataset] if dataset else None, metrics=[HUB_METRICS.get(metric, metric)] if metric else None,
        model_name=repo_id.split("/")[-1] if eval_results else None, eval_results=eval_results,
    )
    body = [f"# {repo_id.split('/')[-1]}", "", _about(name, entry, config, run_dir), "", *_usage(repo_id, config, entry.task)]
    body += _classes_and_inputs(config)
    if scores is not None:
        body += _scores_section(scores, config.get("class_names"))
    elif best is not None:
        body += ["## Scores", "", (f"Validation {metric} {best['value']:.4f} (epoch {_epoch(best['epoch'])}), as "
                                   "recorded in config.json's `extra`."), ""]
    if recipe is not None:
        body += _recipe_section(recipe)
    if images:
        body += ["## Interpretability report", "",
                 ("Plots of `fusionzoo interpret` on the run's validation set (see fusionzoo's docs/interpret.md "
                  "for what each shows and the intervals behind the findings)."), ""]
        body += [f"![{Path(p).stem}]({p})\n" for p in images]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")


def _about(name: str, entry: Any, config: Mapping[str, Any], run_dir: Path | None) -> str:
    kind = "a published entry: the authors' whole network, to the parameter" if entry.published else "a fusionzoo family entry"
    kwargs = {k: v for k, v in config["model"].items() if k not in ("name", "num_classes", "modalities")}
    text = (f"`{name}` ({kind}; {entry.fusion} fusion, {entry.task}) from "
            f"fusionzoo, {config['num_classes']} classes, modalities "
            f"{', '.join(config['modalities'])}.")
    if entry.paper:
        text += f" Paper: {entry.paper}."
    if entry.reference_repo:
        text += f" Reference code: {entry.reference_repo}."
    if kwargs:
        text += f" Built with `{json.dumps(kwargs)}`."
    if run_dir is None:
        text += (" Pushed from a model folder or object: no training run came with it (no recipe, training log "
                 "or report).")
    return text


def _usage(repo_id: str, config: Mapping[str, Any], task: str) -> list[str]:
    inputs = ", ".join(f'"{m}": {m}' for m in config["modalities"])
    out = ("logits = model({" + inputs + "})   # (B, K, H, W) at the input size" if task == "segmentation"
           else "detections = model({" + inputs + "})   # per image: boxes (xyxy), scores, labels")
    return ["## Use", "", "```python", "import fusionzoo as fz", f'model = fz.from_pretrained("{repo_id}")',
            out, "```", "",
            ("Each input is a float tensor `(B, C, H, W)`, normalized as in training (Inputs below, when recorded); "
             "`config.json` holds them (`model.pretrained_cfg`), with the class names and the sha256 of the weights, "
             "checked on load. A modality can be left out with "
             f"`model(inputs, missing=(\"{config['modalities'][-1]}\",))`."), ""]


def _classes_and_inputs(config: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    norm = config.get("normalization")
    if norm:
        lines += ["## Inputs", "", "| modality | mean | std |", "|---|---|---|"]
        lines += [f"| {m} | {_nums(s.get('mean'))} | {_nums(s.get('std'))} |" for m, s in norm.items()]
        lines.append("")
    names = config.get("class_names")
    if names:
        lines += ["## Classes", "", ", ".join(f"{i} `{c}`" for i, c in enumerate(names)), ""]
    return lines


def _scores_section(scores: Mapping[str, Any], class_names: list[str] | None) -> list[str]:
    summary, epochs, metric, best = scores["summary"], scores["epochs"], scores["metric"], scores["best"]
    lines = ["## Scores", ""]
    if best is not None:
        source = "summary.json" if summary is not None else "metrics.jsonl (the run has no summary.json)"
        lines += [f"Best validation {metric}: **{best['value']:.4f}** at epoch {_epoch(best['epoch'])} ({source}).", ""]
    per_class = (summary or {}).get("best_val_iou")
    if per_class and class_names and len(per_class) == len(class_names):
        lines += ["| class | IoU (best epoch) |", "|---|---|"]
        lines += [f"| {c} | {_num(v)} |" for c, v in zip(class_names, per_class)]
        lines.append("")
    finals = {k: v for k, v in (summary or {}).items() if isinstance(v, dict) and (k.startswith("missing_") or k == "tta")}
    if finals:
        cols = sorted({k for v in finals.values() for k in v if k != "iou"})
        lines += ["Final weights under a missing modality / test-time augmentation:", "",
                  "| evaluation | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(_num(v.get(c)) for c in cols) + " |" for k, v in finals.items()]
        lines.append("")
    if epochs:
        cols = [k for k in dict.fromkeys(k for r in epochs for k in r)
                if k == "train_loss" or (k.startswith("val_") and isinstance(epochs[0].get(k), (int, float))
                                         and k != "val_pixels")]
        lines += ["Every epoch (metrics.jsonl):", "", "| epoch | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {_epoch(r.get('epoch'))} | " + " | ".join(_num(r.get(c)) for c in cols) + " |" for r in epochs]
        lines.append("")
    return lines


def _recipe_section(recipe: Mapping[str, Any]) -> list[str]:
    kept = {k: v for k, v in recipe.items() if not k.startswith("_") and k not in LOCAL_KEYS}
    return ["## Training recipe", "",
            "The run's resolved `config.json` (machine-specific keys " + ", ".join(f"`{k}`" for k in LOCAL_KEYS)
            + " left out). Saved as `recipe.yaml`, it trains the model again: `python train.py --config recipe.yaml` "
            "(add `--data-root DIR` for a benchmark dataset).", "",
            "```yaml", yaml.safe_dump(kept, sort_keys=False, default_flow_style=None, width=100).rstrip(), "```", ""]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x: Any) -> str:
    return f"{x:.4f}" if _finite(x) else ("" if x is None else str(x))


def _nums(xs: Any) -> str:
    return ", ".join(_num(x) for x in xs) if isinstance(xs, list) else _num(xs)


def _epoch(e: Any) -> str:
    """Records count epochs from 0; the training log prints them from 1."""
    return str(e + 1) if isinstance(e, int) else "?"
