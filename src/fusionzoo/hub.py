"""Save and load trained fusion models: ``config.json`` + ``model.safetensors``, local or on the Hub.

Part of the model layer (docs/design.md, "Layers"): ``FusionModel.save_pretrained`` and
``models/convert.py`` call it, the training engine and ``interpret`` use it; it imports only the
registry, :mod:`fusionzoo.weights` and :mod:`fusionzoo.files`.

Loading never executes code from the checkpoint: ``config.json`` may only *name* a model that is
registered in this installed fusionzoo (``create_model`` rebuilds it from the registry), and
weights come from safetensors (no pickle). A hub id (``owner/name``) is resolved through
huggingface-hub's cache (``hf_hub_download``), so ``HF_HUB_OFFLINE=1`` works whenever the files
were fetched before.

``config.json`` carries a manifest of the weights file, ``"files": {"model.safetensors":
{"bytes": ..., "sha256": ...}}`` (the schema of a training checkpoint's ``state.json``, see
:mod:`fusionzoo.engine.checkpoint`); :func:`from_pretrained` checks it before loading, so a
truncated or bit-flipped file is refused, naming it, instead of loading wrong weights.

Why not huggingface_hub's ``PyTorchModelHubMixin`` (evaluated with huggingface-hub 2.4.0; the
download utility it wraps, ``hf_hub_download``, is what :func:`from_pretrained` uses): the mixin's
``from_pretrained`` is a classmethod that rebuilds the class it is called on from the config's
keys, while ours is one function that reads a registered *name* and asks the registry; keeping
our behaviour means overriding ``from_pretrained``, ``_from_pretrained`` and ``_save_pretrained``,
which leaves nothing of the mixin but ``push_to_hub`` and its model card. Used as is, it breaks:

- ``tests/test_engine_hub.py::test_local_round_trip``: ``save_pretrained`` also writes a
  ``README.md`` model card (the folder must hold exactly ``config.json`` + ``model.safetensors``),
  and loading a local folder prints "Loading weights from local directory" to stdout.
- ``tests/test_engine_hub.py::test_config_can_only_name_registered_models``: the config's keys
  are passed to ``cls.__init__``; no registry lookup, so no ``KeyError`` for an unknown name.
- ``tests/test_silent_data.py::test_bit_flipped_pretrained_weights_are_refused``: no sha256
  manifest; a bit-flipped ``model.safetensors`` loads silently.
- ``tests/test_engine_hub.py::test_corrupt_weights_name_the_file``: a truncated file raises
  safetensors' ``SafetensorError: ... invalid header length`` (no file name), not ``CheckpointError``.
- ``tests/test_engine_hub.py::test_class_count_mismatch_lists_keys``: ``strict=False`` by default
  (missing / unexpected keys ignored); a shape mismatch is torch's ``RuntimeError``, not ``CheckpointError``.
- ``tests/test_engine_hub.py::test_hub_id_resolves_offline_through_the_cache``: an uncached hub
  id offline raises huggingface-hub's ``LocalEntryNotFoundError`` text, not ours ("not in the
  Hugging Face cache ... Download it once online, or pass a local directory").

Not covered by a test, also lost: ``model.save_pretrained(dir, class_names=...)`` (the mixin's
``save_pretrained(save_directory, *, config, repo_id, push_to_hub, ...)`` hands other keywords
to ``push_to_hub``), ``config.json`` written with ``write_text`` (not atomic, after the
weights), a corrupt ``config.json`` raising a bare ``JSONDecodeError``, and a fallback to
``pytorch_model.bin`` through ``torch.load`` (pickle) when a hub repo has no safetensors file.
``python tools/check_hub_mixin.py`` reruns these observations on the installed huggingface-hub.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from torch import nn

from . import _registry
from ._json import to_json
from .files import atomic_write_bytes, sha256_file
from .weights import CheckpointError, load_model_weights, read_json_object, save_tensors, unwrap_model

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "from_pretrained", "read_checked", "save_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "fusionzoo"
FORMAT_VERSION = 1


def save_pretrained(
    model: nn.Module,
    save_directory: str | Path,
    *,
    class_names: Sequence[str] | None = None,
    normalization: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``save_directory``.

    ``config.json`` records the size and sha256 of ``model.safetensors`` (checked by
    :func:`from_pretrained`).

    Args:
        model: a registered fusion model (it must have ``config``, ``num_classes`` and
            ``modalities``); DDP / compiled wrappers are unwrapped.
        class_names: ``K`` names, in class-id order (e.g. ``dataset.classes``).
        normalization: per-modality input statistics, e.g. ``{"rgb": {"mean": [...], "std": [...]}}``.
        extra: more JSON-able facts (training recipe, metrics).

    Returns:
        The directory.

    Raises:
        TypeError: the model has no ``config`` (it was not built by ``fusionzoo.create_model``).
        ValueError: ``class_names`` has the wrong length.
    """
    model = unwrap_model(model)
    cfg = getattr(model, "config", None)
    if not isinstance(cfg, Mapping) or "name" not in cfg:
        raise TypeError(
            f"{type(model).__name__} has no registry config (model.config with a 'name'); "
            "only models built by fusionzoo.create_model can be saved with save_pretrained"
        )
    num_classes = int(model.num_classes)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a model with {num_classes} classes")
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": {k: _config_json(v) for k, v in cfg.items() if k != "pretrained"},
        "num_classes": num_classes,
        "modalities": list(model.modalities),
        "class_names": list(class_names) if class_names is not None else None,
        "normalization": _config_json(dict(normalization)) if normalization is not None else None,
    }
    if extra:
        config["extra"] = _config_json(dict(extra))
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory with a config.json is a complete one.
    save_tensors(model.state_dict(), out / WEIGHTS_NAME, metadata={"format": "pt", "fusionzoo": config["model"]["name"]})
    weights = out / WEIGHTS_NAME
    config["files"] = {WEIGHTS_NAME: {"bytes": weights.stat().st_size, "sha256": sha256_file(weights)}}
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return out


