"""One epoch of optimisation steps: forward, loss, backward, optimizer and schedule, on the device.

The host looks at the device's numbers only every ``CHECK_EVERY`` steps (a non-finite
loss check) and every ``POSTFIX_EVERY`` steps when a progress bar is shown, so the loop
does not synchronise on every step. :mod:`resnet.training` strings epochs together.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from resnet.loader import DeviceLoader
from resnet.runtime import autocast
from resnet.utils import PipelineError, progress_enabled

__all__ = ["CHECK_EVERY", "POSTFIX_EVERY", "TrainingError", "train_one_epoch"]

#: Steps between host-side checks for a non-finite loss (each check is one sync).
CHECK_EVERY = 50
#: Steps between progress-bar postfix updates (only when a bar is shown).
POSTFIX_EVERY = 20


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on: a non-finite loss, or loaders that do not fit the run."""


def train_one_epoch(
    model: nn.Module,
    loader: DeviceLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    *,
    precision: str = "fp32",
    grad_clip: float | None = None,
    epoch: int = 0,
    epochs: int = 1,
) -> dict[str, float]:
    """One pass over ``loader`` (a batch = a step, schedule included); the caller sets train mode.

    Returns loss, accuracy, images, seconds, images_per_sec and lr (of the last step).
    Raises TrainingError when the loss turns NaN or infinite.
    """
    device = loader.device
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(loader)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
    seen = 0
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress_enabled()
    )
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        with autocast(device, precision):
            logits = model(x)
            loss = criterion(logits, y)
        lr = _optimizer_step(loss, params, optimizer, scheduler, scaler, grad_clip)

        # Bookkeeping stays on the device; the host only looks every few dozen steps.
        loss = loss.detach().float()
        first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, step)
        loss_sum += loss * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        bar.update(1)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            _check_finite(first_bad, epoch, steps)
        if not bar.disable and (step + 1) % POSTFIX_EVERY == 0:
            _show_progress(bar, loss_sum, correct, seen, t0)
    bar.close()
    train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # syncs: the timing is honest
    seconds = time.perf_counter() - t0
    return {
        "loss": train_loss,
        "accuracy": train_acc,
        "images": seen,
        "seconds": seconds,
        "images_per_sec": seen / seconds,
        "lr": lr,
    }


def _show_progress(bar: tqdm, loss_sum: Tensor, correct: Tensor, seen: int, t0: float) -> None:
    """The bar's running loss, accuracy and speed (two syncs: only every POSTFIX_EVERY steps, only on a terminal)."""
    bar.set_postfix(
        loss=f"{loss_sum.item() / seen:.4f}",
        acc=f"{correct.item() / seen:.4f}",
        img_s=f"{seen / (time.perf_counter() - t0):.0f}",
    )


def _optimizer_step(
    loss: Tensor,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> float:
    """Backward, optional clipping, the optimizer and schedule steps; returns the lr this step used."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]  # a Python float: no sync
    scheduler.step()
    return lr


def _check_finite(first_bad: Tensor, epoch: int, steps: int) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(
            f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(global step {epoch * steps + step + 1}); lower train.lr, set train.grad_clip (e.g. 1.0) "
            "or check the input data for bad values"
        )
