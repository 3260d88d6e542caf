"""ResNets written from scratch: the ImageNet family and the CIFAR family of He et al.

Reads top to bottom: conv helpers, the two residual blocks, the network, then the
registry of named architectures and :func:`build_model`, the one entry point.

Two families share the same code:

* four stages, widths 64-128-256-512 (resnet18/34/50/101/152, He et al. 2015,
  table 1). With the ImageNet stem and 1000 classes these are state-dict
  compatible with ``torchvision.models``: same parameter and buffer names and
  shapes, so torchvision checkpoints load with ``strict=True``.
* three stages, widths 16-32-64, 6n+2 layers (resnet20/32/44/56/110, section 4.2),
  always with a 3x3 stride-1 stem for 32x32 images.

A third, ``resnet9`` (Myrtle's ResNet-9 layout with airbench's patch-whitening stem,
built for fast training), lives in :mod:`resnet.fastnet` and is built here by name too.

And ``custom``: any stack of the same blocks described by options (block type, blocks
per stage, widths, stem, shortcut), so a tutorial's small network is a few params, not
new code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet.fastnet import RESNET9_WIDTHS, ResNet9

__all__ = [
    "conv3x3",
    "conv1x1",
    "BasicBlock",
    "Bottleneck",
    "ShortcutA",
    "ResNet",
    "ArchSpec",
    "ARCHITECTURES",
    "STEMS",
    "FAMILY_STEMS",
    "narrow_strided_convs",
    "SHORTCUTS",
    "BLOCKS",
    "CUSTOM",
    "list_models",
    "describe_model",
    "build_model",
    "count_parameters",
]

STEMS = ("imagenet", "cifar", "whiten")
#: The stems each family accepts; the first is its default.
FAMILY_STEMS = {
    "imagenet": ("imagenet", "cifar"),
    "cifar": ("cifar",),
    "resnet9": ("whiten", "cifar"),
    # Custom networks are mostly the small ones of tutorials, for small images: the 3x3 stem first.
    "custom": ("cifar", "imagenet"),
}
SHORTCUTS = ("A", "B")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, used for bottlenecks and projection shortcuts."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ShortcutA(nn.Module):
    """Parameter-free shortcut (option A of the paper): subsample, then zero-pad channels.

    Used by the paper's CIFAR models so that the residual network has exactly the
    parameter count of its plain counterpart.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"shortcut 'A' cannot reduce channels ({in_planes} -> {out_planes}); use 'B'")
        self.stride = stride
        self.extra = out_planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # Pad zeros on the channel dimension only, split evenly like the paper's code.
        front = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, front, self.extra - front))


