"""The ResNet family: shapes, parameter counts, torchvision parity, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from resnet.models import (
    ARCHITECTURES,
    BasicBlock,
    Bottleneck,
    ShortcutA,
    build_model,
    count_parameters,
    describe_model,
    list_models,
)

FOUR_STAGE = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]


def test_list_models_names_every_architecture() -> None:
    assert list_models() == FOUR_STAGE + CIFAR + ["resnet9", "custom"]


@pytest.mark.parametrize("name", FOUR_STAGE)
@pytest.mark.parametrize("stem,size,in_channels", [("imagenet", 64, 3), ("cifar", 32, 3), ("cifar", 32, 1)])
def test_four_stage_output_shape(name: str, stem: str, size: int, in_channels: int) -> None:
    model = build_model(name, num_classes=7, in_channels=in_channels, stem=stem).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    # The ImageNet stem downsamples 4x before layer1; the CIFAR stem keeps the resolution.
    assert isinstance(model.maxpool, torch.nn.MaxPool2d) == (stem == "imagenet")
    assert model.conv1.kernel_size == ((7, 7) if stem == "imagenet" else (3, 3))


@pytest.mark.parametrize("name", CIFAR)
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_cifar_family_output_shape(name: str, shortcut: str) -> None:
    model = build_model(name, num_classes=10, shortcut=shortcut).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert model.num_stages == 3 and model.num_features == 64
    # 6n+2 layers: n blocks of two convs in each of three stages, plus stem and classifier.
    n = ARCHITECTURES[name].layers[0]
    assert 6 * n + 2 == int(name.removeprefix("resnet"))


def test_cifar_family_features_shrink_to_8x8() -> None:
    model = build_model("resnet20", 10).eval()
    x = torch.randn(1, 3, 32, 32)
    shapes = []
    h = model.relu(model.bn1(model.conv1(x)))
    for stage in model.stages():
        h = stage(h)
        shapes.append(tuple(h.shape[1:]))
    assert shapes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
    ],
)
def test_four_stage_parameter_counts_match_published(name: str, expected: int) -> None:
    assert count_parameters(build_model(name, 1000)) == expected


@pytest.mark.parametrize(
    "name,expected_m",
    [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66), ("resnet56", 0.85), ("resnet110", 1.7)],
)
def test_cifar_parameter_counts_match_paper(name: str, expected_m: float) -> None:
    # He et al. 2015, table 6, report option-A counts: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
    count = count_parameters(build_model(name, 10, shortcut="A"))
    assert abs(count / 1e6 - expected_m) < 0.01 * max(1, expected_m / 0.5)
    # Option B adds only the two 1x1 projections (and their BatchNorms).
    extra = count_parameters(build_model(name, 10, shortcut="B")) - count
    assert extra == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_shortcut_a_is_parameter_free_zero_padding() -> None:
    sc = ShortcutA(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    y = sc(x)
    assert y.shape == (2, 32, 4, 4)
    assert list(sc.parameters()) == []
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


@pytest.mark.parametrize("name", FOUR_STAGE)
def test_torchvision_parity(name: str) -> None:
    """Same names and shapes: torchvision weights load strictly and give the same outputs."""
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    # Make BatchNorm statistics non-trivial so that a swapped buffer would show.
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = build_model(name, num_classes=1000).eval()
    ref_state = reference.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref_state.items()}
    ours.load_state_dict(ref_state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,stem",
    [(n, "imagenet") for n in FOUR_STAGE] + [("resnet18", "cifar"), ("resnet50", "cifar")] + [(n, None) for n in CIFAR],
)
def test_every_parameter_receives_a_gradient(name: str, stem: str | None) -> None:
    options = {"stem": stem} if stem else {"shortcut": "A"} if name == "resnet20" else {}
    model = build_model(name, num_classes=5, **options)
    x = torch.randn(2, 3, 32, 32)
    model(x).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_bottleneck_strides_on_the_3x3_conv() -> None:
    block = Bottleneck(256, 128, stride=2)
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert Bottleneck.expansion == 4 and BasicBlock.expansion == 1


def test_zero_init_residual_makes_blocks_start_as_identity() -> None:
    model = build_model("resnet18", 10, zero_init_residual=True)
    for m in model.modules():
        if isinstance(m, BasicBlock):
            assert torch.count_nonzero(m.bn2.weight) == 0
    model = build_model("resnet50", 10, zero_init_residual=True)
    assert all(torch.count_nonzero(m.bn3.weight) == 0 for m in model.modules() if isinstance(m, Bottleneck))


def test_he_initialisation_of_convolutions() -> None:
    torch.manual_seed(0)
    conv = build_model("resnet50", 10).layer3[0].conv2  # 256 -> 256, 3x3
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() - (2 / fan_out) ** 0.5) < 0.05 * (2 / fan_out) ** 0.5


def test_width_multiplier_scales_every_stage() -> None:
    model = build_model("resnet18", 10, stem="cifar", width_multiplier=0.5)
    assert [s[0].conv1.out_channels for s in model.stages()] == [32, 64, 128, 256]
    assert model.fc.in_features == 256


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"name": "resnet19"}, "resnet18"),
        ({"name": "resnet18", "stem": "tiny"}, "'imagenet', 'cifar'"),
        ({"name": "resnet20", "stem": "imagenet"}, "['cifar']"),
        ({"name": "resnet20", "shortcut": "C"}, "['A', 'B']"),
        ({"name": "resnet20", "widht_multiplier": 2}, "width_multiplier"),
        ({"name": "resnet20", "width_multiplier": 0}, "width_multiplier"),
        ({"name": "resnet20", "in_channels": 2}, "[1, 3]"),
        ({"name": "resnet20", "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_names_and_options_raise_value_error_listing_choices(kwargs: dict, needle: str) -> None:
    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=None) as info:
        build_model(**kwargs)
    assert needle in str(info.value)


# --------------------------------------------------------------------------- custom networks


@pytest.mark.parametrize("name,block", [("resnet18", "basic"), ("resnet50", "bottleneck")])
def test_a_custom_network_with_a_named_layout_is_that_network(name: str, block: str) -> None:
    """block, layers and widths describe the table's networks exactly: same modules, names and weights."""
    spec = ARCHITECTURES[name]
    options = {"block": block, "layers": list(spec.layers), "widths": list(spec.widths), "stem": "imagenet"}
    torch.manual_seed(0)
    named = build_model(name, num_classes=10).eval()
    custom = build_model("custom", num_classes=10, **options).eval()
    assert {k: v.shape for k, v in custom.state_dict().items()} == {k: v.shape for k, v in named.state_dict().items()}
    custom.load_state_dict(named.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(custom(x), named(x))


def test_a_two_stage_custom_network_has_the_layout_it_was_given() -> None:
    model = build_model("custom", num_classes=10, block="basic", layers=[2, 2], widths=[16, 32])
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, torch.nn.Identity)  # the small-image stem
    assert [len(stage) for stage in model.stages()] == [2, 2]
    assert [stage[0].conv1.out_channels for stage in model.stages()] == [16, 32]
    assert [stage[0].conv1.stride for stage in model.stages()] == [(1, 1), (2, 2)]
    assert model.fc.in_features == 32
    # stem 16 + 4 blocks of two 3x3 convs (+ one 1x1 projection into the second stage) + the classifier
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 8 + 1
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    features = model.forward_features(torch.randn(1, 3, 32, 32))
    assert features.shape == (1, 32)


