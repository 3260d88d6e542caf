"""resnet9 (resnet.fastnet): layout, the whitening stem, fixed BatchNorm scales, its training parts.

Also the two training knobs that came with it: alternating flips (train.augment.flip:
alternate) and the raised learning rate of 1-d parameters (train.norm_bias_lr_scale).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_loader import collect, images, raw
from test_training import make_loaders, make_meta, make_params

from resnet.checkpoint import freeze_batchnorm_if_frozen
from resnet.config import AugmentParams, ConfigError
from resnet.fastnet import ResNet9, init_whitening
from resnet.loader import DeviceLoader
from resnet.models import build_model, count_parameters
from resnet.optim import build_optimizer, build_scheduler
from resnet.parts import create_model
from resnet.training import fit

RESNET9 = {"name": "resnet9", "width_multiplier": 0.125, "stem": None, "shortcut": "B"}


@pytest.mark.parametrize("stem,in_channels", [("whiten", 3), ("cifar", 3), ("whiten", 1), ("cifar", 1)])
def test_resnet9_shapes_and_widths(stem: str, in_channels: int) -> None:
    model = build_model("resnet9", 7, in_channels, stem=stem, width_multiplier=0.25).eval()
    with torch.no_grad():
        assert model(torch.randn(2, in_channels, 32, 32)).shape == (2, 7)
        assert model(torch.randn(2, in_channels, 16, 16)).shape == (2, 7)  # global pooling: any size >= 8
    widths = [m.out_channels for m in (model.layer1[0].conv, model.layer2[0].conv, model.layer3[0].conv)]
    assert widths == [32, 64, 128]  # Myrtle's 128-256-512, a quarter
    if stem == "whiten":
        # Every eigenvector of the C*2*2-dimensional patch space and its negation; fixed, not trained.
        assert model.conv1.kernel_size == (2, 2) and model.conv1.out_channels == 8 * in_channels
        assert not model.conv1.weight.requires_grad and model.conv1.bias.requires_grad
    else:
        assert model.conv1.kernel_size == (3, 3) and model.conv1.weight.requires_grad


def test_resnet9_batchnorm_scales_are_fixed_biases_train_and_every_trainable_parameter_gets_a_gradient() -> None:
    model = build_model("resnet9", 10, width_multiplier=0.125)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) == 7  # layer1 conv + 2 residual, layer2 conv, layer3 conv + 2 residual
    assert all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in norms)
    model.train()
    freeze_batchnorm_if_frozen(model)  # only a frozen backbone's BatchNorms stop tracking statistics
    assert all(bn.training for bn in norms)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable), [
        n for n, p in trainable if p.grad is None
    ]
    assert count_parameters(model, trainable_only=True) < count_parameters(model)


def test_resnet9_refuses_options_that_do_not_apply() -> None:
    with pytest.raises(ValueError, match="stem='imagenet' is not valid; choose one of \\['whiten', 'cifar'\\]"):
        build_model("resnet9", 10, stem="imagenet")
    with pytest.raises(ValueError, match="zero_init_residual"):
        build_model("resnet9", 10, zero_init_residual=True)
    with pytest.raises(ConfigError, match=r"model\.stem: 'imagenet' does not apply to resnet9; choose one of"):
        make_params({**RESNET9, "stem": "imagenet"})


def _correlated_images(n: int = 400, seed: int = 0) -> torch.Tensor:
    """uint8 NCHW images whose channels and neighbouring pixels are strongly correlated (like photos)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 17, 17, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)
    rgb = torch.cat([smooth, 0.8 * smooth + 0.2 * torch.rand(n, 1, 16, 16, generator=g), 1 - smooth], 1)
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8)


def test_init_whitening_decorrelates_2x2_patches() -> None:
    x = _correlated_images()
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    model = build_model("resnet9", 10, width_multiplier=0.125)
    assert init_whitening(model, x, mean, std)
    conv = model.conv1
    assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    with torch.no_grad():
        normed = (x.float() / 255 - 0.5) / 0.25
        out = torch.nn.functional.conv2d(normed, conv.weight[:12])  # the 12 filters; the other 12 are negations
    cov = torch.cov(out.permute(1, 0, 2, 3).reshape(12, -1).double())
    eigenvalues = torch.linalg.eigvalsh(
        torch.cov(normed.unfold(2, 2, 1).unfold(3, 2, 1).permute(1, 4, 5, 0, 2, 3).reshape(12, -1).double())
    )
    # Whitened: uncorrelated, and unit variance wherever the data has variance well above the epsilon.
    off_diagonal = cov - torch.diag(torch.diag(cov))
    assert off_diagonal.abs().max() < 1e-3
    strong = eigenvalues > 0.05
    np.testing.assert_allclose(torch.diag(cov)[strong].numpy(), 1.0, atol=0.02)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])