def _shortcut(kind: str, in_planes: int, out_planes: int, stride: int) -> nn.Module | None:
    """The shortcut a block needs when its output shape differs from its input; None if identity."""
    if stride == 1 and in_planes == out_planes:
        return None
    if kind == "A":
        return ShortcutA(in_planes, out_planes, stride)
    # Option B: 1x1 projection. The Sequential keeps torchvision's names (downsample.0/1).
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or projection) shortcut."""

    expansion: int = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _shortcut(shortcut, in_planes, planes * self.expansion, stride)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)

        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4).

    The stride sits on the 3x3 convolution, not the first 1x1 ("ResNet V1.5", as in
    torchvision): it keeps more spatial information and is about 0.5% more accurate.
    """

    expansion: int = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "B") -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(shortcut, in_planes, planes * self.expansion, stride)
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        out += identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A residual network: stem, one stage per entry of ``layers``, global pool, linear head.

    Args:
        block: BasicBlock or Bottleneck.
        layers: blocks per stage; the first stage keeps the resolution, each later
            one halves it and doubles the width.
        widths: base width of each stage (before the block's expansion).
        num_classes: size of the classifier.
        in_channels: 3 for RGB, 1 for grayscale.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool) or "cifar" (3x3/1 conv, no pool).
        shortcut: "B" (1x1 projection when shapes change) or "A" (zero-padding identity).
        zero_init_residual: start each residual branch's last BatchNorm at zero, so
            every block begins as the identity (Goyal et al. 2017); helps large batches.
    """

    def __init__(
        self,
        block: Block,
        layers: list[int],
        widths: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        shortcut: str = "B",
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths):
            raise ValueError(f"layers {layers} and widths {widths} must have the same length")
        self.in_planes = widths[0]
        self.shortcut = shortcut

        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, self.in_planes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, self.in_planes)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.in_planes)
        self.relu = nn.ReLU(inplace=True)

        # Stages are plain attributes layer1..layerN, matching torchvision's names.
        self.num_stages = len(layers)
        for i, (blocks, width) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, blocks, stride))

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = widths[-1] * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [block(self.in_planes, planes, stride, self.shortcut)]
        self.in_planes = planes * block.expansion
        layers += [block(self.in_planes, planes, 1, self.shortcut) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He et al. 2015 ("Delving deep into rectifiers"): fan-out keeps the
                # variance of the gradients stable through ReLU networks.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def stages(self) -> list[nn.Sequential]:
        """The residual stages in order (layer1, layer2, ...)."""
        return [getattr(self, f"layer{i + 1}") for i in range(self.num_stages)]

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features before the classifier, shape (N, num_features)."""
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        for stage in self.stages():
            x = stage(x)
        x = self.avgpool(x)
        return torch.flatten(x, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one named architecture from another."""

    block: Block | None  # None: the family's own layout (resnet9)
    layers: tuple[int, ...]
    widths: tuple[int, ...]
    family: str  # "imagenet" (four stages, stem option), "cifar" (three stages, 3x3 stem) or "resnet9"


_IMAGENET_WIDTHS = (64, 128, 256, 512)
_CIFAR_WIDTHS = (16, 32, 64)


def _cifar(n: int) -> ArchSpec:
    # 6n+2 layers: a stem conv, three stages of n two-conv blocks, the classifier.
    return ArchSpec(BasicBlock, (n, n, n), _CIFAR_WIDTHS, "cifar")


ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet18": ArchSpec(BasicBlock, (2, 2, 2, 2), _IMAGENET_WIDTHS, "imagenet"),
    "resnet34": ArchSpec(BasicBlock, (3, 4, 6, 3), _IMAGENET_WIDTHS, "imagenet"),
    "resnet50": ArchSpec(Bottleneck, (3, 4, 6, 3), _IMAGENET_WIDTHS, "imagenet"),
    "resnet101": ArchSpec(Bottleneck, (3, 4, 23, 3), _IMAGENET_WIDTHS, "imagenet"),
    "resnet152": ArchSpec(Bottleneck, (3, 8, 36, 3), _IMAGENET_WIDTHS, "imagenet"),
    "resnet20": _cifar(3),
    "resnet32": _cifar(5),
    "resnet44": _cifar(7),
    "resnet56": _cifar(9),
    "resnet110": _cifar(18),
    "resnet9": ArchSpec(None, (1, 0, 1), RESNET9_WIDTHS, "resnet9"),
}

#: The name of a network described by options (block, layers, widths) instead of a table entry.
CUSTOM = "custom"
BLOCKS: dict[str, Block] = {"basic": BasicBlock, "bottleneck": Bottleneck}
#: The options that describe a custom network; only for CUSTOM.
CUSTOM_OPTIONS = ("block", "layers", "widths")
#: The options build_model accepts besides name, num_classes and in_channels.
MODEL_OPTIONS = ("stem", "shortcut", "width_multiplier", "zero_init_residual", *CUSTOM_OPTIONS)
# Each stage after the first halves the resolution: six take 224 px to 7 px, and 32 px to 1.
MAX_STAGES = 6


def list_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return [*ARCHITECTURES, CUSTOM]


def _custom_spec(options: dict[str, Any]) -> ArchSpec:
    """The ArchSpec of a custom network from its options; ValueError naming the bad one."""
    block, layers, widths = (options.get(k) for k in CUSTOM_OPTIONS)
    if block not in BLOCKS:
        raise ValueError(f"block={block!r} is not valid for model {CUSTOM!r}; choose one of {list(BLOCKS)}")
    for key, values in (("layers", layers), ("widths", widths)):
        ok = isinstance(values, (list, tuple)) and 1 <= len(values) <= MAX_STAGES
        if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(
                f"{key}={values!r} must list 1 to {MAX_STAGES} positive integers for model {CUSTOM!r}, "
                "one per stage (e.g. layers [2, 2] and widths [16, 32])"
            )
    if len(layers) != len(widths):
        raise ValueError(f"layers {list(layers)} and widths {list(widths)} must have one entry per stage each")
    return ArchSpec(BLOCKS[block], tuple(layers), tuple(widths), "custom")


def _spec(name: str, options: dict[str, Any]) -> ArchSpec:
    """The ArchSpec of ``name`` (a custom one from its options); ValueError for a bad name or option."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    unknown = sorted(set(options) - set(MODEL_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options are {list(MODEL_OPTIONS)}")
    if name == CUSTOM:
        return _custom_spec(options)
    layout = sorted(set(options) & set(CUSTOM_OPTIONS))
    if layout:
        raise ValueError(f"options {layout} only describe model {CUSTOM!r}")
    return ARCHITECTURES[name]


