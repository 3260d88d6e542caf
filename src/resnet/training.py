"""The training loop: optimizer, schedule, mixed precision, early stopping, resumable checkpoints.

Reads top to bottom: errors and the result type, set-up helpers (device, precision,
model, optimizer, schedule), the fingerprint and RNG helpers that make resuming
exact, one evaluation pass, one training epoch, then :func:`find_resume_checkpoint`
and :func:`fit`, which ties it all together.

Design notes:

* The hot loop never calls ``.item()``: loss and correct counts accumulate as
  tensors on the device, and the host looks at them every ``CHECK_EVERY`` steps
  (a non-finite loss check), every ``POSTFIX_EVERY`` steps when a progress bar is
  shown, and at the end of the epoch. (fp16's GradScaler still syncs once a step
  to decide whether to skip it; bf16 needs no scaler.)
* The learning rate schedule is stepped per batch; its state_dict holds only
  numbers, so it survives ``torch.load(weights_only=True)``.
* A resumed run on CPU reproduces an uninterrupted one bit for bit: the loader
  derives each epoch's order and augmentations from ``(seed, epoch)``, and the
  checkpoint restores model, optimizer, schedule, scaler and every RNG.
* Mixed precision is a GPU feature here. On CPU, ``bf16``/``fp16`` log a warning
  and train in fp32: CPU autocast is slower than fp32 on CPUs without AMX, and
  fp32 keeps CPU runs exact and resumable bit for bit.
* On CPU, NHWC training (channels_last, or torch.compile, whose CPU backend picks
  NHWC) is refused for models with narrow 1x1 stride-2 convolutions: oneDNN's
  backward pass crashes or returns wrong gradients there (see check_channels_last).
* Train loss is the optimised objective (with label smoothing); validation loss is
  plain cross-entropy, the number comparable across recipes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import math
import random
import statistics
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from resnet.checkpoint import (
    CheckpointError,
    freeze_batchnorm_if_frozen,
    load_checkpoint,
    load_pretrained,
    save_checkpoint,
)
from resnet.config import ConfigError, Params, TrainParams
from resnet.loader import DeviceLoader
from resnet.models import ResNet, build_model
from resnet.utils import PipelineError, flatten, progress_enabled, resolve_device, seed_everything

__all__ = [
    "TrainingError",
    "TrainResult",
    "EpochCallback",
    "HISTORY_FIELDS",
    "configure_torch",
    "keep_freed_memory",
    "resolve_precision",
    "autocast",
    "arch_from",
    "create_model",
    "check_channels_last",
    "build_optimizer",
    "lr_factor",
    "build_scheduler",
    "fingerprint",
    "evaluate",
    "train_one_epoch",
    "build_training",
    "find_resume_checkpoint",
    "fit",
]

log = logging.getLogger(__name__)

#: Steps between host-side checks for a non-finite loss (each check is one sync).
CHECK_EVERY = 50
#: Steps between progress-bar postfix updates (only when a bar is shown).
POSTFIX_EVERY = 20
#: Keys of each per-epoch metrics dict, in the order of plots/train/history.csv.
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                  "images_per_sec", "epoch_seconds")
#: What a checkpoint needs beyond load_checkpoint's keys to resume training.
RESUME_KEYS = ("epoch", "optimizer", "scheduler", "scaler", "rng", "history", "best_metric",
               "best_epoch", "bad_evals", "stopped_early", "fingerprint", "params")

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingError(PipelineError, RuntimeError):
    """Training cannot go on: a non-finite loss, or loaders that do not fit the run."""


@dataclass
class TrainResult:
    """What :func:`fit` returns. Counts and times include epochs run before a resume."""

    model: nn.Module  # the network with the last epoch's weights, on the training device
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
    precision: str  # the precision actually used (bf16/fp16 fall back to fp32 on CPU)
    best_path: Path
    last_path: Path


# ----------------------------------------------------------------------------- set-up


def configure_torch(tp: TrainParams) -> torch.device:
    """Apply train.num_threads and fast GPU defaults; return the device train.device names.

    Call before building the loaders, which put the data on this device.
    """
    if tp.num_threads > 0:
        torch.set_num_threads(tp.num_threads)
    try:
        device = resolve_device(tp.device)
    except RuntimeError as e:
        raise ConfigError(str(e)) from None
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels; TF32 matmuls for fp32.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    else:
        keep_freed_memory()
    log.info("device %s, %d CPU threads", device, torch.get_num_threads())
    return device


#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    A CPU training step allocates its activations afresh, megabytes each. glibc serves
    blocks that large with mmap and unmaps them on free, so every step page-faults its
    whole working set in again: about 4,500 page faults a step for resnet20 at batch 128
    here, and 2-5% of the step time. With both thresholds raised, freed blocks stay in
    the heap and the next step reuses them. Returns whether glibc took both settings:
    False, with the default allocator left as it is, where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not Linux/glibc (macOS, musl): the default allocator stays
        return False
    return ok


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to train in: bf16/fp16 autocast on CUDA only; elsewhere fp32, with a warning."""
    if requested == "fp32":
        return "fp32"
    if device.type != "cuda":
        log.warning("train.precision %s needs a CUDA GPU; training in fp32 on %s", requested, device)
        return "fp32"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; using fp16 with a GradScaler instead")
        return "fp16"
    return requested


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16/fp16 autocast on ``device`` for a precision from :func:`resolve_precision`; a no-op for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")


