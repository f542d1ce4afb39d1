"""Strict model registry: names -> entry points + metadata, filterable without building anything.

Names follow ``{method}_{encoder}`` (``cmx_resnet50``) for a named variant whose encoder is fixed,
or ``{method}`` (``late_mean``) for a family entry that takes ``encoder=`` for any timm model. An
optional ``.tag`` names the training data of released weights (``cmx_resnet50.nyuv2``).
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .modalities import check_modality_names

TASKS = ("segmentation", "detection")
FUSIONS = ("early", "middle", "late", "hybrid")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*(\.[a-z0-9][a-z0-9_]*)?$")


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about a model before building it."""

    name: str
    fn: Callable[..., nn.Module] = field(repr=False)
    task: str
    fusion: str
    method: str
    encoder: str  # the default (family) or fixed (named variant) timm encoder
    modalities: tuple[str, ...]  # default modalities
    paper: str
    max_modalities: int | None  # 2 for methods defined on exactly two streams, None = any number
    encoder_fixed: bool  # True for named variants: `encoder=` is then rejected
    accepts: frozenset[str] | None = None  # keywords the entry takes (None: read its signature)
    # A published entry is the authors' whole network, to the parameter (DESIGN.md section 3): its
    # released checkpoints convert one-to-one and golden outputs of the authors' code prove it.
    published: bool = False
    reference_repo: str | None = None  # the authors' repository (URL)
    reference_commit: str | None = None  # the commit our parity fixtures were computed at

    @property
    def module(self) -> str:
        return self.fn.__module__


_REGISTRY: dict[str, ModelEntry] = {}
_ZOO_LOADED = False


def _load_zoo() -> None:
    """Import the model modules (they register themselves) before the first lookup.

    ``import fusionzoo`` is lazy (no torch for ``fusionzoo --help``), so the registry fills
    itself here, once, whichever way it is reached (``fz.list_models``, ``fusionzoo.hub``, ...).
    """
    global _ZOO_LOADED
    if _ZOO_LOADED:
        return
    _ZOO_LOADED = True  # set first: a model module that looks names up while importing must not recurse
    try:
        for module in ("fusionzoo.models", "fusionzoo.detection.models", "fusionzoo.detection.published"):
            importlib.import_module(module)
    except BaseException:
        _ZOO_LOADED = False
        raise


