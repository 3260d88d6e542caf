"""Test-time augmentation: a model's logits averaged over mirrored and shifted copies of each image.

``model.tta`` in params.yaml chooses one of :data:`TTA_MODES`; checkpoints record it
(:func:`checkpoint_tta`), so training's per-epoch validation, the validate and evaluate
stages, the registered pyfunc model and its ONNX export all predict the same way.

* ``none``: the model's logits.
* ``flip``: the mean of the logits of the image and of its mirror image. Training
  flips images at random, so the network has learnt both and their average is a
  better estimate than either (+0.45 and +0.88 points in two 10-epoch resnet9 runs:
  benchmarks/results/fast-recipe-2026-12-04/).
* ``flip_translate``: half the flip logits, plus half the mean of the flip logits of
  the image shifted by one pixel down-right and up-left (reflect-padded), as Keller
  Jordan's airbench evaluates (its "tta_level 2"). Six forward passes per image.

Logits, not probabilities, are averaged (as airbench does): the average of log-odds
keeps one confident view from being drowned by unsure ones, and the result is still
a logit vector that the loss and softmax take as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TTA_MODES", "tta_logits", "TTAModel", "checkpoint_tta"]

TTA_MODES = ("none", "flip", "flip_translate")


def _flip_logits(model: nn.Module, x: Tensor) -> Tensor:
    """Mean of the logits of ``x`` and of its horizontal mirror (one batched pass of 2N images)."""
    both = model(torch.cat([x, x.flip(-1)]))
    plain, mirrored = both.chunk(2)
    return 0.5 * (plain + mirrored)


def _shifted(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` moved by one pixel down-right and up-left, the uncovered edges filled by reflection."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
    return padded[..., :h, :w], padded[..., 2 : h + 2, 2 : w + 2]


def tta_logits(model: nn.Module, x: Tensor, mode: str) -> Tensor:
    """The logits of ``model`` on the normalised NCHW batch ``x`` under test-time augmentation ``mode``."""
    if mode == "none":
        return model(x)
    if mode == "flip":
        return _flip_logits(model, x)
    if mode == "flip_translate":
        down_right, up_left = _shifted(x)
        shifted = 0.5 * (_flip_logits(model, up_left) + _flip_logits(model, down_right))
        return 0.5 * _flip_logits(model, x) + 0.5 * shifted
    raise ValueError(f"test-time augmentation {mode!r} is not one of {list(TTA_MODES)}")


class TTAModel(nn.Module):
    """``model`` whose forward is :func:`tta_logits` (for serving and export; its state dict is the model's)."""

    def __init__(self, model: nn.Module, mode: str) -> None:
        super().__init__()
        if mode not in TTA_MODES:
            raise ValueError(f"test-time augmentation {mode!r} is not one of {list(TTA_MODES)}")
        self.model = model
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return tta_logits(self.model, x, self.mode)


def checkpoint_tta(ckpt: dict[str, Any]) -> str:
    """The test-time augmentation a checkpoint's model predicts with ("none" for checkpoints older than it)."""
    return ckpt["arch"].get("tta", "none")
