"""Authors' checkpoints -> fusionzoo: strict, one-to-one conversion for published entries.

A published entry (``published=True``) is the authors' network to the parameter, so its released
state dict maps onto ours tensor for tensor. A converter for it is a function of the authors'
state dict that returns ours; it is registered with :func:`register_converter` beside the entry
point. :func:`convert_checkpoint` then checks the mapping strictly:

- every authors' tensor is used (:func:`rename_keys` raises on the first key no rule maps);
- no tensor of the model is missing, none is left over, every shape matches;
- folds that change values (e.g. a conv bias folded into BatchNorm statistics) are written out
  in the converter, with the reason, never done silently.

The result is a :func:`fusionzoo.from_pretrained` folder (``config.json`` with class names and
normalization, ``model.safetensors``). ``create_model(name, pretrained=tag)`` loads the folder
that ``fusionzoo convert NAME FILE --tag TAG`` wrote into the cache (:func:`released_dir`).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file as load_safetensors
from torch import nn

from .._registry import (
    ReleasedWeights,
    create_model,
    model_entry,
    register_model,
    registered_entry,
    released_weights,
    set_release_loader,
)
from ..files import sha256_file
from ..hub import CONFIG_NAME, read_checked, save_pretrained
from ..weights import load_model_weights, load_tensors
from .base import entry_config

__all__ = [
    "ConversionError",
    "Converter",
    "build_or_load",
    "convert_checkpoint",
    "convert_state_dict",
    "fill_from_release",
    "load_released",
    "published_entry",
    "read_authors_checkpoint",
    "register_converter",
    "released_dir",
    "rename_keys",
]

StateDict = dict[str, torch.Tensor]


class ConversionError(ValueError):
    """An authors' checkpoint that does not map onto the published entry."""


@dataclass(frozen=True)
class Converter:
    """How one published entry reads its authors' state dict.

    Attributes:
        fn: authors' state dict (prefixes such as ``module.`` already stripped) -> ours; with
            ``with_model``, ``fn(state_dict, model)`` (for names that depend on the model, e.g.
            the modality that names the auxiliary stream's encoder).
        classifier_key: the authors' key of the final classifier weight, whose first dimension is
            the class count (read when no ``num_classes`` and no tag are given).
        with_model: whether ``fn`` takes the target model as its second argument.
    """

    fn: Callable[..., StateDict]
    classifier_key: str
    with_model: bool = False


_CONVERTERS: dict[str, Converter] = {}


def register_converter(
    *names: str, classifier_key: str, with_model: bool = False
) -> Callable[[Callable[..., StateDict]], Callable[..., StateDict]]:
    """Register ``fn(authors_state_dict) -> our_state_dict`` for published entries ``names``
    (``fn(authors_state_dict, model)`` with ``with_model=True``).

    Raises:
        ValueError: a name registered twice, or a name that is not a published entry.
    """

    def decorator(fn: Callable[..., StateDict]) -> Callable[..., StateDict]:
        for name in names:
            if name in _CONVERTERS:
                raise ValueError(f"a converter for {name!r} is already registered")
            if not registered_entry(name).published:
                raise ValueError(f"{name!r} is not a published entry; only the authors' networks convert one-to-one")
            _CONVERTERS[name] = Converter(fn=fn, classifier_key=classifier_key, with_model=with_model)
        return fn

    return decorator


def rename_keys(
    state_dict: Mapping[str, torch.Tensor], rules: Sequence[tuple[str, str]], *, where: str = "the checkpoint"
) -> StateDict:
    """Rename every key by the first ``(regex, replacement)`` rule whose regex matches it fully.

    Raises:
        ConversionError: a key that no rule maps (the first one is named), or two keys mapped
            onto the same name.
    """
    compiled = [(re.compile(pattern), replacement) for pattern, replacement in rules]
    out: StateDict = {}
    source_of: dict[str, str] = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                new = pattern.sub(replacement, key)
                break
        else:
            raise ConversionError(f"{where}: key {key!r} (shape {tuple(tensor.shape)}) is not part of the published network")
        if new in out:
            raise ConversionError(f"{where}: keys {source_of[new]!r} and {key!r} both map to {new!r}")
        out[new], source_of[new] = tensor, key
    return out