def test_custom_networks_are_named_by_their_layout() -> None:
    options = {"block": "bottleneck", "layers": [3, 4], "widths": [32, 64], "stem": "cifar"}
    assert describe_model("custom", options) == "custom-bottleneck-3.4-32.64"
    assert describe_model("resnet20", {"shortcut": "A"}) == "resnet20"


@pytest.mark.parametrize(
    "options,needle",
    [
        ({"layers": [2], "widths": [16]}, "block=None"),
        ({"block": "wide", "layers": [2], "widths": [16]}, "['basic', 'bottleneck']"),
        ({"block": "basic", "layers": [2, 2], "widths": [16]}, "one entry per stage"),
        ({"block": "basic", "layers": [], "widths": []}, "1 to 6 positive integers"),
        ({"block": "basic", "layers": [2, 0], "widths": [16, 32]}, "layers=[2, 0]"),
        ({"block": "basic", "layers": [1] * 7, "widths": [8] * 7}, "1 to 6"),
        ({"block": "basic", "layers": [2], "widths": [16], "stem": "whiten"}, "['cifar', 'imagenet']"),
    ],
)
def test_bad_custom_layouts_are_refused_naming_the_option(options: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        build_model("custom", num_classes=10, **options)
    assert needle in str(info.value)


def test_layout_options_belong_to_custom_networks_only() -> None:
    with pytest.raises(ValueError, match=r"\['layers'\] only describe model 'custom'"):
        build_model("resnet20", num_classes=10, layers=[3, 3, 3])
