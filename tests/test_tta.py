"""Test-time augmentation (resnet.tta, model.tta): the views, their weights, and where it applies."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_training import TINY_MODEL, make_loaders, make_meta, make_params
from torch import nn

from resnet.checkpoint import load_checkpoint
from resnet.config import ModelParams
from resnet.evaluation import evaluate
from resnet.training import fit
from resnet.tta import TTA_MODES, TTAModel, checkpoint_tta, tta_logits


class Pixels(nn.Module):
    """'Logits' = the flattened image: shows exactly which views were averaged, with which weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_flip_averages_the_image_and_its_mirror() -> None:
    x = torch.arange(2 * 1 * 3 * 4, dtype=torch.float32).view(2, 1, 3, 4)
    got = tta_logits(Pixels(), x, "flip").view_as(x)
    torch.testing.assert_close(got, 0.5 * (x + x.flip(-1)))
    assert torch.equal(tta_logits(Pixels(), x, "none").view_as(x), x)


def test_flip_translate_adds_one_pixel_shifts_with_reflection_at_half_weight() -> None:
    x = torch.randn(3, 2, 5, 6)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    down_right, up_left = padded[..., :5, :6], padded[..., 2:7, 2:8]
    # Content moves: the top-left pixel of the image lands at (1, 1) in the down-right view.
    assert torch.equal(down_right[..., 1, 1], x[..., 0, 0]) and torch.equal(up_left[..., 0, 0], x[..., 1, 1])

    def flip_mean(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * (v + v.flip(-1))

    expected = 0.5 * flip_mean(x) + 0.25 * (flip_mean(down_right) + flip_mean(up_left))
    torch.testing.assert_close(tta_logits(Pixels(), x, "flip_translate").view_as(x), expected)


def test_a_mirror_symmetric_model_gains_nothing_from_flips() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        # Asymmetric filters see a mirror image otherwise: flipping changes the answer...
        assert not torch.allclose(tta_logits(model, x, "flip"), model(x), atol=1e-4)
        conv.weight.copy_(0.5 * (conv.weight + conv.weight.flip(-1)))  # mirror-symmetric filters
        # ... symmetric ones do not (global pooling makes the network mirror-invariant).
        torch.testing.assert_close(tta_logits(model, x, "flip"), model(x))


def test_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="'flop' is not one of"):
        tta_logits(Pixels(), torch.zeros(1, 1, 2, 2), "flop")
    with pytest.raises(ValueError, match="'flop' is not one of"):
        TTAModel(Pixels(), "flop")
    assert checkpoint_tta({"arch": {"name": "resnet20"}}) == "none"  # a checkpoint older than model.tta


@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
def test_training_validates_and_records_its_tta_and_evaluate_reproduces_it(tmp_path, tta: str) -> None:
    # fp32 and no warm-up whatever params.yaml's recipe: evaluate below runs in fp32, for one epoch.
    params = make_params({**TINY_MODEL, "tta": tta}, epochs=1, warmup_epochs=0, precision="fp32", eval_every=1)
    meta = make_meta()
    train, val = make_loaders(params, meta)
    result = fit(params, meta, train, val, tmp_path)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert checkpoint_tta(ckpt) == tta
    model = result.model
    with_tta = evaluate(model, val, len(meta["classes"]), tta=tta)
    plain = evaluate(model, val, len(meta["classes"]))
    # The per-epoch validation is the TTA one, and the plain logits give other numbers.
    assert result.history[-1]["val_loss"] == pytest.approx(with_tta.loss, rel=1e-6)
    assert result.history[-1]["val_accuracy"] == with_tta.accuracy
    assert with_tta.loss != pytest.approx(plain.loss, rel=1e-6)
    # evaluate's probabilities are the softmax of tta_logits, image by image.
    model.eval()
    with torch.no_grad():
        x = torch.cat([xb for xb, _ in val])
        expected = torch.softmax(tta_logits(model, x, tta), 1).max(1).values.numpy()
    np.testing.assert_allclose(with_tta.confidences, expected, rtol=1e-5)


def test_every_mode_is_a_param_choice() -> None:
    field = {f.name: f for f in dataclasses.fields(ModelParams)}["tta"]
    assert field.metadata["choices"] == TTA_MODES