def _config_json(value: Any) -> Any:
    return to_json(value, nonfinite="keep", unknown="raise", where="config.json (model.config must be JSON-able)")


def _resolve_files(
    name_or_path: str | os.PathLike, revision: str | None, cache_dir: str | Path | None, local_files_only: bool
) -> tuple[Path, Path]:
    path = Path(name_or_path)
    if path.is_dir():
        return path / CONFIG_NAME, path / WEIGHTS_NAME
    text = str(name_or_path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise FileNotFoundError(
            f"{text!r} is neither a local directory with {CONFIG_NAME} + {WEIGHTS_NAME} "
            "nor a Hugging Face Hub id of the form 'owner/name'"
        )
    files = []
    for fname in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            files.append(
                Path(
                    hf_hub_download(
                        text, fname, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
                    )
                )
            )
        except LocalEntryNotFoundError as e:
            raise FileNotFoundError(
                f"{fname} of hub model {text!r} is not in the Hugging Face cache "
                f"({cache_dir or 'HF_HUB_CACHE'}) and the hub cannot be reached (offline mode or no "
                f"network). Download it once online, or pass a local directory. ({e})"
            ) from None
        except (RepositoryNotFoundError, EntryNotFoundError) as e:
            raise FileNotFoundError(f"hub model {text!r} has no {fname}: {e}") from None
    return files[0], files[1]


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a fusionzoo model directory needs {CONFIG_NAME}")
    cfg = read_json_object(path)
    if cfg.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fusionzoo config (expected \"format\": \"{FORMAT}\")")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {cfg.get('format_version')!r} is not {FORMAT_VERSION}")
    model = cfg.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str):
        raise CheckpointError(f"{path}: 'model' must be an object with the registered model 'name'")
    if not isinstance(cfg.get("num_classes"), int) or not isinstance(cfg.get("modalities"), list):
        raise CheckpointError(f"{path}: 'num_classes' (int) and 'modalities' (list) are required")
    files = cfg.get("files")
    if files is not None:
        info = files.get(WEIGHTS_NAME) if isinstance(files, dict) else None
        if not (isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)):
            raise CheckpointError(
                f"{path}: 'files' must map {WEIGHTS_NAME!r} to {{\"bytes\": int, \"sha256\": str}}, got {files!r}"
            )
    return cfg