def register_model(
    *,
    task: str,
    fusion: str,
    method: str,
    encoder: str,
    paper: str,
    modalities: tuple[str, ...] = ("rgb", "depth"),
    max_modalities: int | None = None,
    name: str | None = None,
    accepts: Iterable[str] | None = None,
    published: bool = False,
    reference_repo: str | None = None,
    reference_commit: str | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register an entry point with its metadata.

    A function whose name equals ``method`` is a family entry (accepts ``encoder=``); any other name
    must be ``f"{method}_{encoder}"`` with ``.`` in the timm name replaced by ``_``. Entry points
    that forward ``**kwargs`` list the keywords they take in ``accepts``, so unknown keywords are
    rejected up front with the entry point's name.

    A published entry (``published=True``) is the authors' network to the parameter and must name
    its ``reference_repo`` and the ``reference_commit`` that its parity fixtures come from; its
    name may follow the paper (``cmx_mit_b2``, ``esanet_r34_nbt1d``), the encoder part being the
    paper's backbone name rather than a timm name.

    Raises:
        ValueError: a duplicate name, bad metadata, or a name that breaks the grammar.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if published and not (reference_repo and reference_commit):
        raise ValueError("a published entry must name its reference_repo and reference_commit")
    if not published and (reference_repo or reference_commit):
        raise ValueError("reference_repo/reference_commit are for published entries (published=True)")

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or fn.__name__
        if model_name in _REGISTRY:
            raise ValueError(
                f"model {model_name!r} is already registered by {_REGISTRY[model_name].module}; "
                "names must be unique"
            )
        if not NAME_PATTERN.match(model_name):
            raise ValueError(f"model name {model_name!r} breaks the grammar {NAME_PATTERN.pattern}")
        base = model_name.split(".")[0]
        fixed = base != method
        if fixed and base != f"{method}_{encoder_key(encoder)}":
            raise ValueError(
                f"model name {model_name!r} must be {method!r} (family entry) or "
                f"{method}_{encoder_key(encoder)!r} (named variant)"
            )
        _REGISTRY[model_name] = ModelEntry(
            name=model_name,
            fn=fn,
            task=task,
            fusion=fusion,
            method=method,
            encoder=encoder,
            modalities=tuple(modalities),
            paper=paper,
            max_modalities=max_modalities,
            encoder_fixed=fixed,
            accepts=frozenset(accepts) if accepts is not None else None,
            published=published,
            reference_repo=reference_repo,
            reference_commit=reference_commit,
        )
        return fn

    return decorator


def encoder_key(encoder: str) -> str:
    """The part of a model name that stands for a timm encoder (``convnext_tiny.fb_in1k`` -> ``convnext_tiny_fb_in1k``)."""
    return encoder.replace(".", "_").replace("-", "_").lower()


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


def list_models(
    filter: str | Iterable[str] | None = None,
    *,
    exclude: str | Iterable[str] | None = None,
    task: str | None = None,
    fusion: str | Iterable[str] | None = None,
    modalities: Iterable[str] | None = None,
    method: str | None = None,
    published: bool | None = None,
) -> list[str]:
    """Registered model names, sorted, filtered by fnmatch patterns and metadata.

    Args:
        filter: one or more fnmatch patterns a name must match (any of them).
        exclude: patterns that remove names.
        task: ``"segmentation"`` or ``"detection"``.
        fusion: a fusion family (``early``, ``middle``, ``late``, ``hybrid``) or several.
        modalities: keep models that can run on exactly these streams (e.g. three streams drop
            the methods defined for two).
        method: the method part of the name (``"cmx"``).
        published: ``True`` keeps the authors' networks (``published=True`` entries), ``False``
            keeps fusionzoo's families and their named variants.

    Example:
        >>> list_models("*_resnet50", task="segmentation", fusion="late", modalities=("rgb", "thermal"))
        ['late_gate_resnet50', 'late_mean_resnet50', 'late_weighted_resnet50']
    """
    _load_zoo()
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    fusions = _as_list(fusion)
    for f in fusions:
        if f not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {f!r}")
    include, excluded = _as_list(filter), _as_list(exclude)
    wanted = tuple(modalities) if modalities is not None else None
    if wanted is not None:
        check_modality_names(wanted)
    names = []
    for name, entry in _REGISTRY.items():
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in excluded):
            continue
        if task is not None and entry.task != task:
            continue
        if fusions and entry.fusion not in fusions:
            continue
        if method is not None and entry.method != method:
            continue
        if published is not None and entry.published != published:
            continue
        if wanted is not None and entry.max_modalities is not None and len(wanted) != entry.max_modalities:
            continue
        names.append(name)
    return sorted(names)


