"""Typed training configuration: one dataclass, a YAML recipe, strict command-line overrides.

Precedence, lowest first: the dataclass defaults (the embedded default run), the YAML recipe
(``--config zoo/<model>/<dataset>.yaml``), then ``--key value`` overrides. Every key is checked
against the dataclass fields (an unknown key raises, suggests close matches and lists the valid
ones) and every value against the field's annotation (``"3"`` for an ``int`` field in YAML is an
error; on the command line strings are parsed by type). The command line is an ``argparse``
parser generated from the fields: flag, type, choices (``Literal``) and help (the field's
``metadata["help"]``, its one description). A recipe may carry a ``card:`` block with facts that
are not configuration (paper, published mIoU ``target``, our ``measured`` value, weights file);
it is validated and returned separately, never passed to training.

Importing or parsing a config imports neither the model zoo nor the engine's builders
(``python -X importtime -c "from fusionzoo.engine.config import TrainConfig"``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..files import atomic_write_bytes

__all__ = [
    "CALLBACKS",
    "CALLBACK_HELP",
    "CARD_KEYS",
    "CommandLine",
    "ConfigError",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "help_text",
    "load_config",
    "parse_args",
    "parse_command_line",
    "valid_keys",
    "validate_card",
    "write_config",
]


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says which and why."""


# Named training callbacks (``--callbacks a,b``): "module:Class", imported when
# fusionzoo.engine.builders.build_callbacks builds them (the config checks only the names).
CALLBACKS = {
    "modality_balance": "fusionzoo.interpret.callbacks:ModalityBalanceCallback",
    "ogm_ge": "fusionzoo.interpret.callbacks:OGMGECallback",  # changes training: OGM-GE, alpha 0.5
    "kgs": "fusionzoo.interpret.kgs:KGSCallback",  # changes training: MIM's knowledge guidance, extra heads
    "grad_direction": "fusionzoo.interpret.cooperation:GradientDirectionCallback",
    "learning_speed": "fusionzoo.interpret.cooperation:LearningSpeedCallback",
    "epoch_interpret": "fusionzoo.interpret.cooperation:EpochInterpretCallback",
}
# What each callback measures and its settings (--callback-options), for --help; docs/interpret.md,
# "Optimization collaboration", has the definitions.
CALLBACK_HELP = (
    "modality_balance: per-modality encoder gradient norms and head confidence (log_every); "
    "ogm_ge: OGM-GE gradient modulation, CHANGES training (alpha 0.5, ge true, start_epoch 0, end_epoch "
    "= first half of training, modulate encoder|branch, seed); "
    "kgs: MIM's Knowledge Guidance Scheme, CHANGES training: per-pixel unimodal heads on each modality's stage "
    "features (purified and unpurified where the model has purification gates), intra- and inter-modal guidance "
    "losses added to the task's (stage = deepest, purified auto, unimodal 1, intra 1, inter 1, temperature 10, "
    "log_every 10); needs per-modality stream taps (not early fusion); "
    "grad_direction: cosine / conflict between the modalities' gradients on the shared (fusion, decoder) "
    "weights, one extra forward+backward per modality every log_every steps (log_every 10, ema 0.9); "
    "learning_speed: Wu et al. 2022 learning speed of each modality's encoder and the conditional learning "
    "speed (log_every 1); "
    "epoch_interpret: contribution, utilisation rate, interaction and CKA to the output on a fixed "
    "validation subset after every evaluation (images 16, replicates 0, every 1, policy zero, metrics)"
)


def _key(default: Any, help: str, section: str | None = None) -> Any:
    """A :class:`TrainConfig` field with an immutable default and its one description (read by
    ``--help`` and the docs); ``section`` starts a new group of keys in ``--help`` at this field."""
    return field(default=default, metadata={"help": help, "section": section})