def arch_from(params: Params, meta: dict[str, Any]) -> dict[str, Any]:
    """The arch dict a checkpoint stores (what checkpoint.model_from_checkpoint rebuilds)."""
    return {
        "name": params.model.name,
        "num_classes": len(meta["classes"]),
        "in_channels": int(meta["channels"]),
        "options": params.model.build_options(),
    }


def create_model(params: Params, meta: dict[str, Any]) -> ResNet:
    """Build the model params.model names, initialised from model.pretrained when given."""
    arch = arch_from(params, meta)
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch["options"])
    if params.model.pretrained:
        load_pretrained(model, params.model.pretrained, freeze_backbone=params.model.freeze_backbone)
    return model


def check_channels_last(model: nn.Module, device: torch.device, key: str = "train.channels_last") -> None:
    """Refuse NHWC training where oneDNN's CPU kernels would crash, hang or compute wrong gradients.

    oneDNN's 1x1 stride-2 convolution backward (weights) in NHWC overruns a workspace when
    the input has fewer channels than its vector block (8 with AVX2, 16 with AVX-512):
    uxlfoundation/oneDNN#6035. Narrow models (width_multiplier < 1 with shortcut B) hit it,
    with channels_last and also under torch.compile, whose CPU backend picks NHWC for convolutions.
    """
    if device.type != "cpu":
        return
    for name, m in model.named_modules():
        if (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
                and m.in_channels < 16 and m.weight.requires_grad):
            raise ConfigError(
                f"{key}: true on CPU cannot train this model: the 1x1 stride-2 convolution {name} has "
                f"{m.in_channels} input channels (< 16), which oneDNN's NHWC backward pass mishandles (crash, hang "
                f"or wrong gradients; uxlfoundation/oneDNN#6035); set {key}: false, or use model.shortcut: A "
                "or a larger model.width_multiplier"
            )


