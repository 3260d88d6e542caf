"""params.yaml's rules across keys, and what a value means on this machine.

:mod:`resnet.config` checks each key on its own (type, range, choices); this module
checks what needs more than one key, or a look at the machine (is there a GPU?) or the
model itself (built on torch's meta device, no memory, no compute). Called by
:func:`resnet.config.parse_params`; every failure is a :class:`ConfigError` naming the
key, the bad value and the fix.
"""

from __future__ import annotations

from pathlib import Path

from resnet.config import ConfigError, DistributedParams, Params, TrainParams

__all__ = ["check_cross_field"]


def _check_schedule(t: TrainParams) -> None:
    if t.schedule == "multistep":
        ms = t.milestones
        if not ms or sorted(set(ms)) != ms or ms[0] < 1 or ms[-1] > t.epochs:
            raise ConfigError(
                f"train.milestones: {ms!r} must be a non-empty strictly increasing list of epochs within "
                f"1..train.epochs ({t.epochs}) when train.schedule is multistep"
            )
    elif t.milestones:
        raise ConfigError(
            f"train.milestones: {t.milestones!r} only applies to train.schedule multistep "
            f"(it is {t.schedule!r}); set milestones: [] or schedule: multistep"
        )
    if t.warmup_epochs >= t.epochs:
        raise ConfigError(f"train.warmup_epochs: {t.warmup_epochs} must be below train.epochs ({t.epochs})")
    if t.ema.lookahead and t.ema.decay == 0:
        raise ConfigError(
            "train.ema.lookahead: true needs train.ema.decay > 0 (it is 0.0, no average to look ahead with); "
            "set a decay such as 0.9, or lookahead: false"
        )
    if t.augment.resized_crop_scale > 0 and t.augment.crop_padding > 0:
        raise ConfigError(
            f"train.augment.resized_crop_scale: {t.augment.resized_crop_scale} with train.augment.crop_padding: "
            f"{t.augment.crop_padding}: two random crops; set crop_padding: 0 (or resized_crop_scale: 0)"
        )
    if t.optimizer == "sgd" and t.nesterov and t.momentum == 0:
        raise ConfigError(
            "train.nesterov: true needs train.momentum > 0 (it is 0.0); set a momentum such as 0.9, or nesterov: false"
        )


def _check_device(t: TrainParams) -> str:
    """The device type train.device resolves to here; 'cuda' without a GPU is an error."""
    import torch

    if t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' but no CUDA GPU is available here; set it to 'auto' or 'cpu'")
    return "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"


def _check_model(p: Params) -> None:
    """Build the model on torch's meta device (no memory, no compute) to catch what only building shows."""
    import torch

    from resnet.models import ARCHITECTURES, CUSTOM, CUSTOM_OPTIONS, FAMILY_STEMS, build_model, narrow_strided_convs

    m = p.model
    custom_keys = [f"model.{k}" for k in CUSTOM_OPTIONS if getattr(m, k) not in (None, [])]
    if m.name != CUSTOM and custom_keys:
        raise ConfigError(
            f"{custom_keys[0]}: only describes model.name: {CUSTOM} (it is {m.name!r}); set model.block: null, "
            "model.layers: [] and model.widths: [], or model.name: custom"
        )
    family = "custom" if m.name == CUSTOM else ARCHITECTURES[m.name].family
    if family == "cifar" and m.stem not in (None, "cifar"):
        raise ConfigError(
            f"model.stem: {m.stem!r} does not apply to {m.name}, a CIFAR-family model with a fixed "
            "3x3 stem; set model.stem: null (stems are for resnet18/34/50/101/152 and resnet9)"
        )
    if m.stem is not None and m.stem not in FAMILY_STEMS[family]:
        raise ConfigError(
            f"model.stem: {m.stem!r} does not apply to {m.name}; choose one of {list(FAMILY_STEMS[family])} "
            f"or null ({FAMILY_STEMS[family][0]})"
        )
    if m.freeze_backbone and not m.pretrained:
        raise ConfigError("model.freeze_backbone: true needs model.pretrained (a checkpoint path) to start from")
    if m.pretrained and not Path(m.pretrained).is_file():
        raise ConfigError(
            f"model.pretrained: {m.pretrained!r} is not a file; give the path of a checkpoint "
            "(ours or a torchvision ResNet state dict), or null to train from scratch"
        )
    try:
        with torch.device("meta"):
            model = build_model(m.name, 10, p.data.channels, **m.build_options())
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    # oneDNN's NHWC backward of narrow 1x1 stride-2 convolutions crashes or computes wrong gradients on CPU
    # (uxlfoundation/oneDNN#6035); torch.compile's CPU backend picks NHWC for convolutions too.
    nhwc = [k for k, on in (("train.channels_last", p.train.channels_last), ("train.compile", p.train.compile)) if on]
    narrow = narrow_strided_convs(model) if nhwc and not m.freeze_backbone else []
    if narrow and _check_device(p.train) == "cpu":
        name, channels = narrow[0]
        raise ConfigError(
            f"{nhwc[0]}: true on CPU cannot train this model: the 1x1 stride-2 convolution {name} has {channels} "
            "input channels (< 16), which oneDNN's NHWC backward pass mishandles (crash, hang or wrong gradients; "
            f"uxlfoundation/oneDNN#6035); set {nhwc[0]}: false, or use model.shortcut: A or a larger "
            "model.width_multiplier"
        )


def _check_distributed(d: DistributedParams, device_type: str) -> None:
    import torch

    if d.rdzv_endpoint is not None:
        host, _, port = d.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(
                f"distributed.rdzv_endpoint: {d.rdzv_endpoint!r} is not host:port (e.g. node0.example.org:29400)"
            )
    elif d.nnodes > 1:
        raise ConfigError(
            f"distributed.rdzv_endpoint: null, but distributed.nnodes is {d.nnodes}; give the host:port that "
            "every machine reaches (the first node's address and a free port, e.g. node0:29400)"
        )
    if d.backend == "nccl" and device_type != "cuda":
        raise ConfigError("distributed.backend: 'nccl' needs CUDA GPUs; set it to 'auto' (gloo on CPU) or 'gloo'")
    if device_type == "cuda" and d.nproc_per_node > torch.cuda.device_count():
        raise ConfigError(
            f"distributed.nproc_per_node: {d.nproc_per_node} processes but {torch.cuda.device_count()} GPU(s) "
            "here; use one process per GPU at most"
        )


def check_cross_field(p: Params) -> None:
    """Rules that involve more than one key, or what a value means on this machine."""
    _check_schedule(p.train)
    _check_distributed(p.distributed, _check_device(p.train))
    _check_model(p)
    if p.data.sha256 is not None and (
        len(p.data.sha256) != 64 or any(c not in "0123456789abcdef" for c in p.data.sha256.lower())
    ):
        raise ConfigError(f"data.sha256: {p.data.sha256!r} is not a 64-character hex sha256 digest")