def _unwrap(obj: Any, where: str) -> StateDict:
    """The state dict inside a training checkpoint (``{"model": ...}``, ``{"state_dict": ...}``,
    TokenFusion / GeminiFusion's ``{"segmenter": ...}``), with DataParallel's ``module.`` prefix removed."""
    for key in ("model", "state_dict", "model_state_dict", "net", "segmenter"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(
            f"{where} holds no state dict (expected a mapping of tensors, or one under 'model'/'state_dict')"
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pth.tar", ".ckpt")
NUMPY_MAGIC = b"\x93NUMPY"  # the first bytes of a .npy file
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _read_archive(path: Path) -> bytes:
    """The one checkpoint inside a gzipped tar archive as the authors ship it (ESANet's
    ``nyuv2_r34_NBt1D.tar.gz`` holds ``nyuv2/r34_NBt1D.pth``), read without extracting to disk."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and m.name.endswith(CHECKPOINT_SUFFIXES)]
            if len(members) != 1:
                names = [m.name for m in archive.getmembers() if m.isfile()]
                raise ConversionError(
                    f"{path} holds {len(members)} checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}), expected one; "
                    f"its files: {names[:10]}; extract the one to convert and pass it instead"
                )
            return archive.extractfile(members[0]).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConversionError(f"{path} is not a readable .tar.gz archive ({type(e).__name__}: {e})") from None


def read_authors_checkpoint(path: str | Path) -> StateDict:
    """Tensors of an authors' checkpoint file (``.pth``/``.pt``/``.tar`` via ``torch.load`` with
    ``weights_only=True``, so no pickled code runs; ``.safetensors``; or a ``.tar.gz``/``.tgz``
    archive holding exactly one such checkpoint, as some authors release them).

    Raises:
        FileNotFoundError: no such file. ConversionError: unreadable, or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (the authors' checkpoint to convert)")
    with path.open("rb") as f:
        head = f.read(8)
    if head.startswith(NUMPY_MAGIC):
        raise ConversionError(
            f"{path} is a NumPy array file (.npy), not a checkpoint; convert reads the authors' PyTorch "
            f"checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}, {', '.join(ARCHIVE_SUFFIXES)}) or a .safetensors file"
        )
    try:
        if path.suffix == ".safetensors":
            obj: Any = load_safetensors(str(path))
        elif path.name.endswith(ARCHIVE_SUFFIXES):
            obj = torch.load(io.BytesIO(_read_archive(path)), map_location="cpu", weights_only=True)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001  (torch.load raises many types, e.g. KeyError, on a file that is no checkpoint)
        found = _UNSUPPORTED_GLOBAL.search(str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if found is not None:
            raise ConversionError(
                f"{path} pickles an object that is not a tensor ({found.group(1)}); fusionzoo reads checkpoints with "
                "torch.load(weights_only=True) and never runs pickled code. In the authors' environment, save the "
                "state dict alone (torch.save(checkpoint['state_dict'], 'weights.pth')) and convert that"
            ) from None
        # torch's own text is long (weights_only advice) or cryptic ("KeyError: 101") for a file that is no checkpoint.
        plain = str(e) and not isinstance(e, (KeyError, pickle.UnpicklingError))
        detail = f"{type(e).__name__}: {e}" if plain else "not a zip archive or pickle of tensors"
        raise ConversionError(
            f"{path} is not a readable checkpoint ({detail}); give the authors' {', '.join(CHECKPOINT_SUFFIXES)}, "
            ".safetensors or .tar.gz file, complete (a partial download is truncated)"
        ) from None
    return _unwrap(obj, str(path))


def _refuse_own_format(path: Path) -> None:
    """A ``model.safetensors`` that fusionzoo wrote (``save_pretrained`` records the model name in
    its metadata) is loaded, not converted.

    Raises:
        ConversionError: with the ``from_pretrained`` hint.
    """
    if path.suffix != ".safetensors" or not path.is_file():
        return
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001  (an unreadable file is reported by read_authors_checkpoint)
        return
    if "fusionzoo" in metadata:
        raise ConversionError(
            f"{path} holds fusionzoo's own weights of {metadata['fusionzoo']} (written by save_pretrained), not "
            f"the authors' checkpoint: nothing to convert; load its folder with fusionzoo.from_pretrained({str(path.parent)!r})"
        )


def _refuse_own_state_dict(name: str, path: Path, state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """A file whose keys are (90 % or more) ``model``'s own is fusionzoo's state dict, not the authors'.

    Raises:
        ConversionError: with the ``from_pretrained`` / ``load_state_dict`` hint.
    """
    shared = len(set(state_dict) & set(model.state_dict()))
    if shared >= 0.9 * len(state_dict):
        raise ConversionError(
            f"{path} is already a fusionzoo state dict of {name} ({shared} of its {len(state_dict)} keys are "
            f"{name}'s), not the authors' checkpoint: nothing to convert. Load a save_pretrained folder with "
            "fusionzoo.from_pretrained(folder), a bare state dict with model.load_state_dict"
        )


def convert_state_dict(name: str, authors_state_dict: Mapping[str, torch.Tensor], model: nn.Module, *, where: str = "the checkpoint") -> StateDict:
    """Map an authors' state dict onto ``model`` (an instance of published entry ``name``) strictly.

    Raises:
        ConversionError: no converter for ``name``, or a key that did not match (the first is named).
    """
    if name not in _CONVERTERS:
        known = sorted(_CONVERTERS)
        raise ConversionError(f"no converter for {name!r}; published entries with one: {known}")
    converter = _CONVERTERS[name]
    ours = converter.fn(authors_state_dict, model) if converter.with_model else converter.fn(authors_state_dict)
    own = model.state_dict()
    for key in own:
        if key not in ours:
            raise ConversionError(f"{where}: {name} needs {key!r} {tuple(own[key].shape)}, which no authors' key provides")
    for key, tensor in ours.items():
        if key not in own:
            raise ConversionError(f"{where}: converted key {key!r} is not a parameter or buffer of {name}")
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ConversionError(
                f"{where}: {key!r} has shape {tuple(tensor.shape)} in the checkpoint, {tuple(own[key].shape)} in {name}"
            )
    return ours


def released_dir(name: str, tag: str) -> Path:
    """Where ``fusionzoo convert NAME FILE --tag TAG`` writes and ``pretrained=TAG`` reads:
    ``$FUSIONZOO_CACHE/{name}.{tag}``, by default under huggingface-hub's home
    (``$HF_HOME/fusionzoo``)."""
    root = os.environ.get("FUSIONZOO_CACHE")
    if root is None:
        hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
        root = os.path.join(hf_home, "fusionzoo")
    return Path(root) / f"{name}.{tag}"


def convert_checkpoint(
    name: str,
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    tag: str | None = None,
    num_classes: int | None = None,
    modalities: Iterable[str] | None = None,
    class_names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert the authors' released checkpoint of published entry ``name`` into a
    :func:`fusionzoo.from_pretrained` folder.

    Args:
        name: a published entry (``fusionzoo.list_models(published=True)``).
        checkpoint: the authors' file, as downloaded.
        out: output folder (default: :func:`released_dir` of ``name`` and ``tag``, where
            ``create_model(name, pretrained=tag)`` finds it).
        tag: a registered release (``"nyuv2"``): its class count, modalities, class names and
            normalization are used, and its sha256 is checked where the authors publish one.
        num_classes: class count when no tag is given (default: read from the classifier).
        modalities: the streams, when no tag is given (default: the entry's).
        class_names: names written into ``config.json`` when no tag is given.
        overwrite: replace a conversion already in ``out`` (``fusionzoo convert --force``).

    Returns:
        The output folder.

    Raises:
        ConversionError: a wrong file (the first key that did not match is named; fusionzoo's
            own weights get the hint to use ``from_pretrained``), a sha256 that differs from the
            authors', or an earlier conversion in ``out`` without ``overwrite``.

    Example:
        >>> convert_checkpoint("cmx_mit_b2", "NYUDV2_CMX+Segformer-B2.pth", tag="nyuv2")
    """
    entry = model_entry(name)
    if not entry.published:
        raise ConversionError(f"{name!r} is a fusionzoo family entry; only published entries convert authors' checkpoints")
    path = Path(checkpoint)
    release: ReleasedWeights | None = released_weights(name, tag) if tag is not None else None
    if out is None:
        if tag is None:
            raise ValueError("give out= (an output folder) or tag= (then the cache folder is used)")
        out = released_dir(name, tag)
    _refuse_own_format(path)
    authors = read_authors_checkpoint(path)
    if (Path(out) / CONFIG_NAME).is_file() and not overwrite:
        raise ConversionError(
            f"{out} already holds a conversion ({CONFIG_NAME}); pass --force (overwrite=True) to replace it, "
            "or another --out"
        )
    if release is not None and release.sha256 is not None:
        digest = sha256_file(path)
        if digest != release.sha256:
            raise ConversionError(
                f"{path}: sha256 {digest} differs from the authors' {release.sha256} for {release.full_name} "
                f"(a partial download or another file; get {release.filename} from {release.url})"
            )
    if release is not None:
        num_classes = release.num_classes
        modalities = release.modalities
        class_names = release.class_names
    if num_classes is None:
        key = _CONVERTERS[name].classifier_key if name in _CONVERTERS else None
        if key is None or key not in authors:
            _refuse_own_state_dict(name, path, authors, create_model(name, modalities=tuple(modalities or entry.modalities)))
            raise ConversionError(f"{path}: no classifier {key!r} to read the class count from; pass num_classes")
        num_classes = int(authors[key].shape[0])
    model = create_model(name, num_classes=num_classes, modalities=tuple(modalities or entry.modalities))
    try:
        ours = convert_state_dict(name, authors, model, where=str(path))
    except ConversionError:
        _refuse_own_state_dict(name, path, authors, model)
        raise
    load_model_weights(model, ours)
    extra = {"converted_from": path.name, "reference_repo": entry.reference_repo, "reference_commit": entry.reference_commit}
    if release is not None:
        extra.update(release=release.full_name, source=release.url, reported=release.reported)
    return save_pretrained(
        model,
        out,
        class_names=class_names,
        normalization=release.normalization if release is not None else None,
        extra=extra,
    )


def load_released(name: str, tag: str) -> nn.Module:
    """The published entry ``name`` with the authors' weights ``tag``, converted beforehand: the
    same as ``create_model(name, pretrained=tag)``, which also takes keywords.

    Raises:
        KeyError: unknown tag. FileNotFoundError: not converted yet (the message gives the fix).
    """
    return create_model(name, pretrained=tag)


def _class_sized(released: tuple[int, ...], built: tuple[int, ...], k_released: int, k_built: int) -> bool:
    """Whether two shapes differ only where one has the release's class count and the other the
    requested one (a classifier ``(K, C, 1, 1)``, its bias ``(K,)``, ESANet's learned
    upsampling ``(K, 1, 3, 3)``, side heads)."""
    return len(released) == len(built) and all(
        a == b or (a == k_released and b == k_built) for a, b in zip(released, built)
    )


def fill_from_release(build: Callable[[], nn.Module], release: ReleasedWeights, given: Mapping[str, Any]) -> nn.Module:
    """Build the model (``build()``: its entry with the user's keywords ``given``, from
    ``create_model(name, pretrained=tag, **given)``) and load the converted weights of
    ``release`` into it; the converted files are found and checked (sha256 manifest) first.

    Nothing is downloaded: the authors host their files where no script can fetch them reliably
    (Google Drive, Baidu), so a missing conversion says which file to get and which command
    converts it. A ``num_classes`` other than the release's keeps the model's fresh
    initialisation of the tensors whose shape counts classes, with a one-line warning naming
    them (timm's behaviour); every other tensor must fit.

    Returns:
        The model in eval mode with ``pretrained_cfg`` (the folder's ``config.json``; after a
        class change, its ``num_classes`` is the model's and ``class_names`` None).

    Raises:
        FileNotFoundError: not converted yet. ValueError: keywords that change other tensors
            (e.g. ``in_chans``), naming them and the first tensors that differ.
    """
    folder = released_dir(release.name, release.tag)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{release.full_name} is not converted yet ({folder} has no {CONFIG_NAME}): download "
            f"{release.filename} from {release.url}, then run "
            f"`fusionzoo convert {release.name} {release.filename} --tag {release.tag}`"
        )
    cfg, weights_path = read_checked(folder, local_files_only=True)
    tensors = load_tensors(weights_path)
    model = build()
    own = model.state_dict()
    k_released, k_built = int(cfg["num_classes"]), int(getattr(model, "num_classes", cfg["num_classes"]))
    reinit, conflicts = [], []
    for key in sorted(set(own) | set(tensors)):
        if key not in own or key not in tensors:
            conflicts.append(f"{key} ({'only in the release' if key not in own else 'not in the release'})")
        elif tuple(own[key].shape) != tuple(tensors[key].shape):
            if k_built != k_released and _class_sized(tuple(tensors[key].shape), tuple(own[key].shape), k_released, k_built):
                reinit.append(key)
            else:
                conflicts.append(f"{key} ({tuple(tensors[key].shape)} in the release, {tuple(own[key].shape)} as built)")
    if conflicts:
        keys = [k for k in given if k != "num_classes"]
        culprit = (f"keyword argument(s) {', '.join(f'{k}={given[k]!r}' for k in keys)} conflict with"
                   if keys else "the model built does not fit")
        raise ValueError(
            f"{release.full_name}: {culprit} the released weights in {folder}: {len(conflicts)} tensor(s) differ, "
            f"e.g. {'; '.join(conflicts[:3])}. Drop {'them' if keys else 'the conversion and convert again'}, or build "
            f"{release.name} without pretrained={release.tag!r}"
        )
    load_model_weights(model, {k: own[k] if k in reinit else v for k, v in tensors.items()})
    if reinit:
        warnings.warn(
            f"{release.full_name} has {k_released} classes, num_classes={k_built}: re-initialised "
            f"{', '.join(reinit)}; the other {len(own) - len(reinit)} tensors are the release's",
            stacklevel=4,
        )
        cfg = {**cfg, "num_classes": k_built, "class_names": None, "reinitialized": reinit}
    model.eval()
    model.pretrained_cfg = cfg
    return model


set_release_loader(fill_from_release)


def build_or_load(name: str, pretrained: bool | str, build: Callable[[], nn.Module]) -> nn.Module:
    """Published entry points' handling of ``pretrained``: ``True``/``False`` is passed to ``build``
    (ImageNet encoder); a tag loads the authors' released weights. ``create_model(name,
    pretrained=tag, **kwargs)`` never reaches the tag branch (it builds with ``pretrained=False``
    and the keywords, then :func:`fill_from_release`); an entry point called directly with a tag
    is ``create_model(name, pretrained=tag)`` with the release's defaults."""
    if isinstance(pretrained, str):
        return load_released(name, pretrained)
    return build()


def published_entry(name: str, build: Callable[..., nn.Module], *, doc: str, **registry: Any) -> Callable[..., nn.Module]:
    """Register the entry point ``name`` of a published network whose keywords pass through:
    ``entry(pretrained=False, **kwargs)`` builds ``build(pretrained=pretrained, **kwargs)`` and
    records ``config`` (the name and the keywords, tuples as lists), or loads the released weights
    of a tag with the keywords applied (``create_model(name, pretrained=tag, **kwargs)``). ``registry``: :func:`register_model`'s metadata, with the
    ``reference_repo`` and ``reference_commit`` that a published entry names (``published=True``
    is set here)."""

    def entry(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        if isinstance(pretrained, str):  # called directly with a tag: the keywords apply, as through create_model
            return create_model(name, pretrained=pretrained, **kwargs)
        model = build(pretrained=pretrained, **kwargs)
        model.config = entry_config(name, kwargs)
        return model

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = doc
    entry.__module__ = getattr(build, "func", build).__module__  # a functools.partial's function
    register_model(published=True, **registry)(entry)
    return entry
