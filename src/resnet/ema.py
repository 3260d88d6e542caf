"""An exponential moving average of the weights (``train.ema``), and lookahead.

:class:`WeightAverage` keeps a copy of the network whose weights are an exponential
moving average of the training weights, updated every ``train.ema.every`` optimizer
steps: ``average = decay * average + (1 - decay) * weights``. With ``train.ema.warmup``
the decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (as
TensorFlow's ExponentialMovingAverage and timm's ModelEmaV2 do), so the first averages
are not dominated by the random initial weights. With ``train.ema.lookahead`` the average
is copied back into the training weights after each update: the "slow weights" of
Lookahead (Zhang et al. 2019, arXiv:1907.08610) in the form Keller Jordan's airbench
trains with. Averaging the iterates is Polyak and Juditsky's (1992).

What is averaged: every floating-point entry of the state dict, BatchNorm's running
mean and variance included (as timm and airbench do). Those statistics were measured on
the training weights; averaged alongside, they follow the averaged weights more closely
than the newest statistics would (exact ones would cost a pass over the training data,
as SWA's update_bn does). Integer buffers (``num_batches_tracked``) are copied.

Checkpoints (:func:`checkpoint_weights`): ``model`` holds the average, so everything that
loads a checkpoint (validate, evaluate, register, the pyfunc and ONNX models) uses it
unchanged; ``ema`` holds the training weights and the counters, so a resumed run goes on
exactly. The updates read no number back to the host: the training loop stays free of
syncs. Each process of a group keeps its own average of identical weights.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from resnet.config import EmaParams

__all__ = ["WeightAverage", "build_average", "checkpoint_weights", "load_checkpoint_weights", "describe_weights"]

log = logging.getLogger(__name__)


class WeightAverage:
    """The moving average of ``model``'s weights, held in a copy of ``model`` (``module``, in eval mode).

    Call :meth:`step` after every optimizer step; it updates the average every ``every``
    steps. ``model`` is the plain network, not a DDP or compiled wrapper (whose state
    dict names differ).
    """

    def __init__(
        self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False, lookahead: bool = False
    ) -> None:
        if not 0.0 < decay < 1.0 or every < 1:
            raise ValueError(f"decay must be in (0, 1) and every >= 1, got decay={decay}, every={every}")
        self.model = model
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.every, self.warmup, self.lookahead = decay, every, warmup, lookahead
        self.steps = 0  # optimizer steps seen
        self.updates = 0  # updates of the average made

    def current_decay(self) -> float:
        """The decay the next update uses: ``decay``, or the warm-up ramp's value when lower."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    def step(self) -> None:
        """Count an optimizer step; update the average when the count is a multiple of ``every``."""
        self.steps += 1
        if self.steps % self.every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """average <- d * average + (1 - d) * weights (then weights <- average with lookahead)."""
        decay = self.current_decay()
        average, weights = self.module.state_dict(), self.model.state_dict()
        floats = [k for k, v in weights.items() if v.is_floating_point()]
        avg, live = [average[k] for k in floats], [weights[k] for k in floats]
        torch._foreach_lerp_(avg, live, 1.0 - decay)  # one fused pass over the weights
        for k, v in weights.items():
            if not v.is_floating_point():
                average[k].copy_(v)
        if self.lookahead:
            torch._foreach_copy_(live, avg)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        """The counters and the settings they belong to (the average itself is ``module``'s state dict)."""
        return {
            "steps": self.steps,
            "updates": self.updates,
            "decay": self.decay,
            "every": self.every,
            "warmup": self.warmup,
            "lookahead": self.lookahead,
        }


def build_average(model: nn.Module, ep: EmaParams) -> WeightAverage | None:
    """The average ``train.ema`` asks for over ``model``'s current weights; None when off (decay 0)."""
    if ep.decay == 0:
        return None
    log.info(
        "validating and saving a moving average of the weights: decay %g%s every %d steps%s",
        ep.decay,
        " (ramped up)" if ep.warmup else "",
        ep.every,
        ", copied back into the training weights (lookahead)" if ep.lookahead else "",
    )
    return WeightAverage(model, ep.decay, ep.every, ep.warmup, ep.lookahead)


def checkpoint_weights(model: nn.Module, ema: WeightAverage | None) -> dict[str, Any]:
    """The checkpoint keys of the weights: ``model`` (the average when on) and ``ema`` (training weights, counters).

    Without an average only ``model`` (the training weights): a checkpoint as before ``train.ema`` existed.
    """
    if ema is None:
        return {"model": model.state_dict()}
    return {"model": ema.module.state_dict(), "ema": {**ema.state_dict(), "training_model": model.state_dict()}}


def load_checkpoint_weights(model: nn.Module, ema: WeightAverage | None, ckpt: dict[str, Any]) -> None:
    """Restore what :func:`checkpoint_weights` saved: training weights into ``model``, the average into ``ema``.

    A checkpoint without ``ema`` holds the training weights in ``model``; an average asked
    for then starts from them.
    """
    saved = ckpt.get("ema")
    model.load_state_dict(saved["training_model"] if saved else ckpt["model"])
    if ema is None:
        return
    ema.module.load_state_dict(ckpt["model"])
    ema.steps, ema.updates = (saved["steps"], saved["updates"]) if saved else (0, 0)


def describe_weights(ckpt: dict[str, Any]) -> str:
    """What a checkpoint's ``model`` weights are, for people: ``ema(decay=0.99, every=5, ...)`` or ``raw``."""
    saved = ckpt.get("ema")
    if not saved:
        return "raw"
    name = "lookahead" if saved["lookahead"] else "ema"
    return (
        f"{name}(decay={saved['decay']:g}, every={saved['every']}, warmup={str(saved['warmup']).lower()}, "
        f"updates={saved['updates']})"
    )