def test_init_whitening_leaves_other_models_alone() -> None:
    x = _correlated_images(8)
    resnet20 = build_model("resnet20", 10)
    cifar_stem = build_model("resnet9", 10, stem="cifar", width_multiplier=0.125)
    before = cifar_stem.conv1.weight.clone()
    assert not init_whitening(resnet20, x, [0.5] * 3, [0.25] * 3)
    assert not init_whitening(cifar_stem, x, [0.5] * 3, [0.25] * 3)
    assert torch.equal(before, cifar_stem.conv1.weight)


def test_training_sets_the_whitening_stem_from_the_training_split(tmp_path) -> None:
    params = make_params(RESNET9, epochs=1)
    meta = make_meta()
    train, val = make_loaders(params, meta)
    expected = build_model("resnet9", len(meta["classes"]), width_multiplier=0.125)
    init_whitening(expected, train.images, meta["mean"], meta["std"])
    assert not torch.equal(create_model(params, meta).conv1.weight, expected.conv1.weight)  # no data: random
    result = fit(params, meta, train, val, tmp_path)
    # Fixed: after training the stem is exactly what the data's patch covariance gave.
    assert torch.equal(result.model.conv1.weight, expected.conv1.weight)
    assert np.isfinite(result.best_metric)


def test_norm_bias_lr_scale_raises_the_lr_of_1d_parameters_only() -> None:
    for schedule in ("onecycle", "cosine"):
        params = make_params(RESNET9, norm_bias_lr_scale=8.0, schedule=schedule, lr=0.1, weight_decay=5e-4)
        model = create_model(params, make_meta())
        opt = build_optimizer(model, params.train)
        build_scheduler(opt, params.train, steps_per_epoch=10)
        names = {id(p): n for n, p in model.named_parameters()}
        weights, ones = opt.param_groups
        assert {names[id(p)] for p in ones["params"]} == {
            n for n, p in model.named_parameters() if p.ndim == 1 and p.requires_grad
        }
        assert ones["weight_decay"] == 0 and weights["weight_decay"] == 5e-4
        if schedule == "onecycle":
            assert opt.param_groups[1]["max_lr"] == pytest.approx(0.8) and weights["max_lr"] == pytest.approx(0.1)
        # Whatever the schedule's factor at this step, the ratio of the two groups' rates is the scale.
        assert ones["lr"] / weights["lr"] == pytest.approx(8.0)


def test_alternate_flips_show_every_image_both_ways_in_consecutive_epochs() -> None:
    x, y = images(64), np.arange(64)
    aug = AugmentParams(crop_padding=0, flip="alternate", cutout=0, resized_crop_scale=0.0)
    loader = DeviceLoader(x, y, 16, mean=[0] * 3, std=[1] * 3, train=True, augment=aug, seed=3)
    flipped_by_epoch = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        xb, yb = collect(loader)
        flipped = np.zeros(64, dtype=bool)
        for img, label in zip(raw(xb), yb.tolist()):
            flipped[label] = not np.array_equal(img, x[label])
            if flipped[label]:
                np.testing.assert_array_equal(img, x[label][:, ::-1])
        flipped_by_epoch.append(flipped)
    assert 10 < flipped_by_epoch[0].sum() < 54  # a random half
    assert np.array_equal(flipped_by_epoch[1], ~flipped_by_epoch[0])
    assert np.array_equal(flipped_by_epoch[2], flipped_by_epoch[0])
    # A resumed run (a new loader jumping to epoch 1) flips the same images.
    resumed = DeviceLoader(x, y, 16, mean=[0] * 3, std=[1] * 3, train=True, augment=aug, seed=3)
    resumed.set_epoch(1)
    loader.set_epoch(1)
    assert torch.equal(collect(resumed)[0], collect(loader)[0])


def test_alternate_flips_split_across_processes_as_one_process_would_see_them() -> None:
    x, y = images(64), np.arange(64)
    aug = AugmentParams(crop_padding=2, flip="alternate", cutout=0, resized_crop_scale=0.0)
    kw = {"mean": [0] * 3, "std": [1] * 3, "train": True, "augment": aug, "seed": 5}
    whole = DeviceLoader(x, y, 16, **kw)
    parts = [DeviceLoader(x, y, 8, rank=r, world_size=2, **kw) for r in range(2)]
    for loader in (whole, *parts):
        loader.set_epoch(1)
    xw, _ = collect(whole)
    halves = [collect(p)[0] for p in parts]
    for step in range(len(whole)):
        together = torch.cat([h[step * 8 : (step + 1) * 8] for h in halves])
        assert torch.equal(together, xw[step * 16 : (step + 1) * 16])


def test_flip_param_accepts_true_false_and_alternate_only() -> None:
    assert make_params(augment={"flip": "alternate"}).train.augment.flip == "alternate"
    with pytest.raises(ConfigError, match="train.augment.flip: 'sometimes' is not allowed"):
        make_params(augment={"flip": "sometimes"})


def test_resnet9_is_a_resnet9() -> None:
    assert isinstance(build_model("resnet9", 10), ResNet9)
