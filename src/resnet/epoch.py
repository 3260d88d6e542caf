"""One epoch of optimisation steps: forward, loss, backward, optimizer and schedule, on the device.

The host looks at the device's numbers only every ``CHECK_EVERY`` steps (a non-finite
loss check) and every ``POSTFIX_EVERY`` steps when a progress bar is shown, so the loop
does not synchronise on every step. :mod:`resnet.training` strings epochs together.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from resnet.distributed import all_reduce_max, all_reduce_sum
from resnet.ema import WeightAverage
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
    ema: WeightAverage | None = None,
) -> dict[str, float]:
    """One pass over ``loader``: an optimizer step (schedule included) every ``loader.accumulation`` batches.

    ``model`` may be a DistributedDataParallel module: its gradients are then averaged over
    the processes at each step's last micro-batch only, and the epoch's figures are sums
    over every process. The caller sets train mode. ``ema``, an average of the plain
    module's weights, counts every optimizer step (and updates every ``ema.every``).
    Returns loss, accuracy, images, seconds, images_per_sec (all processes) and lr (of the last step).
    Raises TrainingError when the loss turns NaN or infinite in any process.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    steps, accumulation = len(loader), loader.accumulation
    tally = _Tally(loader.device)
    lr = optimizer.param_groups[0]["lr"]
    bar = tqdm(
        total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False, disable=not progress_enabled()
    )
    optimizer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        stepping = (step + 1) % accumulation == 0
        # Between optimizer steps DDP need not average gradients: they only accumulate.
        with nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync():
            with autocast(loader.device, precision):
                logits = model(x)
                loss = criterion(logits, y)
            # Per-rank mean losses of micro-batches add up to the global batch's mean loss once
            # divided by the accumulation steps (DDP divides by the processes).
            scaler.scale(loss * (1.0 / accumulation) if accumulation > 1 else loss).backward()
        if stepping:
            lr = _optimizer_step(params, optimizer, scheduler, scaler, grad_clip)
            if ema is not None:
                ema.step()  # on the device, no sync
        tally.add(step, loss, logits, y)
        bar.update(1)
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == steps:
            _check_finite(tally.first_bad, epoch, steps)
        if not bar.disable and (step + 1) % POSTFIX_EVERY == 0:
            _show_progress(bar, tally, t0)
    bar.close()
    return {**tally.summary(t0), "lr": lr}


class _Tally:
    """The epoch's figures, kept on the device: the host looks only every few dozen steps."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)  # first step with a non-finite loss
        self.seen = 0

    def add(self, step: int, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        loss = loss.detach().float()
        self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, step)
        self.loss_sum += loss * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def totals(self) -> list[float]:
        """Summed loss, correct answers and images over every process (one all-reduce; a no-op alone)."""
        stacked = torch.stack(
            [self.loss_sum.double(), self.correct.double(), self.loss_sum.new_tensor(self.seen, dtype=torch.float64)]
        )
        return all_reduce_sum(stacked).tolist()

    def summary(self, t0: float) -> dict[str, float]:
        """The epoch's loss, accuracy, images, seconds since ``t0`` and images_per_sec, over every process."""
        loss_total, correct_total, seen_total = self.totals()  # also syncs the device: honest timing
        seconds = time.perf_counter() - t0
        return {
            "loss": loss_total / seen_total,
            "accuracy": correct_total / seen_total,
            "images": int(seen_total),
            "seconds": seconds,
            "images_per_sec": seen_total / seconds,
        }


def _show_progress(bar: tqdm, tally: _Tally, t0: float) -> None:
    """The bar's running loss, accuracy and speed (two syncs: only every POSTFIX_EVERY steps, only on a terminal)."""
    bar.set_postfix(
        loss=f"{tally.loss_sum.item() / tally.seen:.4f}",
        acc=f"{tally.correct.item() / tally.seen:.4f}",
        img_s=f"{tally.seen / (time.perf_counter() - t0):.0f}",
    )


def _optimizer_step(
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> float:
    """Optional clipping, the optimizer and schedule steps, then zeroed gradients; returns the lr this step used."""
    if grad_clip is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]  # a Python float: no sync
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def _check_finite(first_bad: Tensor, epoch: int, steps: int) -> None:
    # Every process checks at the same steps and sees the same verdict, so all stop together.
    step = int(all_reduce_max(first_bad.clone()).item())
    if step >= 0:
        raise TrainingError(
            f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(global step {epoch * steps + step + 1}); lower train.lr, set train.grad_clip (e.g. 1.0) "
            "or check the input data for bad values"
        )
