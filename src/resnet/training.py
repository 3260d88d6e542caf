"""The training loop: a run's parts, early stopping, and :func:`fit`, which ties epochs together.

Reads top to bottom: the result type; :class:`EarlyStopping`;
the :class:`Trainer`, whose named steps (train an epoch, validate, save the
checkpoints) act on one :class:`~resnet.resume.TrainState`; and :func:`fit`, the
loop on one screen. Elsewhere: a run's parts (model, optimizer, schedule, grad scaler,
loss) in :mod:`resnet.parts`, one epoch's steps in :mod:`resnet.epoch`, the
optimizer and schedule in :mod:`resnet.optim`, the moving average of the weights
(validated and saved instead of them when ``train.ema`` is on) in :mod:`resnet.ema`,
device and precision in :mod:`resnet.runtime`, what makes resuming exact
(TrainState, RNG states, the fingerprint) in :mod:`resnet.resume`, and validation is
:func:`resnet.evaluation.evaluate`, the very function the validate stage runs, so
train.json and val.json report the same numbers for the same checkpoint.

Design notes:

* The hot loop never calls ``.item()``: loss and correct counts accumulate as
  tensors on the device, and the host looks at them every ``CHECK_EVERY`` steps
  (a non-finite loss check), every ``POSTFIX_EVERY`` steps when a progress bar is
  shown, and at the end of the epoch. (fp16's GradScaler still syncs once a step
  to decide whether to skip it; bf16 needs no scaler.)
* A resumed run on CPU reproduces an uninterrupted one bit for bit (see resnet.resume).
* Params are validated on loading, hardware-dependent rules included (channels_last
  or compile on CPU for narrow models, a cuda device without a GPU), so nothing here
  re-checks them.
* Train loss is the optimised objective (with label smoothing); validation loss is
  plain cross-entropy, the number comparable across recipes.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet.checkpoint import freeze_batchnorm_if_frozen, save_checkpoint
from resnet.config import Params, TrainParams
from resnet.distributed import World, all_reduce_sum, wrap_model
from resnet.ema import build_average
from resnet.epoch import TrainingError, train_one_epoch
from resnet.evaluation import evaluate
from resnet.loader import DeviceLoader
from resnet.parts import arch_from, build_training
from resnet.paths import BEST_CHECKPOINT, LAST_CHECKPOINT
from resnet.resume import TrainState, data_identity, fingerprint, rng_state, set_rng_state
from resnet.runtime import resolve_precision
from resnet.utils import seed_everything

__all__ = [
    "TrainingError",
    "TrainResult",
    "EpochCallback",
    "HISTORY_FIELDS",
    "EarlyStopping",
    "Trainer",
    "fit",
]

log = logging.getLogger(__name__)

#: Keys of each per-epoch metrics dict, in the order of plots/train/history.csv.
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "images_per_sec",
    "epoch_seconds",
)

EpochCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainResult:
    """What :func:`fit` returns. Counts and times include epochs run before a resume."""

    model: nn.Module  # the network with the last epoch's weights (their average with train.ema), on the device
    history: list[dict[str, float]]  # one metrics dict per epoch (keys: HISTORY_FIELDS)
    epochs_completed: int
    best_epoch: int  # epoch of models/best.pt (1-based)
    best_metric: float  # its value of metric_name
    metric_name: str  # train.early_stopping_metric
    stopped_early: bool
    resumed_from: int | None  # epochs already done when this call started; None = fresh start
    train_seconds: float  # sum of epoch_seconds
    images_per_sec: float  # over all epochs' training loops
    device: str
    precision: str  # the precision computed in: train.precision as resolve_precision resolved it (fp32/bf16/fp16)
    best_path: Path
    last_path: Path


def epoch_metrics(epoch: int, train: dict[str, float], val: dict[str, float], seconds: float) -> dict[str, float]:
    """One history row, keys in HISTORY_FIELDS order (val_loss and val_accuracy only when it validated)."""
    return {
        "epoch": epoch + 1,
        "train_loss": train["loss"],
        "train_accuracy": train["accuracy"],
        **val,
        "lr": train["lr"],
        "images_per_sec": train["images_per_sec"],
        "epoch_seconds": seconds,
    }


# ----------------------------------------------------------------------------- early stopping


@dataclass(frozen=True)
class EarlyStopping:
    """Which validations improve on the best so far, and when too many in a row have not."""

    metric: str  # "val_accuracy" (higher is better) or "val_loss" (lower is better)
    patience: int  # validations without improvement before stopping; 0 = never stop

    @classmethod
    def from_params(cls, tp: TrainParams) -> EarlyStopping:
        return cls(tp.early_stopping_metric, tp.early_stopping_patience)

    def update(self, state: TrainState, val: dict[str, float], epoch: int) -> bool:
        """Record epoch ``epoch``'s (1-based) validation in ``state``; True when it is the new best."""
        value = val[self.metric]
        best = state.best_metric
        if best is None or (value > best if self.metric == "val_accuracy" else value < best):
            state.best_metric, state.best_epoch, state.bad_evals = value, epoch, 0
            return True
        state.bad_evals += 1
        state.stopped_early = 0 < self.patience <= state.bad_evals
        return False


