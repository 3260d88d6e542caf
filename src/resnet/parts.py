"""A run's parts, built from params and the prepared data's meta: model, optimizer, schedule, scaler, loss.

:func:`build_training` is what the train stage (through :mod:`resnet.training`) and the
training benchmarks build; :class:`TrainingParts` is what goes into (and comes back
from) every checkpoint; :func:`arch_from` is the architecture a checkpoint records, from
which :func:`resnet.checkpoint.model_from_checkpoint` rebuilds the network.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from resnet.checkpoint import load_pretrained
from resnet.config import Params
from resnet.distributed import convert_sync_batchnorm
from resnet.ema import WeightAverage, checkpoint_weights, load_checkpoint_weights
from resnet.fastnet import ResNet9, init_whitening
from resnet.models import ResNet, build_model
from resnet.optim import build_optimizer, build_scheduler

__all__ = ["arch_from", "create_model", "TrainingParts", "build_training"]

log = logging.getLogger(__name__)


def arch_from(params: Params, meta: dict[str, Any]) -> dict[str, Any]:
    """The arch dict a checkpoint stores (what checkpoint.model_from_checkpoint rebuilds, and its TTA)."""
    return {
        "name": params.model.name,
        "num_classes": len(meta["classes"]),
        "in_channels": int(meta["channels"]),
        "options": params.model.build_options(),
        "tta": params.model.tta,
    }


def create_model(params: Params, meta: dict[str, Any], train_images: torch.Tensor | None = None) -> ResNet | ResNet9:
    """Build the model params.model names, initialised from model.pretrained when given.

    ``train_images`` (uint8 NCHW, the training split) sets a patch-whitening stem
    (resnet9) from the data; a pretrained checkpoint brings its own.
    """
    arch = arch_from(params, meta)
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch["options"])
    if params.model.pretrained:
        load_pretrained(model, params.model.pretrained, freeze_backbone=params.model.freeze_backbone)
    elif train_images is not None and init_whitening(model, train_images, meta["mean"], meta["std"]):
        log.info("whitening stem set from the covariance of 2x2 patches of the training images")
    return model


@dataclass
class TrainingParts:
    """What a run trains with; all but the loss go into (and come back from) every checkpoint."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: WeightAverage | None = None  # train.ema's average of model's weights

    @property
    def checkpointed(self) -> nn.Module:
        """The network validated and saved as the checkpoint's model: the average when there is one."""
        return self.model if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint keys model and ema (resnet.ema), optimizer, scheduler and scaler (None unless fp16)."""
        return {
            **checkpoint_weights(self.model, self.ema),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def load_state_dict(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        load_checkpoint_weights(self.model, self.ema, ckpt)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            self.scaler.load_state_dict(ckpt["scaler"])


def build_training(
    params: Params,
    meta: dict[str, Any],
    device: torch.device,
    steps_per_epoch: int,
    precision: str = "fp32",
    sync_batchnorm: bool = False,
    train_images: torch.Tensor | None = None,
) -> TrainingParts:
    """Model (on device, channels_last if asked), optimizer, schedule, grad scaler and loss of a run.

    ``steps_per_epoch`` counts optimizer steps; ``precision`` is the one
    :func:`resnet.runtime.resolve_precision` settled on (the scaler is for fp16);
    ``sync_batchnorm`` makes BatchNorm statistics span every process (before the
    optimizer is built, as the layers are replaced); ``train_images`` goes to :func:`create_model`.
    """
    tp = params.train
    model = create_model(params, meta, train_images).to(device)
    if sync_batchnorm:
        model = convert_sync_batchnorm(model, device)
    if tp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tp)
    return TrainingParts(
        model,
        optimizer,
        build_scheduler(optimizer, tp, steps_per_epoch),
        torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
        nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing),
    )