def _verify_weights(config_path: Path, weights_path: Path, cfg: dict[str, Any]) -> None:
    """Check ``weights_path`` against the manifest in ``config.json`` (size, then sha256).

    A config without a manifest (written before fusionzoo recorded one) warns and is not checked.

    Raises:
        CheckpointError: the file is missing, truncated, or its sha256 differs; names the file.
    """
    info = (cfg.get("files") or {}).get(WEIGHTS_NAME)
    if info is None:
        warnings.warn(
            f"{config_path} has no sha256 manifest ('files'), so {weights_path} is loaded unverified; "
            "load and save_pretrained it again to add one",
            stacklevel=4,
        )
        return
    if not weights_path.is_file():
        raise CheckpointError(f"checkpoint file {weights_path} does not exist (listed in {config_path})")
    size = weights_path.stat().st_size
    if size != info["bytes"]:
        raise CheckpointError(
            f"checkpoint file {weights_path} is corrupt or truncated: {size} bytes, the manifest in "
            f"{config_path} says {info['bytes']}. Save or download it again."
        )
    digest = sha256_file(weights_path)
    if digest != info["sha256"]:
        raise CheckpointError(
            f"checkpoint file {weights_path} is corrupt: sha256 {digest[:12]}... differs from the manifest's "
            f"{info['sha256'][:12]}... in {config_path} (modified after saving, e.g. a bad disk or copy). "
            "Save or download it again."
        )


def read_checked(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> tuple[dict[str, Any], Path]:
    """``config.json`` of a saved model and its weights file, checked against the manifest
    (size, sha256) before anything is built, so a corrupt file fails fast.

    Returns:
        ``(config, weights_path)``.

    Raises:
        FileNotFoundError, CheckpointError: as :func:`from_pretrained`.
    """
    config_path, weights_path = _resolve_files(name_or_path, revision, cache_dir, local_files_only)
    cfg = _read_config(config_path)
    _verify_weights(config_path, weights_path, cfg)
    return cfg, weights_path


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> nn.Module:
    """Rebuild a saved model from a local directory or a Hugging Face Hub id.

    Args:
        name_or_path: a directory written by :func:`save_pretrained`, or ``"owner/name"`` on the
            Hub (resolved through the cache; ``HF_HUB_OFFLINE=1`` uses only the cache).
        revision: hub branch, tag or commit.
        cache_dir: hub cache folder (default: huggingface-hub's ``HF_HUB_CACHE``).
        local_files_only: never contact the Hub.

    Returns:
        The model in eval mode, with ``model.pretrained_cfg`` holding the loaded ``config.json``
        (class names, normalization statistics).

    Raises:
        FileNotFoundError: no such directory / not in the cache while offline.
        CheckpointError: a corrupt file (the weights' size or sha256 differs from the manifest in
            ``config.json``), or weights that do not fit the named architecture.
        KeyError: the config names a model that is not registered in this fusionzoo.

    Example:
        >>> model = from_pretrained("runs/esanet/pretrained")
        >>> logits = model({"rgb": rgb, "depth": depth})   # (B, K, H, W)
    """
    cfg, weights_path = read_checked(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    kwargs = dict(cfg["model"])
    name = kwargs.pop("name")
    _registry.model_entry(name)  # raises KeyError with close matches for an unknown name
    kwargs["num_classes"] = cfg["num_classes"]
    kwargs["modalities"] = tuple(cfg["modalities"])
    kwargs.pop("pretrained", None)  # the saved weights replace any encoder initialization
    accepted = _registry.accepted_kwargs(name)
    if accepted is None or "pretrained" in accepted:
        kwargs["pretrained"] = False  # never fetch encoder weights that the file overwrites anyway
    model = _registry.create_model(name, **kwargs)
    load_model_weights(model, weights_path)
    model.eval()
    model.pretrained_cfg = cfg
    return model