@dataclass
class TrainConfig:
    """Everything ``train.py`` needs; the defaults are the embedded CPU default run.

    Sizes are ``(H, W)``. Step counts are optimizer steps (one batch per rank per step).
    """

    model: str = _key("esanet_resnet18", "a registered model name (fusionzoo list)", section="what to train")
    model_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra create_model arguments as YAML, a space after each colon: '{dropout: 0.1}'", "section": None})
    pretrained: bool = _key(False, "ImageNet encoder weights through the HF cache (needs the cache)")
    dataset: str = _key("synthetic_rgbd", "a registered dataset name (fusionzoo.data.list_datasets()); "
                         "folder = your own data described by <data_root>/fusionzoo.yaml (docs/custom_data.md)")
    data_root: str | None = _key(None, "None for synthetic sets; the prepared layout, or for folder the folder "
                                 "holding fusionzoo.yaml")
    dataset_kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "extra create_dataset arguments (YAML mapping)", "section": None})
    modalities: tuple[str, ...] | None = _key(None, "None = the dataset's modalities")
    num_classes: int | None = _key(None, "None = from the dataset")
    train_split: str = _key("train", "split trained on")
    val_split: str = _key("val", "split evaluated after each eval_interval epochs (picks best/)")
    train_samples: int | None = _key(320, "synthetic sets only: samples generated per split")
    val_samples: int | None = _key(96, "synthetic sets only: validation samples generated")
    image_size: tuple[int, int] | None = _key((64, 80), "synthetic render size / resize target; None = native")
    crop_size: tuple[int, int] | None = _key(None, "training crop (H, W); None = image_size")
    augment: bool = _key(False, "random resized crop + flip + rotation + colour jitter (fusionzoo.data)")
    aug_scale: tuple[float, float] = _key(
        (0.25, 1.0), "resized: crop area fraction range; rescale_pad: image rescale factor range")
    aug_crop: Literal["resized", "rescale_pad"] = _key(
        "resized", "resized: zoom-in crop; rescale_pad: rescale, pad with ignore, crop (CMX, SA-Gate)")
    aug_rotate: float = _key(10.0, "max rotation in degrees (0 = off)")

    batch_size: int = _key(8, "per process; the global batch is batch_size * world size", section="optimization")
    eval_batch_size: int | None = _key(None, "None = batch_size")
    epochs: int = _key(2, "passes over the training set; on --resume a larger value extends the run")
    max_steps_per_epoch: int | None = _key(None, "cap an epoch (smoke tests); None = full pass")
    optimizer: Literal["adamw", "sgd"] = _key("adamw", "AdamW (transformer recipes) or SGD with momentum")
    lr: float = _key(2e-3, "peak learning rate (after warm-up)")
    weight_decay: float = _key(1e-2, "on weight matrices/kernels only (not biases or norms)")
    momentum: float = _key(0.9, "SGD only")
    betas: tuple[float, float] = _key((0.9, 0.999), "AdamW only")
    schedule: Literal["poly", "cosine", "constant"] = _key("poly", "learning-rate decay after warm-up, per step")
    poly_power: float = _key(0.9, 'DeepLab/CMX "poly" decay exponent')
    min_lr: float = _key(0.0, "the schedule's floor")
    warmup_epochs: float = _key(0.0, "linear warm-up from warmup_factor * lr, in epochs (fractional ok)")
    warmup_factor: float = _key(0.1, "warm-up starts at warmup_factor * lr")
    grad_clip: float | None = _key(1.0, "max global gradient L2 norm; None = off")
    label_smoothing: float = _key(0.0, "cross-entropy label smoothing (segmentation)")
    class_weighting: Literal["none", "median_frequency"] = _key(
        "none", "class weights of the loss, counted once over the training labels (ESANet: median_frequency)")
    side_loss_weights: tuple[float, ...] | None = _key(
        None, "deep supervision: a loss weight per model side output (model.side_strides order; mmseg's "
        "auxiliary_head loss_weight); null = off")
    loss_average: Literal["weighted", "pixels"] = _key(
        "weighted", "each loss term / summed class weights of its labelled pixels (ESANet, SA-Gate), or / their "
        "count (ACNet)")
    gate_penalty_weight: float | None = _key(
        None, "purification-gate models (mim_*): weight of the L0 penalty (expected number of open gates) added to "
        "the loss; null = the model's own (MIM: 0.1)")
    gate_lr: float | None = _key(
        None, "purification-gate models (mim_*): learning rate of the gates' own optimizer group (no weight decay, "
        "as MIM's separate gate optimizer); null = lr")
    freeze_bn: bool = _key(False, "BatchNorm in eval mode (running stats fixed, affine still trained)")
    sync_bn: bool = _key(
        True, "under DDP: BN statistics over the global batch (SyncBatchNorm / all-reduce BN on CPU)")

    amp: Literal["off", "bf16", "fp16"] = _key("off", "autocast on GPU; bf16 needs no loss scaling", section="speed")
    channels_last: bool = _key(False, "NHWC memory format: faster convs on tensor cores")
    compile: bool = _key(False, "torch.compile the model (first steps pay the compilation)")
    num_workers: int = _key(0, "DataLoader worker processes (0 = load in the training process)")
    threads: int | None = _key(None, "CPU intra-op threads; None = auto (cores not busy, at least 1)")
    device: str = _key("auto", "auto | cpu | cuda | cuda:N")

    train_missing: tuple[str, ...] = _key(
        (), "withheld in training and evaluation (single-modality baselines)", section="robustness / evaluation")
    modality_dropout: float = _key(0.0, "per-batch probability of training with one modality missing")
    modality_dropout_candidates: tuple[str, ...] | None = _key(None, "None = every modality but the first")
    eval_interval: int = _key(1, "evaluate every N epochs (and always after the last)")
    eval_missing: tuple[str, ...] = _key((), "also evaluate with each of these modalities missing")
    tta: bool = _key(False, "multi-scale + horizontal-flip test-time augmentation")
    tta_scales: tuple[float, ...] = _key((0.75, 1.0, 1.25), "scales of the TTA evaluation")
    tta_flip: bool = _key(True, "TTA also averages the horizontal flip")

    callbacks: tuple[str, ...] = _key(
        ("modality_balance",), "training-time measurements (records -> metrics.jsonl, summaries -> callbacks.json, "
        f"plots in the report); {CALLBACK_HELP}", section="training-time measurements")
    callback_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "settings of the selected callbacks as YAML, one mapping per callback name: "
                "'{ogm_ge: {alpha: 0.3}, grad_direction: {log_every: 5}, epoch_interpret: {images: 32}}'",
        "section": None})
    report: bool = _key(True, "end by writing the interpretability report <run>/report/report.html")

    seed: int = _key(0, "weights, data order, augmentation and modality dropout", section="bookkeeping")
    deterministic: bool = _key(False, "torch.use_deterministic_algorithms (slower on GPU)")
    out_dir: str = _key("runs", "parent folder of run folders")
    run_name: str | None = _key(None, 'None = "<model>-<dataset>-<timestamp>"')
    resume: str | None = _key(None, "a run folder (or its checkpoint folder) to continue exactly")
    checkpoint_interval: int = _key(0, 'also save "last" every N steps; 0 = at epoch ends only')
    checkpoint_minutes: float = _key(
        5.0, 'also save "last" when this many minutes passed since the last save; 0 = off')
    log_interval: int = _key(10, "steps between JSONL train records")
    progress: bool = _key(True, "tqdm progress bar (rank 0)")
    kill_after_step: int | None = _key(None, "testing aid: send kill_signal to this process after global step N")
    kill_signal: Literal["SIGKILL", "SIGINT", "SIGTERM"] = _key(
        "SIGKILL", "testing aid: the signal of kill_after_step")

    def __post_init__(self) -> None:
        check_values(self)