def registered_entry(name: str) -> ModelEntry:
    """:func:`model_entry` for registration code (``register_weights``, ``register_converter``),
    which runs in the module that registered ``name`` just before: it does not fill the registry
    first, so a model module imported while the registry fills itself (a detector module that
    imports ``fusionzoo.detection.models`` while that one is half imported) does not re-enter it.

    Raises:
        KeyError: ``name`` is not registered (yet).
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}: register its entry point before its weights or converter")
    return _REGISTRY[name]


def model_entry(name: str) -> ModelEntry:
    """Metadata of a registered model.

    Raises:
        KeyError: unknown name; the message lists close matches and a ``list_models`` hint.
    """
    _load_zoo()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.6)
    prefix = name.split("_")[0]
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise KeyError(
        f"unknown model {name!r}.{hint} See fusionzoo.list_models({prefix + '*'!r}) "
        f"({len(_REGISTRY)} models registered)."
    )


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: a registered name (``fusionzoo.list_models()``).
        **kwargs: entry-point arguments, e.g. ``num_classes``, ``modalities``, ``decoder``,
            ``pretrained``; family entries also take ``encoder``. ``pretrained=TAG`` (a published
            entry's released weights, ``list_pretrained()``) keeps the other keywords, as in timm:
            the model is built with them and filled with the release; a ``num_classes`` other
            than the release's re-initialises the class-sized tensors (classifier, side heads)
            with a warning naming them; ``modalities`` or a keyword that changes another tensor's
            shape (``in_chans``) raises, naming the key; ``dropout``, ``drop_path_rate`` and
            the like apply.

    Returns:
        The model; ``model({"rgb": (B, 3, H, W), "depth": (B, 1, H, W)})`` gives ``(B, K, H, W)``.

    Raises:
        KeyError: unknown name or tag. TypeError: an argument the entry point does not take.
        ValueError: a tag given to a family entry (tags belong to published entries), or
            keywords that conflict with the release. FileNotFoundError: a tag not converted yet.

    Example:
        >>> m = create_model("cmx_resnet50", num_classes=9, modalities=("rgb", "thermal"))
        >>> m = create_model("dformer_tiny", pretrained="nyuv2", num_classes=9)  # warns: head re-initialised
    """
    entry = model_entry(name)
    if entry.encoder_fixed and "encoder" in kwargs:
        raise TypeError(
            f"{name}() fixes encoder={entry.encoder!r}; use create_model({entry.method!r}, "
            f"encoder={kwargs['encoder']!r}) for another encoder"
        )
    accepted = accepted_kwargs(name)
    if accepted is not None:
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            raise TypeError(f"{name}() got unexpected keyword argument(s) {unknown}; it takes {sorted(accepted)}")
    if isinstance(kwargs.get("pretrained"), str):
        return _create_released(entry, kwargs["pretrained"], {k: v for k, v in kwargs.items() if k != "pretrained"})
    return entry.fn(**kwargs)


# Builds a published entry's model and fills it with the converted weights of a release:
# ``loader(build, release, given_kwargs) -> model``, where ``build()`` makes the model (the loader
# finds and checks the converted files first, so a missing conversion fails before building).
# Set by ``fusionzoo.models.convert`` when it is imported (always before a published entry
# exists), so the registry needs no import of it.
_RELEASE_LOADER: Callable[[Callable[[], nn.Module], ReleasedWeights, dict[str, Any]], nn.Module] | None = None


def set_release_loader(loader: Callable[[Callable[[], nn.Module], ReleasedWeights, dict[str, Any]], nn.Module]) -> None:
    """Install the function that builds a published entry and loads a release's converted weights
    into it (see :func:`create_model` with ``pretrained=TAG``)."""
    global _RELEASE_LOADER
    _RELEASE_LOADER = loader


def _tags_of_published() -> dict[str, list[str]]:
    tags: dict[str, list[str]] = {}
    for weights in _RELEASED.values():
        tags.setdefault(weights.name, []).append(weights.tag)
    return {name: sorted(t) for name, t in sorted(tags.items())}


def _create_released(entry: ModelEntry, tag: str, given: dict[str, Any]) -> nn.Module:
    """``create_model(name, pretrained=TAG, **given)``, as timm does it: the keywords apply. The
    model is built with ``given`` over the release's class count and modalities, then filled with
    the release's weights; a different ``num_classes`` re-initialises the class-sized tensors
    (classifier, side heads) with a warning naming them, and keywords that change other shapes
    or the modalities raise (the loader names the key)."""
    if not entry.published:
        published = _tags_of_published()
        close = difflib.get_close_matches(entry.name, list(published), n=3, cutoff=0.4)
        hint = f" Closest: {', '.join(close)}." if close else ""
        listing = "; ".join(f"{n} ({', '.join(t)})" for n, t in published.items())
        raise ValueError(
            f"{entry.name}: pretrained={tag!r} is a released-weights tag, and tags belong to published entries "
            f"(the authors' networks); {entry.name} is a fusionzoo {'named variant' if entry.encoder_fixed else 'family entry'}, "
            f"whose pretrained= is True/False (timm ImageNet encoder weights).{hint} Published entries with tags: {listing}"
        )
    release = released_weights(entry.name, tag)
    if "modalities" in given and tuple(given["modalities"]) != release.modalities:
        raise ValueError(
            f"{release.full_name}: modalities={list(given['modalities'])} conflicts with the release, trained on "
            f"{list(release.modalities)} (its encoders' weights belong to those streams); drop modalities= or build "
            f"{entry.name} without pretrained={tag!r}"
        )
    if _RELEASE_LOADER is None:
        raise RuntimeError("fusionzoo.models.convert is not imported; it installs the released-weights loader")
    defaults = {"num_classes": release.num_classes, "modalities": release.modalities}
    accepted = accepted_kwargs(entry.name)
    defaults = {k: v for k, v in defaults.items() if accepted is None or k in accepted}
    # pretrained=False: the release replaces every weight, so no ImageNet encoder is fetched first.
    kwargs = {**defaults, **given, "pretrained": False}
    return _RELEASE_LOADER(lambda: entry.fn(**kwargs), release, given)


