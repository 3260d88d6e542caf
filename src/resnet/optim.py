"""The optimizer and the learning rate schedule of a train recipe.

The schedule is stepped per batch, and its state_dict holds only numbers, so it
survives ``torch.load(weights_only=True)`` and a resumed run continues it exactly.
Params are validated on loading (e.g. nesterov needs a momentum), so nothing here
re-checks them.
"""

from __future__ import annotations

import math
from bisect import bisect_right

import torch
from torch import nn

from resnet.config import ConfigError, TrainParams

__all__ = ["build_optimizer", "lr_factor", "build_scheduler"]


def _param_groups(model: nn.Module, tp: TrainParams) -> list[dict]:
    """The trainable parameters in two groups: weights (ndim > 1) and 1-d ones (norm weights and biases).

    The 1-d group skips weight decay when no_decay_norm_bias asks, and its learning
    rate is train.lr x norm_bias_lr_scale. Groups carry their own "lr", which the
    schedules scale (LambdaLR) or take as their peak (OneCycleLR).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        # Unreachable from params.yaml (the classifier always trains); a hand-frozen model gets here.
        raise ConfigError("the model has no trainable parameters; check model.freeze_backbone")
    if not (tp.no_decay_norm_bias and tp.weight_decay > 0) and tp.norm_bias_lr_scale == 1:
        return [{"params": trainable, "weight_decay": tp.weight_decay, "lr": tp.lr}]
    one_d_decay = 0.0 if tp.no_decay_norm_bias else tp.weight_decay
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": tp.weight_decay, "lr": tp.lr},
        {
            "params": [p for p in trainable if p.ndim <= 1],
            "weight_decay": one_d_decay,
            "lr": tp.lr * tp.norm_bias_lr_scale,
        },
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over the parameters that require grad.

    With ``no_decay_norm_bias``, 1-d parameters (BatchNorm weights and biases, the
    classifier bias) get no weight decay: shrinking them towards zero does not
    regularise anything and only fights the normalisation. ``norm_bias_lr_scale``
    raises their learning rate: a BatchNorm bias is one number per channel shifting
    the whole activation map, and with few steps it lags behind the weights unless
    it moves faster (airbench trains them at a much higher rate than the weights).
    """
    groups = _param_groups(model, tp)
    if tp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, nesterov=tp.nesterov)
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tp.lr)
    if tp.optimizer == "adam":
        # The tutorials' torch.optim.Adam: weight decay is an L2 term added to the gradient (coupled),
        # which AdamW's decoupled decay is not; with weight_decay 0 the two are the same.
        return torch.optim.Adam(groups, lr=tp.lr)
    raise ConfigError(f"train.optimizer: {tp.optimizer!r} is not supported; choose sgd, adam or adamw")


def lr_factor(step: int, tp: TrainParams, steps_per_epoch: int) -> float:
    """Multiplier of train.lr at optimizer step ``step`` (0-based) for cosine/multistep/constant.

    A linear warm-up from lr/10 to lr over warmup_epochs comes first; then cosine
    decays to 0 at the last step, multistep multiplies by gamma at each milestone
    epoch, constant keeps lr.
    """
    total = tp.epochs * steps_per_epoch
    warmup = round(tp.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return 0.1 + 0.9 * step / warmup
    if tp.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if tp.schedule == "multistep":
        return tp.gamma ** bisect_right(tp.milestones, step // steps_per_epoch)
    if tp.schedule == "constant":
        return 1.0
    raise ConfigError(f"train.schedule: {tp.schedule!r} has no lr factor; choose cosine, multistep or constant")


def build_scheduler(
    optimizer: torch.optim.Optimizer, tp: TrainParams, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule whose state_dict resumes exactly (numbers only, no pickled code).

    onecycle is torch's OneCycleLR peaking at train.lr; its warm-up fraction is
    warmup_epochs/epochs when warmup_epochs > 0, else torch's default 0.3. Momentum
    is not cycled, so train.momentum means what it says.
    """
    if tp.schedule == "onecycle":
        pct_start = tp.warmup_epochs / tp.epochs if tp.warmup_epochs > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=tp.epochs * steps_per_epoch,
            pct_start=pct_start,
            cycle_momentum=False,
        )
    # A closure, not a callable object: LambdaLR then stores nothing for it in its state_dict.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tp, steps_per_epoch))
