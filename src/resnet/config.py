"""params.yaml: one dataclass per section, validated on load.

Every knob of the pipeline lives in params.yaml, one section per stage (the DVC
convention). Loading checks every key, type and range before any work starts, and a
mistake raises :class:`ConfigError` naming the key (``train.lr``), the bad value and
what is allowed. Unknown keys are errors too: a typo must not silently fall back to a
default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from resnet.models import MODEL_OPTIONS, SHORTCUTS, STEMS, list_models
from resnet.utils import PipelineError, flatten

__all__ = [
    "ConfigError",
    "DataParams",
    "ModelParams",
    "AugmentParams",
    "TrainParams",
    "ValidateParams",
    "EvaluateParams",
    "RegisterParams",
    "TrackingParams",
    "Params",
    "load_params",
    "parse_params",
    "to_flat_dict",
    "CIFAR10_URL",
    "CIFAR100_URL",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class ConfigError(PipelineError, ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def _opt(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, ge: float | None = None,
         gt: float | None = None, le: float | None = None, lt: float | None = None,
         help: str = "") -> Any:
    """A dataclass field with its validation rules in metadata."""
    meta = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataParams:
    """`data` section: where the images come from and how they are split."""

    dataset: str = _opt("cifar10", choices=("cifar10", "cifar100", "imagefolder"))
    # URL (http, https, file://) or local path of the archive; for imagefolder also a directory.
    source: str = _opt(CIFAR10_URL)
    # Expected sha256 of the archive; null uses the known checksum of the official archives.
    sha256: str | None = _opt(None)
    val_fraction: float = _opt(0.1, gt=0.0, lt=1.0)
    # Only for image folders without a test split: the fraction carved from train for test.
    test_fraction: float = _opt(0.2, gt=0.0, lt=1.0)
    seed: int = _opt(0, ge=0)
    # Resize every image to image_size x image_size (null keeps the native size).
    image_size: int | None = _opt(None, ge=8, le=1024)
    # 3 = RGB, 1 = grayscale; images are converted on decode.
    channels: int = _opt(3, choices=(1, 3))
    # Cap on images per class in the train(+val) pool, for quick runs (null = all).
    max_per_class: int | None = _opt(None, ge=1)
    # Seconds to wait for a network source before failing with a clear error.
    timeout: float = _opt(15.0, gt=0.0)


@dataclass
class ModelParams:
    """`model` section: which ResNet, built by name."""

    name: str = _opt("resnet20", choices=tuple(list_models()))
    stem: str | None = _opt(None, choices=(None, *STEMS))
    shortcut: str = _opt("B", choices=SHORTCUTS)
    width_multiplier: float = _opt(1.0, gt=0.0, le=16.0)
    zero_init_residual: bool = _opt(False)
    # Fine-tuning: a local checkpoint (ours or a torchvision ResNet state dict) to start from.
    pretrained: str | None = _opt(None)
    # With pretrained: train only the classifier head.
    freeze_backbone: bool = _opt(False)

    def build_options(self) -> dict[str, Any]:
        """The keyword options build_model takes."""
        opts = {k: getattr(self, k) for k in MODEL_OPTIONS}
        return {k: v for k, v in opts.items() if v is not None}


@dataclass
class AugmentParams:
    """`train.augment`: batch augmentation done on the training device."""

    crop_padding: int = _opt(4, ge=0, le=64)
    flip: bool = _opt(True)
    # Side of the square cutout (DeVries & Taylor 2017); 0 disables it.
    cutout: int = _opt(0, ge=0, le=256)


@dataclass
class TrainParams:
    """`train` section: the recipe."""

    epochs: int = _opt(30, ge=1)
    batch_size: int = _opt(128, ge=1)
    optimizer: str = _opt("sgd", choices=("sgd", "adamw"))
    lr: float = _opt(0.1, gt=0.0)
    momentum: float = _opt(0.9, ge=0.0, lt=1.0)
    nesterov: bool = _opt(True)
    weight_decay: float = _opt(5e-4, ge=0.0)
    # Exclude BatchNorm weights and biases from weight decay.
    no_decay_norm_bias: bool = _opt(True)
    schedule: str = _opt("onecycle", choices=("cosine", "onecycle", "multistep", "constant"))
    # multistep: epochs at which the learning rate is multiplied by gamma.
    milestones: list[int] = _opt([], help="epochs, for schedule=multistep")
    gamma: float = _opt(0.1, gt=0.0, le=1.0)
    # Linear warm-up from lr/10 over this many epochs (cosine, multistep, constant).
    warmup_epochs: float = _opt(0.0, ge=0.0)
    label_smoothing: float = _opt(0.0, ge=0.0, lt=1.0)
    # Clip the global gradient norm to this value (null = no clipping).
    grad_clip: float | None = _opt(None, gt=0.0)
    precision: str = _opt("fp32", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = _opt(False)
    compile: bool = _opt(False)
    seed: int = _opt(0, ge=0)
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    # CPU threads for torch (0 = all cores).
    num_threads: int = _opt(0, ge=0)
    eval_every: int = _opt(1, ge=1)
    early_stopping_metric: str = _opt("val_accuracy", choices=("val_accuracy", "val_loss"))
    # Stop after this many evaluations without improvement (0 = never stop early).
    early_stopping_patience: int = _opt(0, ge=0)
    augment: AugmentParams = field(default_factory=AugmentParams)


@dataclass
class ValidateParams:
    """`validate` section: evaluation of a checkpoint on the validation split."""

    checkpoint: str = _opt("best", choices=("best", "last"))
    batch_size: int = _opt(500, ge=1)


@dataclass
class EvaluateParams:
    """`evaluate` section: the final model on the test split."""

    checkpoint: str = _opt("best", choices=("best", "last"))
    batch_size: int = _opt(500, ge=1)
    # How many misclassified test images the PNG grid shows.
    misclassified_examples: int = _opt(36, ge=0, le=400)


@dataclass
class RegisterParams:
    """`register` section: the MLflow Model Registry."""

    model_name: str = _opt("cifar10-resnet")
    # Test metric that decides whether the new version becomes the champion.
    metric: str = _opt("test_accuracy", choices=("test_accuracy", "test_top5_accuracy"))


@dataclass
class TrackingParams:
    """`tracking` section: where MLflow writes (MLFLOW_TRACKING_URI overrides uri)."""

    # null = SQLite store mlflow.db and artifacts mlartifacts/ at the repository root.
    uri: str | None = _opt(None)
    experiment: str = _opt("resnet-pipeline")


@dataclass
class Params:
    """The whole params.yaml."""

    data: DataParams = field(default_factory=DataParams)
    model: ModelParams = field(default_factory=ModelParams)
    train: TrainParams = field(default_factory=TrainParams)
    validate: ValidateParams = field(default_factory=ValidateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    register: RegisterParams = field(default_factory=RegisterParams)
    tracking: TrackingParams = field(default_factory=TrackingParams)


def _type_name(tp: Any) -> str:
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check value against the annotation tp; return it (floats from ints or '5e-4' strings)."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, get_args(tp)[0]) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 reads 5e-4 (no dot) as a string; accept it as the number it means.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module


def _check_rules(key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        shown = ["null" if c is None else c for c in choices]
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {shown}")
    if value is None or isinstance(value, (str, list, bool)):
        return
    tests = {"ge": (">=", lambda b: value >= b), "gt": (">", lambda b: value > b),
             "le": ("<=", lambda b: value <= b), "lt": ("<", lambda b: value < b)}
    if all(meta.get(rule) is None or ok(meta[rule]) for rule, (_, ok) in tests.items()):
        return
    bounds = " and ".join(f"{sym} {meta[rule]}" for rule, (sym, _) in tests.items() if meta.get(rule) is not None)
    raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass cls from a mapping, validating every key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section '{prefix}'" if prefix else "params.yaml"
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys are {sorted(fields)}")
    hints = get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        value = _coerce(key, value, hints[name])
        _check_rules(key, value, fields[name].metadata)
        values[name] = value
    return cls(**values)


def _check_cross_field(p: Params) -> None:
    """Rules that involve more than one key."""
    if p.train.schedule == "multistep":
        ms = p.train.milestones
        if not ms or sorted(ms) != ms or ms[0] < 1 or ms[-1] > p.train.epochs:
            raise ConfigError(
                f"train.milestones: {ms!r} must be a non-empty increasing list of epochs within "
                f"1..train.epochs ({p.train.epochs}) when train.schedule is multistep"
            )
    if p.train.warmup_epochs >= p.train.epochs:
        raise ConfigError(f"train.warmup_epochs: {p.train.warmup_epochs} must be below train.epochs ({p.train.epochs})")
    if p.model.freeze_backbone and not p.model.pretrained:
        raise ConfigError("model.freeze_backbone: true needs model.pretrained (a checkpoint path) to start from")
    if p.data.sha256 is not None and (len(p.data.sha256) != 64 or
                                      any(c not in "0123456789abcdef" for c in p.data.sha256.lower())):
        raise ConfigError(f"data.sha256: {p.data.sha256!r} is not a 64-character hex sha256 digest")


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping (as read from YAML) into :class:`Params`."""
    params = _build(Params, raw, "")
    _check_cross_field(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ConfigError naming the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run from the repository root or pass the path to params.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    return parse_params(raw)


def to_flat_dict(obj: Any) -> dict[str, Any]:
    """Flatten a params dataclass into {'train.lr': 0.1, 'train.augment.flip': True, ...}."""
    return flatten(dataclasses.asdict(obj))