# Fields a recipe card may carry (not configuration); `target` is the published metric.
CARD_KEYS: dict[str, type | tuple[type, ...]] = {
    "paper": str,
    "method": str,
    "reference_code": str,
    "metric": str,
    "target": (int, float, type(None)),  # null where the authors published no figure for this dataset
    "measured": (int, float, type(None)),
    "eval_protocol": str,
    "weights": (str, type(None)),
    "sha256": (str, type(None)),
    "notes": str,
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def valid_keys() -> list[str]:
    """Names of every configuration key, in declaration order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _unknown_key_error(keys: Sequence[str], where: str) -> ConfigError:
    valid = valid_keys()
    hints = []
    for k in keys:
        close = difflib.get_close_matches(k, valid, n=3, cutoff=0.6)
        hints.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return ConfigError(
        f"unknown configuration key(s) {', '.join(hints)} in {where}. Valid keys: {', '.join(valid)}"
    )


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check ``value`` against annotation ``tp`` (YAML/JSON-typed input); lists become tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(f"{where}: key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:  # Optional[X]: X's own message is the precise one
            return _coerce(value, inner[0], key, where)
        for a in inner:
            try:
                return _coerce(value, a, key, where)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: key {key!r} must be one of {list(args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, where) for v in value)
        if len(value) != len(args):
            raise ConfigError(
                f"{where}: key {key!r} expects {len(args)} values ({_type_name(tp)}), got {list(value)!r}"
            )
        return tuple(_coerce(v, a, key, where) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{where}: key {key!r} must map string keys, got {dict(value)!r}")
        return dict(value)
    raise ConfigError(f"internal: unsupported annotation {tp!r} for key {key!r}")  # pragma: no cover


def check_values(cfg: TrainConfig) -> None:
    """Range checks that the type annotations cannot express.

    Raises:
        ConfigError: naming the key, the value and the allowed range.
    """
    def need(cond: bool, key: str, what: str) -> None:
        if not cond:
            raise ConfigError(f"key {key!r} {what}, got {getattr(cfg, key)!r}")

    for key in ("batch_size", "epochs", "eval_interval", "log_interval"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    for key in ("eval_batch_size", "max_steps_per_epoch", "num_classes", "train_samples", "val_samples"):
        v = getattr(cfg, key)
        need(v is None or v >= 1, key, "must be >= 1 or null")
    need(cfg.lr > 0, "lr", "must be > 0")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(0 <= cfg.min_lr <= cfg.lr, "min_lr", "must be in [0, lr]")
    need(cfg.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
    need(0 < cfg.warmup_factor <= 1, "warmup_factor", "must be in (0, 1]")
    need(cfg.grad_clip is None or cfg.grad_clip > 0, "grad_clip", "must be > 0 or null")
    need(0 <= cfg.modality_dropout < 1, "modality_dropout", "must be in [0, 1)")
    need(0 <= cfg.label_smoothing < 1, "label_smoothing", "must be in [0, 1)")
    need(cfg.gate_penalty_weight is None or cfg.gate_penalty_weight >= 0, "gate_penalty_weight", "must be >= 0 or null")
    need(cfg.gate_lr is None or cfg.gate_lr > 0, "gate_lr", "must be > 0 or null")
    need(cfg.side_loss_weights is None or all(w >= 0 for w in cfg.side_loss_weights), "side_loss_weights",
         "must be weights >= 0 (one per side output of the model) or null")
    need(cfg.num_workers >= 0, "num_workers", "must be >= 0")
    need(cfg.threads is None or cfg.threads >= 1, "threads", "must be >= 1 or null")
    need(cfg.checkpoint_interval >= 0, "checkpoint_interval", "must be >= 0")
    need(cfg.checkpoint_minutes >= 0, "checkpoint_minutes", "must be >= 0")
    if cfg.aug_crop == "resized":
        need(0 < cfg.aug_scale[0] <= cfg.aug_scale[1] <= 1, "aug_scale", "must satisfy 0 < min <= max <= 1 (crop area fractions)")
    else:
        need(0 < cfg.aug_scale[0] <= cfg.aug_scale[1], "aug_scale", "must satisfy 0 < min <= max (rescale factors)")
    need(cfg.aug_rotate >= 0, "aug_rotate", "must be >= 0")
    need(len(cfg.tta_scales) >= 1 and all(s > 0 for s in cfg.tta_scales), "tta_scales", "must be positive scales")
    for key in ("image_size", "crop_size"):
        v = getattr(cfg, key)
        need(v is None or (v[0] >= 1 and v[1] >= 1), key, "must be a positive (H, W) or null")
    if cfg.modalities is not None:
        need(len(cfg.modalities) >= 1, "modalities", "must name at least one modality")
        need(len(set(cfg.modalities)) == len(cfg.modalities), "modalities", "must not repeat a modality")
        for key in ("eval_missing", "modality_dropout_candidates", "train_missing"):
            v = getattr(cfg, key) or ()
            unknown = [m for m in v if m not in cfg.modalities]
            need(not unknown, key, f"must name modalities the model uses {list(cfg.modalities)}")
    unknown_cb = [c for c in cfg.callbacks if c not in CALLBACKS]
    need(not unknown_cb, "callbacks", f"must name known callbacks {sorted(CALLBACKS)}")
    unselected = [c for c in cfg.callback_options if c not in cfg.callbacks]
    need(not unselected, "callback_options", f"must configure callbacks that --callbacks selects {list(cfg.callbacks)}")
    need(all(isinstance(v, Mapping) for v in cfg.callback_options.values()), "callback_options",
         "must map each callback name to a mapping of its settings, e.g. {ogm_ge: {alpha: 0.3}}")
    if cfg.modalities is not None:
        need(len(set(cfg.train_missing)) < len(cfg.modalities), "train_missing", "must leave one modality")
    need(
        cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
        "device",
        "must be auto, cpu, cuda or cuda:N",
    )


def validate_card(card: Any, where: str) -> dict[str, Any]:
    """Check a recipe's ``card:`` block (non-configuration facts).

    Raises:
        ConfigError: an unknown card key or a value of the wrong type, naming ``where``.
    """
    if not isinstance(card, Mapping):
        raise ConfigError(f"{where}: 'card' must be a mapping of {sorted(CARD_KEYS)}, got {card!r}")
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown card key(s) {unknown}; valid card keys: {sorted(CARD_KEYS)}")
    for k, v in card.items():
        if not isinstance(v, CARD_KEYS[k]) or isinstance(v, bool):
            raise ConfigError(f"{where}: card key {k!r} has the wrong type: {v!r} ({type(v).__name__})")
    return dict(card)


def config_from_dict(
    values: Mapping[str, Any], base: TrainConfig | None = None, where: str = "config"
) -> TrainConfig:
    """Overlay typed ``values`` on ``base`` (default: the dataclass defaults).

    Raises:
        ConfigError: unknown keys (listing the valid ones) or a value of the wrong type.
    """
    hints = _field_types()
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise _unknown_key_error(unknown, where)
    merged = config_to_dict(base) if base is not None else {}
    for k, v in values.items():
        merged[k] = _coerce(v, hints[k], k, where)
    for k in list(merged):
        merged[k] = _coerce(merged[k], hints[k], k, where)
    return TrainConfig(**merged)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """JSON-able dict of every key (tuples become lists when serialized)."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _read_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The keys of a YAML recipe and its validated ``card`` block (``{}`` if none)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    card = validate_card(data.pop("card"), str(path)) if "card" in data else {}
    return data, card


def load_config(path: str | Path, base: TrainConfig | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """Read a YAML recipe; returns the config and its validated ``card`` block (``{}`` if none).

    Raises:
        ConfigError: the file is missing, not a mapping, or has unknown keys / bad values.
    """
    data, card = _read_recipe(path)
    return config_from_dict(data, base, where=str(path)), card


# --------------------------------------------------------------------------------------------
# The command line: an argparse parser generated from the TrainConfig fields.


class CommandLine(typing.NamedTuple):
    """What :func:`parse_command_line` read: the config, the recipe's card, and the keys given."""

    config: TrainConfig
    card: dict[str, Any]
    given: frozenset[str]  # keys set by --key flags or by the --config recipe (a value equal to its default counts)


def _cli_parser(tp: Any) -> Callable[[str], Any]:
    """``argparse`` ``type=`` function turning a command-line string into a value of annotation ``tp``.

    The value is then checked against ``tp`` by :func:`config_from_dict`, as YAML values are.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # only Optional[X] is used: "none" clears the key
        inner = _cli_parser(next(a for a in args if a is not type(None)))
        return lambda text: None if text.lower() in ("none", "null") else inner(text)
    if tp is bool:
        return _parse_bool
    if tp in (int, float):
        what = "an integer" if tp is int else "a number"

        def number(text: str) -> int | float:
            try:
                return tp(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expects {what}, got {text!r}") from None

        return number
    if origin is tuple:
        elem = _cli_parser(args[0])
        numeric = args[0] in (int, float)  # "96x128" = "96,128"; an empty string is the empty tuple

        def items(text: str) -> tuple[Any, ...]:
            parts = (text.replace("x", ",") if numeric else text).split(",")
            return tuple(elem(p.strip()) for p in parts if p.strip())

        return items
    if origin is dict:
        return _parse_mapping
    return str  # str and Literal (argparse checks the choices)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expects a boolean (true/false), got {text!r}")


def _parse_mapping(text: str) -> dict[str, Any]:
    """A YAML mapping (``--model-kwargs "{dropout: 0.1}"``), explaining YAML's own surprises."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"the value is YAML and must be a mapping like '{{a: 1}}', got {text!r}: {e}")
    value = {} if value is None else value
    if not isinstance(value, Mapping):
        raise argparse.ArgumentTypeError(
            f"the value is YAML and must be a mapping like '{{a: 1}}'; {text!r} parsed as {value!r} "
            f"({type(value).__name__})"
        )
    # '{dropout:0.0}' is the one-key mapping {'dropout:0.0': None}: YAML needs a space after ':'.
    glued = [k for k, v in value.items() if v is None and isinstance(k, str) and ":" in k]
    if glued:
        fixed = ", ".join(f"{k.split(':', 1)[0]}: {k.split(':', 1)[1]}" for k in glued)
        raise argparse.ArgumentTypeError(
            f"the value is YAML: {text!r} parsed as {value!r} (a key {glued[0]!r} without a value); "
            f"YAML needs a space after each colon: '{{{fixed}}}'"
        )
    return dict(value)


def _metavar(tp: Any) -> str | None:
    """How ``--help`` shows a value of annotation ``tp`` (``None``: argparse's ``{choices}``)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return None
    if origin in (typing.Union, types.UnionType):
        return "|".join(_metavar(a) or "" for a in args if a is not type(None)) + "|none"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"{_type_name(args[0])},..."
        return ",".join(_type_name(a) for a in args)
    if origin is dict:
        return "YAML"
    return _type_name(tp)


class _ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`ConfigError` instead of printing usage and exiting, so the caller (train.py via
    ``fusionzoo.cli.run_command``) prints one line and exits with status 2."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def _parser() -> argparse.ArgumentParser:
    """The ``train.py`` parser: ``--config`` plus one flag per :class:`TrainConfig` field.

    Every key defaults to ``argparse.SUPPRESS``, so the namespace holds exactly the keys given.
    """
    p = _ArgumentParser(
        prog="train.py",
        usage="train.py [--config zoo/<model>/<dataset>.yaml] [--key value ...] [--resume RUN] [--debug]",
        description=(
            "Every key below is also a YAML recipe key (precedence: defaults < --config < --key value). "
            "Keys may be written --eval-missing or --eval_missing. Booleans: --flag, --no-flag, --flag false. "
            "Tuples: comma lists (--modalities rgb,depth, --image-size 480,640). 'none' clears an optional "
            "key. --debug prints the full traceback of an error."
        ),
        allow_abbrev=False,  # --epoch is an unknown key (with a suggestion), not --epochs
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--config", metavar="FILE", help="a YAML recipe, e.g. zoo/<model>/<dataset>.yaml")
    hints = _field_types()
    defaults = TrainConfig()
    group: Any = p
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("section"):
            group = p.add_argument_group(f.metadata["section"])
        tp, flag = hints[f.name], "--" + f.name.replace("_", "-")
        # A field declared without _key() still parses; tests/test_silent_engine.py names it.
        desc = f"{f.metadata.get('help', '')} (default: {getattr(defaults, f.name)!r})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, nargs="?", const=True, type=_parse_bool, metavar="BOOL",
                               help=f"{desc}; --no-{flag[2:]} = false")
            group.add_argument(f"--no-{flag[2:]}", dest=f.name, action="store_false", help=argparse.SUPPRESS)
            continue
        choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else None
        group.add_argument(flag, dest=f.name, type=_cli_parser(tp), choices=choices, metavar=_metavar(tp),
                           help=desc)
    return p


def help_text() -> str:
    """``train.py --help``: every key with its choices or type, its default and its description."""
    return _parser().format_help()


def _dashed(token: str) -> str:
    """``--eval_missing=a_b`` -> ``--eval-missing=a_b``: flags take either spelling, values keep theirs."""
    if not token.startswith("--"):
        return token
    name, eq, value = token[2:].partition("=")
    return f"--{name.replace('_', '-')}{eq}{value}"


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """``(config, card)`` of :func:`parse_command_line` (which also says which keys were given)."""
    parsed = parse_command_line(argv)
    return parsed.config, parsed.card


def parse_command_line(argv: Sequence[str] | None = None) -> CommandLine:
    """Parse ``[--config FILE] [--key value | --key=value | --flag | --no-flag]...``.

    Keys use ``-`` or ``_`` (``--eval-missing depth`` = ``--eval_missing depth``). A boolean key
    alone (``--compile``) means true, ``--no-compile`` false. Tuples are comma lists
    (``--modalities rgb,thermal``, ``--image-size 96,128``); ``none`` clears an optional key.

    Returns:
        The resolved config, the recipe's card (``{}`` without ``--config``) and the set of keys
        the command line or the recipe set (``--resume`` compares exactly these with the run's).

    Raises:
        ConfigError: an unknown key (suggesting close matches and listing the valid ones), a
            missing value, or a bad value.
    """
    argv = [_dashed(a) for a in (sys.argv[1:] if argv is None else argv)]
    namespace, extras = _parser().parse_known_args(argv)
    unknown = [a[2:].partition("=")[0].replace("-", "_") for a in extras if a.startswith("--")]
    if unknown:
        raise _unknown_key_error(unknown, "the command line")
    if extras:
        raise ConfigError(f"unexpected argument {extras[0]!r}; options look like --key value")
    overrides = vars(namespace)
    config_path = overrides.pop("config", None)
    card: dict[str, Any] = {}
    base = None
    given = set(overrides)
    if config_path is not None:
        recipe, card = _read_recipe(config_path)
        base = config_from_dict(recipe, where=str(config_path))
        given |= set(recipe)
    cfg = config_from_dict(overrides, base, where="the command line")
    return CommandLine(cfg, card, frozenset(given))


def write_config(cfg: TrainConfig, path: str | Path, extra: Mapping[str, Any] | None = None) -> None:
    """Write the resolved config as JSON (atomically), optionally with extra facts (e.g. world size)."""
    data: dict[str, Any] = config_to_dict(cfg)
    if extra:
        data = {**data, "_resolved": dict(extra)}
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())