# ----------------------------------------------------------------------------- the run


class Trainer:
    """One run's fixed parts (params, data, model, optimizer, schedule, where checkpoints go) and its steps.

    The steps act on a :class:`~resnet.resume.TrainState`, the one thing that changes
    from epoch to epoch; :func:`fit` strings them together.
    """

    def __init__(
        self,
        params: Params,
        meta: dict[str, Any],
        train_loader: DeviceLoader,
        val_loader: DeviceLoader,
        out_dir: str | Path,
        world: World | None = None,
    ) -> None:
        self.device = train_loader.device
        self.world = world or World()
        if val_loader.device != self.device:
            raise TrainingError(
                f"train data is on {self.device} but validation data on {val_loader.device}; "
                "build both loaders on one device"
            )
        self.params, self.meta, self.tp = params, meta, params.train
        self.train_loader, self.val_loader = train_loader, val_loader
        out_dir = Path(out_dir)
        self.best_path, self.last_path = out_dir / BEST_CHECKPOINT.name, out_dir / LAST_CHECKPOINT.name
        self.precision = resolve_precision(self.tp.precision, self.device)
        self.stopping = EarlyStopping.from_params(self.tp)
        seed_everything(self.tp.seed)
        sync_bn = params.distributed.sync_batchnorm and self.world.size > 1
        self.parts = build_training(
            params, meta, self.device, train_loader.steps, self.precision, sync_bn, train_loader.images
        )
        # DDP (with several processes) averages the gradients; checkpoints keep the plain module's
        # state. Training only: validation runs the plain module, a second compiled graph would cost
        # more than it saves.
        self.forward = wrap_model(self.parts.model, self.device)
        # After DDP's broadcast of rank 0's weights: every process averages the same ones.
        self.parts.ema = build_average(self.parts.model, self.tp.ema)
        if self.tp.compile:
            self.forward = torch.compile(self.forward)

    def start(self, resume: dict[str, Any] | None, extra: dict[str, Any] | None) -> TrainState:
        """A fresh state, or the one ``resume`` holds, with weights, optimizer, schedule, scaler and RNGs restored."""
        state = TrainState()
        if resume is not None:
            self.parts.load_state_dict(resume)
            state = TrainState.from_checkpoint(resume)
            set_rng_state(resume["rng"])
        state.extra.update(extra or {})
        trainable = sum(p.numel() for p in self.parts.model.parameters() if p.requires_grad)
        loader = self.train_loader
        log.info(
            "%s: %d trainable parameters, %d steps/epoch, global batch %d (%d x %d processes x %d accumulation "
            "steps), %s, precision %s%s, %s%s",
            self.params.model.label,
            trainable,
            loader.steps,
            loader.global_batch,
            loader.batch_size,
            loader.world_size,
            loader.accumulation,
            f"resuming at epoch {state.epoch + 1}" if resume else "fresh start",
            self.precision,
            f" (train.precision {self.tp.precision})" if self.tp.precision != self.precision else "",
            self.device,
            ", torch.compile (the first steps are slow)" if self.tp.compile else "",
        )
        return state

    def reconcile_precision(self, resume: dict[str, Any] | None, finished: bool) -> None:
        """A checkpoint trained in another precision (train.precision auto on another machine):
        a finished one reports what it was trained in; an unfinished one resumes in this machine's, with a warning."""
        trained_in = (resume or {}).get("precision", self.precision)
        if trained_in == self.precision:
            return
        if finished:
            self.precision = trained_in
            return
        log.warning(
            "the checkpoint was trained in %s; it resumes in %s here (train.precision %s)",
            trained_in,
            self.precision,
            self.tp.precision,
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train epoch ``epoch`` (0-based); :func:`train_one_epoch`'s numbers."""
        self.train_loader.set_epoch(epoch)
        self.parts.model.train()
        freeze_batchnorm_if_frozen(self.parts.model)  # a frozen backbone keeps its BN statistics too
        p = self.parts
        return train_one_epoch(
            self.forward,
            self.train_loader,
            p.optimizer,
            p.scheduler,
            p.scaler,
            p.criterion,
            precision=self.precision,
            grad_clip=self.tp.grad_clip,
            epoch=epoch,
            epochs=self.tp.epochs,
            ema=p.ema,
        )

    def validation_due(self, epoch: int) -> bool:
        """Validate every train.eval_every epochs, and always after the last one."""
        return (epoch + 1) % self.tp.eval_every == 0 or epoch + 1 == self.tp.epochs

    def validate(self) -> dict[str, float]:
        """val_loss and val_accuracy, by the function and in the precision the validate stage uses.

        With several processes each evaluates its share of the split (its val_loader) and
        the sums are added up: the figures of one process evaluating all of it.
        """
        result = evaluate(
            self.parts.checkpointed,
            self.val_loader,
            len(self.meta["classes"]),
            precision=self.precision,
            tta=self.params.model.tta,
        )
        if self.world.size == 1:
            return {"val_loss": result.loss, "val_accuracy": result.accuracy}
        n = result.num_images
        sums = torch.tensor([result.loss * n, float(result.confusion.trace()), n], dtype=torch.float64)
        loss_sum, correct, total = all_reduce_sum(sums.to(self.device)).tolist()
        return {"val_loss": loss_sum / total, "val_accuracy": correct / total}

    def check_diverged(self, epoch: int, val: dict[str, float]) -> None:
        """Stop before a diverged epoch is saved: non-finite weights or validation loss.

        The per-step check sees the training loss only; a blow-up in the last steps, or in
        BatchNorm's running statistics, shows here first.
        """
        model = self.parts.model
        named = itertools.chain(model.named_parameters(), model.named_buffers())
        tensors = [(n, t) for n, t in named if t.is_floating_point()]
        loss = val.get("val_loss")
        # One host sync for the whole model; the names are looked up only when something is wrong.
        finite = bool(torch.stack([torch.isfinite(t).all() for _, t in tensors]).all()) if tensors else True
        if finite and (loss is None or math.isfinite(loss)):
            return
        bad = [n for n, t in tensors if not bool(torch.isfinite(t).all())]
        what = f"validation loss {loss}" if loss is not None and not math.isfinite(loss) else ""
        if bad:
            shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            what = f"{what}{' and ' if what else ''}non-finite weights ({shown})"
        raise TrainingError(
            f"the model diverged in epoch {epoch + 1}: {what}; the epoch was not saved. Change the recipe "
            "(lower train.lr, set train.grad_clip) and rerun (dvc repro train)"
        )

    def checkpoint(self, state: TrainState) -> dict[str, Any]:
        """Everything to rebuild the model (see resnet.checkpoint) and to resume the run (see resnet.resume)."""
        meta = self.meta
        return {
            "arch": arch_from(self.params, meta),
            "classes": list(meta["classes"]),
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
            "image_size": list(meta["image_size"]),
            "params": dataclasses.asdict(self.params),
            # What train.precision resolved to (auto: per machine): validate and evaluate compute in it.
            "precision": self.precision,
            **self.parts.state_dict(),
            **state.to_checkpoint(),
            "rng": rng_state(),
            "fingerprint": fingerprint(self.params, meta),
            "data_identity": data_identity(meta),
        }

    def save(self, state: TrainState, improved: bool) -> None:
        """Write last.pt, and best.pt too when this epoch improved on the best (rank 0 alone)."""
        if not self.world.is_main:
            return
        ckpt = self.checkpoint(state)
        if improved:
            save_checkpoint(self.best_path, ckpt)
        save_checkpoint(self.last_path, ckpt)

    def result(self, state: TrainState, resumed_from: int | None) -> TrainResult:
        """The :class:`TrainResult` of a finished (or early-stopped) run."""
        if state.best_metric is None:  # the last epoch always validates: only a hand-made resume state gets here
            raise TrainingError(f"training ended without a validation pass; delete {self.last_path} and rerun")
        history = state.history
        return TrainResult(
            model=self.parts.checkpointed,
            history=history,
            epochs_completed=len(history),
            best_epoch=state.best_epoch,
            best_metric=state.best_metric,
            metric_name=self.stopping.metric,
            stopped_early=state.stopped_early,
            resumed_from=resumed_from,
            train_seconds=sum(h["epoch_seconds"] for h in history),
            images_per_sec=statistics.harmonic_mean([h["images_per_sec"] for h in history]),
            device=str(self.device),
            precision=self.precision,
            best_path=self.best_path,
            last_path=self.last_path,
        )


def _log_epoch(state: TrainState, epochs: int, improved: bool) -> None:
    m = state.history[-1]
    val = f" val_loss {m['val_loss']:.4f} val_acc {m['val_accuracy']:.4f}" if "val_loss" in m else ""
    log.info(
        "epoch %d/%d train_loss %.4f train_acc %.4f%s lr %.3g %.0f img/s %.1fs%s",
        state.epoch,
        epochs,
        m["train_loss"],
        m["train_accuracy"],
        val,
        m["lr"],
        m["images_per_sec"],
        m["epoch_seconds"],
        " (best)" if improved else "",
    )


def fit(
    params: Params,
    meta: dict[str, Any],
    train_loader: DeviceLoader,
    val_loader: DeviceLoader,
    out_dir: str | Path,
    *,
    resume: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    on_epoch: EpochCallback | None = None,
    world: World | None = None,
) -> TrainResult:
    """Train params.model with the params.train recipe; write out_dir/best.pt and last.pt every epoch.

    Args:
        params: the validated params (the model and train sections are used).
        meta: the prepared data's meta.json (classes, channels, mean, std, image_size, counts).
        train_loader: a DeviceLoader with train=True; its device is the training device
            (see :func:`resnet.runtime.configure_torch`).
        val_loader: a DeviceLoader with train=False on the same device.
        out_dir: where best.pt and last.pt go (models/).
        resume: a checkpoint from :func:`resnet.resume.find_resume_checkpoint` to continue.
        extra: stored in every checkpoint under "extra" (the stage keeps the MLflow run id there).
        on_epoch: called as on_epoch(epoch, metrics) after each epoch, once its checkpoint is written.
        world: this process among several (resnet.distributed.setup); the loaders hold its shares of
            the data, and only rank 0 writes checkpoints.
    """
    trainer = Trainer(params, meta, train_loader, val_loader, out_dir, world)
    # The epoch this training last went on from, kept in the checkpoints' extra: a finished
    # training completed again (nothing left to train) reports the same as the first time.
    finished = resume is not None and (resume["stopped_early"] or resume["epoch"] >= params.train.epochs)
    resumed_from = (resume.get("extra") or {}).get("resumed_from") if finished else (resume or {}).get("epoch")
    trainer.reconcile_precision(resume, finished)
    state = trainer.start(resume, {**(extra or {}), "resumed_from": resumed_from})
    # A checkpoint of a finished training (resnet.resume.find_resume_checkpoint) trains no further.
    for epoch in range(params.train.epochs if state.stopped_early else state.epoch, params.train.epochs):
        t0 = time.perf_counter()
        train = trainer.train_epoch(epoch)
        val = trainer.validate() if trainer.validation_due(epoch) else {}
        trainer.check_diverged(epoch, val)
        improved = bool(val) and trainer.stopping.update(state, val, epoch + 1)
        state.record(epoch_metrics(epoch, train, val, time.perf_counter() - t0))
        trainer.save(state, improved)  # before the callback: an interrupt from here on loses nothing
        _log_epoch(state, params.train.epochs, improved)
        if on_epoch is not None:
            on_epoch(state.epoch, dict(state.history[-1]))
        if state.stopped_early:
            log.info(
                "early stopping: %s has not improved for %d validations (best %.4f at epoch %d)",
                trainer.stopping.metric,
                state.bad_evals,
                state.best_metric,
                state.best_epoch,
            )
            break
    return trainer.result(state, resumed_from=resumed_from)
