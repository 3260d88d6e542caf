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

from resnet.models import BLOCKS, MODEL_OPTIONS, SHORTCUTS, STEMS, describe_model, list_models
from resnet.tta import TTA_MODES
from resnet.utils import PipelineError, flatten

__all__ = [
    "ConfigError",
    "DataParams",
    "ModelParams",
    "AugmentParams",
    "EmaParams",
    "TrainParams",
    "ValidateParams",
    "EvaluateParams",
    "RegisterParams",
    "TrackingParams",
    "DistributedParams",
    "Params",
    "load_params",
    "parse_params",
    "override",
    "to_flat_dict",
    "CIFAR10_URL",
    "CIFAR100_URL",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class ConfigError(PipelineError, ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def _opt(
    *,
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    help: str = "",
) -> Any:
    """A required field with its validation rules in metadata (the value comes from params.yaml)."""
    return field(metadata={"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt, "help": help})


def _section() -> Any:
    """A nested section: required too, validated key by key."""
    return field(metadata={})


@dataclass
class DataParams:
    """`data` section: where the images come from and how they are split."""

    dataset: str = _opt(choices=("cifar10", "cifar100", "imagefolder"))
    # URL (http, https, file://) or local path of the archive; for imagefolder also a directory.
    source: str = _opt()
    # Expected sha256 of the archive; null uses the known checksum of the official archives.
    sha256: str | None = _opt()
    val_fraction: float = _opt(gt=0.0, lt=1.0)
    # Only for image folders without a test split: the fraction carved from train for test.
    test_fraction: float = _opt(gt=0.0, lt=1.0)
    seed: int = _opt(ge=0)
    # Resize every image to image_size x image_size (null keeps the native size).
    image_size: int | None = _opt(ge=8, le=1024)
    # 3 = RGB, 1 = grayscale; images are converted on decode.
    channels: int = _opt(choices=(1, 3))
    # Cap on images per class in the train(+val) pool, for quick runs (null = all).
    max_per_class: int | None = _opt(ge=1)
    # Seconds to wait for a network source before failing with a clear error.
    timeout: float = _opt(gt=0.0)
    # A split of more MB than this is not copied to the training device whole but streamed
    # from its file batch by batch (same batches, bit for bit); 0 = always stream.
    max_resident_mb: int = _opt(ge=0)

    @property
    def max_resident_bytes(self) -> int:
        return self.max_resident_mb << 20


@dataclass
class ModelParams:
    """`model` section: which ResNet, built by name."""

    name: str = _opt(choices=tuple(list_models()))
    stem: str | None = _opt(choices=(None, *STEMS))
    shortcut: str = _opt(choices=SHORTCUTS)
    width_multiplier: float = _opt(gt=0.0, le=16.0)
    zero_init_residual: bool = _opt()
    # Fine-tuning: a local checkpoint (ours or a torchvision ResNet state dict) to start from.
    pretrained: str | None = _opt()
    # With pretrained: train only the classifier head.
    freeze_backbone: bool = _opt()
    # Test-time augmentation of every prediction (validation, test, the registered model): resnet.tta.
    tta: str = _opt(choices=TTA_MODES)
    # Only with name: custom, a network of your own: block type, blocks per stage, stage widths.
    block: str | None = _opt(choices=(None, *BLOCKS))
    layers: list[int] = _opt()
    widths: list[int] = _opt()

    def build_options(self) -> dict[str, Any]:
        """The keyword options build_model takes (unset ones left out: build_model's defaults apply)."""
        opts = {k: getattr(self, k) for k in MODEL_OPTIONS}
        return {k: v for k, v in opts.items() if v is not None and v != []}

    @property
    def label(self) -> str:
        """The model's short name for runs and versions (a custom network's layout, e.g. custom-basic-2.2-16.32)."""
        return describe_model(self.name, self.build_options())


@dataclass
class AugmentParams:
    """`train.augment`: batch augmentation done on the training device."""

    crop_padding: int = _opt(ge=0, le=64)
    # true: flip each image with probability 1/2; alternate: each image every other epoch (airbench).
    flip: bool | str = _opt(choices=(True, False, "alternate"))
    # Side of the square cutout (DeVries & Taylor 2017); 0 disables it.
    cutout: int = _opt(ge=0, le=256)
    # Random-resized crop (Inception's, torchvision's RandomResizedCrop): a box of this
    # fraction of the image's area or more (up to all), aspect 3/4..4/3, resized back; 0 = off.
    resized_crop_scale: float = _opt(ge=0.0, le=1.0)


@dataclass
class EmaParams:
    """`train.ema`: an exponential moving average of the weights, validated and saved instead of them (resnet.ema)."""

    # Weight of the old average at each update; 0 = off (the training weights are saved).
    decay: float = _opt(ge=0.0, lt=1.0)
    # Optimizer steps between updates (each is one pass over the weights).
    every: int = _opt(ge=1, le=100000)
    # Decay min(decay, (1 + n) / (10 + n)) after n updates: early averages forget the initial weights.
    warmup: bool = _opt()
    # Copy the average back into the training weights after each update (Lookahead, airbench).
    lookahead: bool = _opt()


@dataclass
class TrainParams:
    """`train` section: the recipe."""

    epochs: int = _opt(ge=1)
    batch_size: int = _opt(ge=1)
    optimizer: str = _opt(choices=("sgd", "adam", "adamw"))
    lr: float = _opt(gt=0.0)
    momentum: float = _opt(ge=0.0, lt=1.0)
    nesterov: bool = _opt()
    weight_decay: float = _opt(ge=0.0)
    # Exclude BatchNorm weights and biases from weight decay.
    no_decay_norm_bias: bool = _opt()
    # Learning rate of 1-d parameters (BatchNorm weights and biases, biases) = lr x this.
    norm_bias_lr_scale: float = _opt(gt=0.0, le=1000.0)
    schedule: str = _opt(choices=("cosine", "onecycle", "multistep", "constant"))
    # multistep: epochs at which the learning rate is multiplied by gamma.
    milestones: list[int] = _opt(help="epochs, for schedule=multistep")
    gamma: float = _opt(gt=0.0, le=1.0)
    # Linear warm-up from lr/10 over this many epochs (cosine, multistep, constant).
    warmup_epochs: float = _opt(ge=0.0)
    label_smoothing: float = _opt(ge=0.0, lt=1.0)
    # Clip the global gradient norm to this value (null = no clipping).
    grad_clip: float | None = _opt(gt=0.0)
    precision: str = _opt(choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _opt()
    compile: bool = _opt()
    seed: int = _opt(ge=0)
    device: str = _opt(choices=("auto", "cpu", "cuda"))
    # CPU threads for torch (0 = all cores).
    num_threads: int = _opt(ge=0)
    eval_every: int = _opt(ge=1)
    early_stopping_metric: str = _opt(choices=("val_accuracy", "val_loss"))
    # Stop after this many evaluations without improvement (0 = never stop early).
    early_stopping_patience: int = _opt(ge=0)
    augment: AugmentParams = _section()
    ema: EmaParams = _section()


@dataclass
class ValidateParams:
    """`validate` section: evaluation of a checkpoint on the validation split."""

    checkpoint: str = _opt(choices=("best", "last"))
    batch_size: int = _opt(ge=1)


@dataclass
class EvaluateParams:
    """`evaluate` section: the final model on the test split."""

    checkpoint: str = _opt(choices=("best", "last"))
    batch_size: int = _opt(ge=1)
    # How many misclassified test images the PNG grid shows.
    misclassified_examples: int = _opt(ge=0, le=400)


@dataclass
class RegisterParams:
    """`register` section: the MLflow Model Registry."""

    model_name: str = _opt()
    # Test metric that decides whether the new version becomes the champion.
    metric: str = _opt(choices=("test_accuracy", "test_top5_accuracy"))
    # Refuse to register a model whose test accuracy is not significantly above chance.
    refuse_at_chance: bool = _opt()


@dataclass
class TrackingParams:
    """`tracking` section: where MLflow writes (MLFLOW_TRACKING_URI overrides uri)."""

    # null = SQLite store mlflow.db and artifacts mlartifacts/ at the repository root.
    uri: str | None = _opt()
    experiment: str = _opt()
    # CPU, memory, disk, network (and GPU utilisation and memory where there is one) during
    # training, as system/* metrics of the run, sampled every system_metrics_interval seconds.
    system_metrics: bool = _opt()
    system_metrics_interval: float = _opt(ge=1, le=3600)


@dataclass
class DistributedParams:
    """`distributed` section: how many processes train together (resnet.distributed)."""

    # Processes on this machine (GPUs, or CPU process groups); 1 = one process, no torch.distributed.
    nproc_per_node: int = _opt(ge=1, le=1024)
    # Machines; above 1, every machine runs the train stage with these params in one shared workspace.
    nnodes: int = _opt(ge=1, le=4096)
    # host:port of the c10d rendezvous (a machine every node reaches); null = this machine, a free port.
    rdzv_endpoint: str | None = _opt()
    backend: str = _opt(choices=("auto", "nccl", "gloo"))
    # BatchNorm statistics over the global batch instead of each process's share.
    sync_batchnorm: bool = _opt()
    # Micro-batches of train.batch_size summed into one optimizer step.
    accumulation_steps: int = _opt(ge=1, le=1024)
    # Times the launcher restarts all processes after one fails (they resume from models/last.pt).
    max_restarts: int = _opt(ge=0, le=100)
    # Seconds to wait for the rendezvous, for a peer, or for one collective before failing.
    timeout: float = _opt(gt=0.0)

    @property
    def world_size(self) -> int:
        """Processes in all (nodes x processes per node)."""
        return self.nnodes * self.nproc_per_node


@dataclass
class Params:
    """The whole params.yaml."""

    data: DataParams = _section()
    model: ModelParams = _section()
    train: TrainParams = _section()
    validate: ValidateParams = _section()
    evaluate: EvaluateParams = _section()
    register: RegisterParams = _section()
    tracking: TrackingParams = _section()
    distributed: DistributedParams = _section()

    @property
    def global_batch(self) -> int:
        """Images per optimizer step: train.batch_size x processes x accumulation steps."""
        d = self.distributed
        return self.train.batch_size * d.world_size * d.accumulation_steps


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
    tests = {
        "ge": (">=", lambda b: value >= b),
        "gt": (">", lambda b: value > b),
        "le": ("<=", lambda b: value <= b),
        "lt": ("<", lambda b: value < b),
    }
    if all(meta.get(rule) is None or ok(meta[rule]) for rule, (_, ok) in tests.items()):
        return
    bounds = " and ".join(f"{sym} {meta[rule]}" for rule, (sym, _) in tests.items() if meta.get(rule) is not None)
    raise ConfigError(f"{key}: {value!r} is out of range; it must be {bounds}")


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass cls from a mapping, validating every key; every field is required."""
    where = f"section '{prefix}'" if prefix else "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params.yaml'}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; valid keys are {sorted(fields)}")
    missing = [name for name in fields if name not in raw]
    if missing:
        # params.yaml is the one source of the recipe: a key that is gone must not fall back to anything.
        key = f"{prefix}.{missing[0]}" if prefix else missing[0]
        more = f" (also missing: {missing[1:]})" if missing[1:] else ""
        raise ConfigError(
            f"{key}: missing from params.yaml{more}; add it back (`git show HEAD:params.yaml` has every key)"
        )
    hints = get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        value = _coerce(key, value, hints[name])
        _check_rules(key, value, fields[name].metadata)
        values[name] = value
    return cls(**values)


def parse_params(raw: Any) -> Params:
    """Validate a parsed params mapping (as read from YAML) into :class:`Params`."""
    if raw is None:
        raise ConfigError(
            "params.yaml is empty; it must hold every section (data, model, train, validate, "
            "evaluate, register, tracking, distributed): restore it, e.g. `git checkout params.yaml`"
        )
    params = _build(Params, raw, "")
    # The rules across keys live in their own module; imported here because they import this one.
    from resnet.config_rules import check_cross_field

    check_cross_field(params)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raises ConfigError naming the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} not found; run from the repository root or pass the path to params.yaml") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}; fix the syntax") from None
    return parse_params(raw)


def override(params: Params, changes: typing.Mapping[str, Any]) -> Params:
    """A copy of params with dotted keys changed (``{"train.lr": 0.05}``), validated like params.yaml."""
    raw = dataclasses.asdict(params)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{key}: no such section in params.yaml")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{key}: no such key in params.yaml; valid keys are {sorted(node)}")
        node[leaf] = value
    return parse_params(raw)


def to_flat_dict(obj: Any) -> dict[str, Any]:
    """Flatten a params dataclass into {'train.lr': 0.1, 'train.augment.flip': True, ...}."""
    return flatten(dataclasses.asdict(obj))