def describe_model(name: str, options: dict[str, Any]) -> str:
    """A short name for runs and versions: the name, or for a custom network its layout (custom-basic-2.2-16.32)."""
    if name != CUSTOM:
        return name
    layers, widths = (".".join(str(v) for v in options.get(k, ())) for k in ("layers", "widths"))
    return f"{CUSTOM}-{options.get('block')}-{layers}-{widths}"


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not valid; choose one of {list(allowed)}")
    return value


def build_model(name: str, num_classes: int, in_channels: int = 3, **options: Any) -> ResNet | ResNet9:
    """Build a ResNet by name.

    Args:
        name: one of :func:`list_models`.
        num_classes: size of the classifier.
        in_channels: 3 for RGB, 1 for grayscale.
        **options: any of ``MODEL_OPTIONS``:

        stem: four-stage family: "imagenet" (default) or "cifar" for 32x32 images.
            The CIFAR family always uses its 3x3 stem ("cifar"). resnet9: "whiten"
            (default, set from the data by :func:`resnet.fastnet.init_whitening`) or "cifar".
        shortcut: "B" (projection, default) or "A" (zero-padding identity, the paper's CIFAR choice);
            resnet9's shortcuts are identities whatever this says.
        width_multiplier: scales every stage's width (1.0 = published widths).
        zero_init_residual: zero the last BatchNorm of each residual branch.
        block, layers, widths: only for name "custom": "basic" or "bottleneck", blocks per
            stage and each stage's width (the first stage keeps the resolution, each later
            one halves it); its stem is "cifar" (default) or "imagenet".

    Raises:
        ValueError: an unknown name or a bad option; the message lists the valid choices.
    """
    spec = _spec(name, options)
    stem = options.get("stem")
    shortcut = options.get("shortcut", "B")
    width_multiplier = options.get("width_multiplier", 1.0)
    zero_init_residual = options.get("zero_init_residual", False)

    allowed_stems = FAMILY_STEMS[spec.family]
    stem = _choice("stem", stem or allowed_stems[0], allowed_stems)
    _choice("shortcut", shortcut, SHORTCUTS)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive integer")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels={in_channels!r} is not valid; choose one of [1, 3]")
    if not isinstance(width_multiplier, (int, float)) or not 0 < width_multiplier <= 16:
        raise ValueError(f"width_multiplier={width_multiplier!r} must be a number in (0, 16]")

    widths = [max(1, round(w * width_multiplier)) for w in spec.widths]
    if spec.family == "resnet9":
        if zero_init_residual:
            raise ValueError("zero_init_residual=True does not apply to resnet9 (its BatchNorm scales are fixed at 1)")
        return ResNet9((widths[0], widths[1], widths[2]), num_classes, in_channels, stem)
    return ResNet(
        spec.block,
        list(spec.layers),
        widths,
        num_classes=num_classes,
        in_channels=in_channels,
        stem=stem,
        shortcut=shortcut,
        zero_init_residual=bool(zero_init_residual),
    )


def narrow_strided_convs(model: nn.Module, min_channels: int = 16) -> list[tuple[str, int]]:
    """Trainable 1x1 stride-2 convolutions with fewer than ``min_channels`` inputs: (module name, in_channels).

    oneDNN's NHWC backward pass of such a convolution overruns a workspace when its input has fewer
    channels than the CPU's vector block (8 with AVX2, 16 with AVX-512): uxlfoundation/oneDNN#6035.
    Narrow models (width_multiplier < 1 with shortcut B) have them; params validation refuses
    channels_last and torch.compile on CPU for those.
    """
    return [
        (name, m.in_channels)
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and max(m.stride) > 1
        and m.in_channels < min_channels
        and m.weight.requires_grad
    ]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