def build_optimizer(model: nn.Module, tp: TrainParams) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW over the parameters that require grad.

    With ``no_decay_norm_bias``, 1-d parameters (BatchNorm weights and biases, the
    classifier bias) get no weight decay: shrinking them towards zero does not
    regularise anything and only fights the normalisation.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise TrainingError("the model has no trainable parameters; check model.freeze_backbone")
    if tp.no_decay_norm_bias and tp.weight_decay > 0:
        groups = [
            {"params": [p for _, p in trainable if p.ndim > 1], "weight_decay": tp.weight_decay},
            {"params": [p for _, p in trainable if p.ndim <= 1], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": [p for _, p in trainable], "weight_decay": tp.weight_decay}]
    if tp.optimizer == "sgd":
        if tp.nesterov and tp.momentum == 0:
            raise ConfigError("train.nesterov: true needs train.momentum > 0; set a momentum or nesterov: false")
        return torch.optim.SGD(groups, lr=tp.lr, momentum=tp.momentum, nesterov=tp.nesterov)
    if tp.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tp.lr)
    raise ConfigError(f"train.optimizer: {tp.optimizer!r} is not supported; choose sgd or adamw")


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


def build_scheduler(optimizer: torch.optim.Optimizer, tp: TrainParams,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-batch schedule whose state_dict resumes exactly (numbers only, no pickled code).

    onecycle is torch's OneCycleLR peaking at train.lr; its warm-up fraction is
    warmup_epochs/epochs when warmup_epochs > 0, else torch's default 0.3. Momentum
    is not cycled, so train.momentum means what it says.
    """
    if tp.schedule == "onecycle":
        pct_start = tp.warmup_epochs / tp.epochs if tp.warmup_epochs > 0 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=tp.lr, total_steps=tp.epochs * steps_per_epoch, pct_start=pct_start,
            cycle_momentum=False,
        )
    # A closure, not a callable object: LambdaLR then stores nothing for it in its state_dict.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, tp, steps_per_epoch))


def build_training(
    params: Params, meta: dict[str, Any], device: torch.device, steps_per_epoch: int, precision: str = "fp32"
) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, torch.amp.GradScaler, nn.Module]:
    """Model (on device, channels_last if asked), optimizer, schedule, grad scaler and loss of a run.

    ``precision`` is the one :func:`resolve_precision` settled on (the scaler is for fp16).
    """
    tp = params.train
    model = create_model(params, meta).to(device)
    if tp.channels_last:
        check_channels_last(model, device)
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, tp)
    scheduler = build_scheduler(optimizer, tp, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=tp.label_smoothing)
    return model, optimizer, scheduler, scaler, criterion


# ----------------------------------------------------------------------------- resume helpers


#: train keys that say where and how fast to run, not what to train: changing them keeps a resume valid.
RUNTIME_KEYS = ("device", "num_threads", "compile")


def _data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    return {"source_sha256": meta.get("source_sha256"), "counts": meta.get("counts")}


def _recipe(params: Params) -> dict[str, Any]:
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in RUNTIME_KEYS}
    return {"model": dataclasses.asdict(params.model), "train": train}


def fingerprint(params: Params, meta: dict[str, Any]) -> str:
    """Hash of the model and train params (less RUNTIME_KEYS) and the data's identity; a resume must match it."""
    blob = {**_recipe(params), "data": _data_identity(meta)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    """Every RNG, as tensors/lists/ints only (weights_only loading rejects numpy arrays)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def _explain_mismatch(ckpt: dict[str, Any], params: Params, meta: dict[str, Any]) -> str:
    """Which params or data facts differ between a checkpoint and this run, for the log."""
    old = flatten({k: ckpt["params"].get(k, {}) for k in ("model", "train")})
    new = flatten(_recipe(params))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
    if ckpt.get("data_identity") != _data_identity(meta):
        changed.append("the prepared data (source_sha256 or counts)")
    return "; ".join(changed) or "the fingerprint"


# ----------------------------------------------------------------------------- one pass


def evaluate(model: nn.Module, loader: DeviceLoader, precision: str = "fp32") -> dict[str, float]:
    """Mean cross-entropy (no label smoothing) and top-1 accuracy over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=loader.device)
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = 0
    with torch.inference_mode(), autocast(loader.device, precision):
        for x, y in loader:
            logits = model(x)
            loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
    model.train(was_training)
    return {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen}


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
    bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
               disable=not progress_enabled())
    t0 = time.perf_counter()
    for step, (x, y) in enumerate(loader):
        with autocast(device, precision):
            logits = model(x)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        lr = optimizer.param_groups[0]["lr"]  # the lr this step used (a Python float: no sync)
        scheduler.step()

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
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}", acc=f"{correct.item() / seen:.4f}",
                            img_s=f"{seen / (time.perf_counter() - t0):.0f}")
    bar.close()
    train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # syncs: the timing is honest
    seconds = time.perf_counter() - t0
    return {"loss": train_loss, "accuracy": train_acc, "images": seen, "seconds": seconds,
            "images_per_sec": seen / seconds, "lr": lr}