def accepted_kwargs(name: str) -> set[str] | None:
    """Keyword arguments the registered entry ``name`` takes; ``None`` when it takes any (``**kwargs``).

    Read from the entry's ``accepts`` metadata, else from its signature; a named variant (fixed
    encoder) does not take ``encoder``.

    Raises:
        KeyError: unknown name.
    """
    entry = model_entry(name)
    if entry.accepts is not None:
        accepted = set(entry.accepts)
    else:
        params = inspect.signature(entry.fn).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
        accepted = set(params)
    return accepted - {"encoder"} if entry.encoder_fixed else accepted


@dataclass(frozen=True)
class ReleasedWeights:
    """A checkpoint the authors of a published entry released, known as ``{name}.{tag}``.

    fusionzoo never redistributes it: ``fusionzoo convert`` maps the downloaded file into a
    ``from_pretrained`` folder, and ``create_model(name, pretrained=tag)`` loads that folder.
    """

    name: str  # the registered published entry (``cmx_mit_b2``)
    tag: str  # the training data (``nyuv2``)
    url: str  # where the authors publish the file
    filename: str  # the file as the authors name it
    num_classes: int
    modalities: tuple[str, ...]
    reported: str  # what the paper reports for these weights, e.g. "mIoU 54.1 (NYUDv2, MS+flip)"
    sha256: str | None = None  # only where the authors publish one; never computed by us
    class_names: tuple[str, ...] | None = None
    normalization: dict[str, dict[str, tuple[float, ...]]] | None = None  # per modality mean/std

    @property
    def full_name(self) -> str:
        return f"{self.name}.{self.tag}"


_RELEASED: dict[str, ReleasedWeights] = {}


def register_weights(weights: ReleasedWeights) -> ReleasedWeights:
    """Make a released checkpoint known as ``{name}.{tag}``.

    Raises:
        ValueError: the tag is registered twice, breaks the name grammar, or its model is not a
            registered published entry.
    """
    full = weights.full_name
    if full in _RELEASED:
        raise ValueError(f"released weights {full!r} are already registered")
    if not NAME_PATTERN.match(full) or "." in weights.tag:
        raise ValueError(f"released weights name {full!r} breaks the grammar {NAME_PATTERN.pattern}")
    if not registered_entry(weights.name).published:
        raise ValueError(f"{weights.name!r} is not a published entry; only the authors' networks carry released weights")
    _RELEASED[full] = weights
    return weights


def released_weights(name: str, tag: str) -> ReleasedWeights:
    """The released checkpoint ``{name}.{tag}``.

    Raises:
        KeyError: unknown tag; the message lists the tags this model has.
    """
    _load_zoo()
    full = f"{name}.{tag}"
    if full in _RELEASED:
        return _RELEASED[full]
    model_entry(name)  # an unknown model name raises with close matches first
    tags = sorted(w.tag for w in _RELEASED.values() if w.name == name)
    raise KeyError(f"{name!r} has no released weights tagged {tag!r}; known tags: {tags or 'none'}")


def list_pretrained(filter: str | Iterable[str] | None = None) -> list[str]:
    """Released checkpoints as ``{name}.{tag}``, sorted, filtered by fnmatch patterns."""
    _load_zoo()
    include = _as_list(filter)
    return sorted(n for n in _RELEASED if not include or any(fnmatch.fnmatchcase(n, p) for p in include))