def _check_finite(first_bad: Tensor, epoch: int, steps: int) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise TrainingError(
            f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} of {steps} "
            f"(global step {epoch * steps + step + 1}); lower train.lr, set train.grad_clip (e.g. 1.0) "
            "or check the input data for bad values"
        )


# ----------------------------------------------------------------------------- the run


def find_resume_checkpoint(params: Params, meta: dict[str, Any], out_dir: str | Path) -> dict[str, Any] | None:
    """The unfinished checkpoint ``out_dir/last.pt`` of this very recipe and data, or None.

    None (a fresh start, with a log line saying why) when there is no last.pt, when
    it belongs to other params or data, or when its run finished (all epochs, or
    stopped early). A corrupt, truncated or foreign last.pt raises CheckpointError:
    silently starting over would throw away the work it was meant to keep.
    """
    path = Path(out_dir) / "last.pt"
    if not path.exists():
        log.info("no %s: starting fresh", path)
        return None
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed (missing {missing}); delete it to start fresh")
    if ckpt["fingerprint"] != fingerprint(params, meta):
        log.info("%s is from another recipe or data (%s): starting fresh", path, _explain_mismatch(ckpt, params, meta))
        return None
    if ckpt["stopped_early"] or ckpt["epoch"] >= params.train.epochs:
        how = "stopped early" if ckpt["stopped_early"] else "finished"
        log.info("%s is a %s run (epoch %d/%d): starting fresh", path, how, ckpt["epoch"], params.train.epochs)
        return None
    log.info("resuming from %s at epoch %d/%d", path, ckpt["epoch"], params.train.epochs)
    return ckpt


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
) -> TrainResult:
    """Train params.model with the params.train recipe; write out_dir/best.pt and last.pt every epoch.

    Args:
        params: the validated params (the model and train sections are used).
        meta: the prepared data's meta.json (classes, channels, mean, std, image_size, counts).
        train_loader: a DeviceLoader with train=True; its device is the training device
            (see :func:`configure_torch`).
        val_loader: a DeviceLoader with train=False on the same device.
        out_dir: where best.pt and last.pt go (models/).
        resume: a checkpoint from :func:`find_resume_checkpoint` to continue.
        extra: stored in every checkpoint under "extra" (the stage keeps the MLflow run id there).
        on_epoch: called as on_epoch(epoch, metrics) after each epoch, once its checkpoint is written.
    """
    tp = params.train
    device = train_loader.device
    if val_loader.device != device:
        raise TrainingError(f"train data is on {device} but validation data on {val_loader.device}; "
                            "build both loaders on one device")
    out_dir = Path(out_dir)
    best_path, last_path = out_dir / "best.pt", out_dir / "last.pt"
    steps_per_epoch = len(train_loader)
    precision = resolve_precision(tp.precision, device)
    higher_is_better = tp.early_stopping_metric == "val_accuracy"

    seed_everything(tp.seed)
    model, optimizer, scheduler, scaler, criterion = build_training(params, meta, device, steps_per_epoch,
                                                                    precision)

    # Run state; everything here goes into the checkpoints.
    history: list[dict[str, float]] = []
    best_metric: float | None = None
    best_epoch = 0
    bad_evals = 0  # evaluations since the last improvement
    stopped_early = False
    start_epoch = 0
    extra = dict(extra or {})
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if resume["scaler"]:
            scaler.load_state_dict(resume["scaler"])
        history = list(resume["history"])
        best_metric, best_epoch = resume["best_metric"], resume["best_epoch"]
        bad_evals, start_epoch = resume["bad_evals"], resume["epoch"]
        extra = {**resume.get("extra", {}), **extra}
        _set_rng_state(resume["rng"])

    forward = model
    if tp.compile:
        check_channels_last(model, device, key="train.compile")
        # Training only: eval runs the plain module, a second compiled graph would cost more than it saves.
        log.info("compiling the model with torch.compile (the first steps are slow)")
        forward = torch.compile(model)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %d trainable parameters, %d steps/epoch, %s, precision %s, %s", params.model.name, trainable,
             steps_per_epoch, f"resuming at epoch {start_epoch + 1}" if resume else "fresh start", precision, device)

    def state(epoch_done: int) -> dict[str, Any]:
        return {
            "arch": arch_from(params, meta),
            "model": model.state_dict(),
            "classes": list(meta["classes"]),
            "mean": list(meta["mean"]),
            "std": list(meta["std"]),
            "image_size": list(meta["image_size"]),
            "params": dataclasses.asdict(params),
            "epoch": epoch_done,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": _rng_state(),
            "history": history,
            "best_metric": best_metric,
            "best_epoch": best_epoch,
            "bad_evals": bad_evals,
            "stopped_early": stopped_early,
            "fingerprint": fingerprint(params, meta),
            "data_identity": _data_identity(meta),
            "extra": extra,
        }

    for epoch in range(start_epoch, tp.epochs):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch)
        model.train()
        freeze_batchnorm_if_frozen(model)  # a frozen backbone keeps its BN statistics too
        tr = train_one_epoch(forward, train_loader, optimizer, scheduler, scaler, criterion, precision=precision,
                             grad_clip=tp.grad_clip, epoch=epoch, epochs=tp.epochs)
        metrics: dict[str, float] = {"epoch": epoch + 1, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"]}

        # Validate every eval_every epochs and always after the last one.
        improved = False
        if (epoch + 1) % tp.eval_every == 0 or epoch + 1 == tp.epochs:
            va = evaluate(model, val_loader, precision)
            metrics.update(val_loss=va["loss"], val_accuracy=va["accuracy"])
            value = metrics[tp.early_stopping_metric]
            improved = best_metric is None or (value > best_metric if higher_is_better else value < best_metric)
            if improved:
                best_metric, best_epoch, bad_evals = value, epoch + 1, 0
            else:
                bad_evals += 1
                stopped_early = 0 < tp.early_stopping_patience <= bad_evals
        metrics.update(lr=tr["lr"], images_per_sec=tr["images_per_sec"], epoch_seconds=time.perf_counter() - t0)
        history.append(metrics)

        # Checkpoints before the callback: an interrupt from here on loses nothing.
        ckpt = state(epoch + 1)
        if improved:
            save_checkpoint(best_path, ckpt)
        save_checkpoint(last_path, ckpt)
        val = (f" val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.4f}"
               if "val_loss" in metrics else "")
        log.info("epoch %d/%d train_loss %.4f train_acc %.4f%s lr %.3g %.0f img/s %.1fs%s", epoch + 1, tp.epochs,
                 metrics["train_loss"], metrics["train_accuracy"], val, metrics["lr"], metrics["images_per_sec"],
                 metrics["epoch_seconds"], " (best)" if improved else "")
        if on_epoch is not None:
            on_epoch(epoch + 1, dict(metrics))
        if stopped_early:
            log.info("early stopping: %s has not improved for %d evaluations (best %.4f at epoch %d)",
                     tp.early_stopping_metric, bad_evals, best_metric, best_epoch)
            break

    if best_metric is None:  # the last epoch always validates, so only a hand-made resume state gets here
        raise TrainingError("training ended without a validation pass; delete models/last.pt and rerun")
    return TrainResult(
        model=model,
        history=history,
        epochs_completed=len(history),
        best_epoch=best_epoch,
        best_metric=best_metric,
        metric_name=tp.early_stopping_metric,
        stopped_early=stopped_early,
        resumed_from=start_epoch if resume is not None else None,
        train_seconds=sum(h["epoch_seconds"] for h in history),
        images_per_sec=statistics.harmonic_mean([h["images_per_sec"] for h in history]),
        device=str(device),
        precision=precision,
        best_path=best_path,
        last_path=last_path,
    )
