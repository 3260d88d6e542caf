"""Evaluation: loss, top-1/top-5, per-class precision/recall/F1, confusion matrix.

Reads top to bottom:

* pure metric functions on NumPy arrays (:func:`confusion_matrix`,
  :func:`per_class_metrics`), easy to check by hand;
* :class:`EvalResult` and :func:`evaluate`, which runs a model over a loader (training's
  per-epoch validation runs it too, so train.json and val.json agree);
* loading a checkpoint for evaluation, checking that it fits the data.

The files the validate and evaluate stages draw from a result are in :mod:`resnet.plots`.

Metric names are the same for every split; only the prefix differs (``val_accuracy``,
``test_accuracy``), so validation and test numbers line up in DVC and MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from resnet.models import ResNet
from resnet.paths import CHECKPOINTS, PREPARED
from resnet.runtime import autocast, resolve_precision
from resnet.utils import PipelineError

__all__ = [
    "EvaluationError",
    "confusion_matrix",
    "per_class_metrics",
    "EvalResult",
    "evaluate",
    "load_model_for_data",
    "SplitEvaluation",
    "trained_with",
    "evaluate_checkpoint",
    "check_belongs_to_run",
]

log = logging.getLogger(__name__)


class EvaluationError(PipelineError, ValueError):
    """A model and the data it is asked to evaluate do not fit together."""


# --------------------------------------------------------------------------- metrics


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts of (actual, predicted) pairs: ``cm[i, j]`` = images of class i predicted as j.

    Args:
        y_true, y_pred: integer labels, 1-D, same length (NumPy arrays, lists or tensors).
        num_classes: size of the matrix; every label must lie in ``0..num_classes-1``.

    Returns:
        int64 array of shape (num_classes, num_classes); rows are actual classes.
    """
    t, p = _as_numpy(y_true), _as_numpy(y_pred)
    if t.ndim != 1 or t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must be 1-D and of equal length, got shapes {t.shape} and {p.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if t.size and not (np.issubdtype(t.dtype, np.integer) and np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"labels must be integers, got {t.dtype} and {p.dtype}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds labels in {a.min()}..{a.max()}, outside 0..{num_classes - 1}")
    # One bincount over the flattened (actual, predicted) index instead of a Python loop.
    flat = t.astype(np.int64) * num_classes + p.astype(np.int64)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_metrics(cm: Any) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support per class from a confusion matrix (rows = actual).

    A class that is never predicted has precision 0.0, one that never occurs has
    recall 0.0, and F1 is 0.0 when both are (scikit-learn's ``zero_division=0``):
    an undefined ratio must not turn the macro average into NaN.

    Returns:
        {"precision", "recall", "f1": float64 arrays, "support": int64 array}, index = class.
    """
    cm = _as_numpy(cm).astype(np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix must be square, got shape {cm.shape}")
    tp = np.diag(cm).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)  # column sums: tp + fp
    actual = cm.sum(axis=1)  # row sums: tp + fn = support

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros_like(num, dtype=np.float64), where=den > 0)

    return {
        "precision": ratio(tp, predicted),
        "recall": ratio(tp, actual.astype(np.float64)),
        # 2tp / (2tp + fp + fn): the harmonic mean of precision and recall, without 0/0.
        "f1": ratio(2.0 * tp, predicted + actual),
        "support": actual,
    }


# --------------------------------------------------------------------------- evaluate


def _key(prefix: str, name: str) -> str:
    return f"{prefix}_{name}" if prefix else name


@dataclass
class EvalResult:
    """Everything one pass over a split produced; arrays are NumPy, index = image or class.

    ``top5_accuracy`` is top-k accuracy with ``k = topk = min(5, num_classes)``; the name
    stays the same for every dataset so that runs compare. Macro averages weigh every
    class equally, including classes absent from the split (they count as 0.0).
    """

    loss: float  # mean cross-entropy
    accuracy: float
    top5_accuracy: float
    topk: int
    confusion: np.ndarray  # (C, C) int64, rows = actual, cols = predicted
    precision: np.ndarray  # (C,)
    recall: np.ndarray  # (C,)
    f1: np.ndarray  # (C,)
    support: np.ndarray  # (C,) int64, images per actual class
    labels: np.ndarray  # (N,) actual class per image, loader order
    predictions: np.ndarray  # (N,) predicted class per image
    confidences: np.ndarray  # (N,) softmax probability of the predicted class
    misclassified_indices: np.ndarray  # (M,) image indices where prediction != label
    misclassified_probabilities: np.ndarray  # (M, C) full softmax rows of those images

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

    @property
    def chance_accuracy(self) -> float:
        """The commonest actual class's share of the images (0.0 for none)."""
        total = int(self.support.sum())
        return float(self.support.max() / total) if total else 0.0

    @property
    def macro_precision(self) -> float:
        return float(self.precision.mean())

    @property
    def macro_recall(self) -> float:
        return float(self.recall.mean())

    @property
    def macro_f1(self) -> float:
        return float(self.f1.mean())

    def flat_metrics(self, prefix: str = "") -> dict[str, float]:
        """The scalar metrics as ``{prefix_name: value}``, ready for ``mlflow.log_metrics``."""
        values = {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "top5_accuracy": self.top5_accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
        }
        return {_key(prefix, name): float(v) for name, v in values.items()}

    def per_class(self, classes: Sequence[str]) -> dict[str, dict[str, float | int]]:
        """``{class name: {precision, recall, f1, support}}`` in class-index order."""
        self._check_classes(classes)
        return {
            name: {
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "f1": float(self.f1[i]),
                "support": int(self.support[i]),
            }
            for i, name in enumerate(classes)
        }

    def per_class_frame(self, classes: Sequence[str]) -> pd.DataFrame:
        """One row per class, by class index: class, precision, recall, f1, support, accuracy.

        A class's accuracy (the share of its images classified correctly) is its recall.
        """
        self._check_classes(classes)
        return pd.DataFrame(
            {
                "class": list(classes),
                "precision": self.precision,
                "recall": self.recall,
                "f1": self.f1,
                "support": self.support,
                "accuracy": self.recall,
            }
        )

    def _check_classes(self, classes: Sequence[str]) -> None:
        if len(classes) != self.num_classes:
            raise ValueError(f"{len(classes)} class names for a {self.num_classes}-class result")


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    label_smoothing: float = 0.0,
    precision: str = "fp32",
) -> EvalResult:
    """Run ``model`` over every batch of ``loader`` and compute all metrics.

    The one evaluation of the package: training validates each epoch with it and the
    validate stage evaluates the saved checkpoint with it, so both report the same numbers.

    Args:
        model: a classifier returning logits (N, num_classes); moved to ``device`` and put
            in eval mode for the pass, then returned to its previous train/eval mode.
        loader: yields ``(x, y)`` batches in a fixed order, e.g. ``DeviceLoader(train=False)``.
        num_classes: number of classes (the model's output size).
        device: where to compute; None = where the model's parameters are.
        label_smoothing: for the loss only (0.0 = plain cross-entropy, comparable across runs).
        precision: fp32, or bf16/fp16 autocast for the forward pass (one that
            :func:`resnet.runtime.resolve_precision` settled on); the loss, softmax and
            top-k are computed in fp32 from the logits either way.

    The mean loss is one float64 sum over the per-image losses, so how the images are
    batched does not change it (training validates at train.batch_size, the validate
    stage at validate.batch_size). Everything is accumulated on the device and copied to
    the host once at the end: a ``.item()`` per batch would stall a GPU on every step. The
    full softmax rows are kept on the device until then (N x C floats) so that
    misclassified images keep theirs.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.to(device).eval()
    try:
        outputs = _forward_pass(model, loader, num_classes, device, precision, label_smoothing)
    finally:
        model.train(was_training)
    return _result(outputs, num_classes)


@dataclass
class _PassOutputs:
    """What one pass leaves on the device, per image (in loader order) and in total."""

    losses: Tensor  # (N,) float32
    labels: Tensor  # (N,) int64
    top: Tensor  # (N, k) predicted classes, most likely first
    probs: Tensor  # (N, C) softmax rows
    topk_hits: Tensor  # () int64


def _forward_pass(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    num_classes: int,
    device: torch.device,
    precision: str,
    label_smoothing: float,
) -> _PassOutputs:
    k = min(5, num_classes)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    losses, labels, tops, probs = [], [], [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(x).float()
        if logits.ndim != 2 or logits.shape[1] != num_classes:
            raise EvaluationError(
                f"the model outputs shape {tuple(logits.shape)}, expected (batch, {num_classes}); "
                "num_classes must match the model's classifier"
            )
        losses.append(F.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing))
        # Top-1 is the first of the top-k, so ties can never make top-5 < top-1.
        top = logits.topk(k, dim=1).indices
        topk_hits += (top == y[:, None]).any(dim=1).sum()
        labels.append(y)
        tops.append(top)
        probs.append(logits.softmax(dim=1))
    if not labels:
        raise EvaluationError("the loader yielded no batches; there is nothing to evaluate")
    return _PassOutputs(torch.cat(losses), torch.cat(labels), torch.cat(tops), torch.cat(probs), topk_hits)


def _result(out: _PassOutputs, num_classes: int) -> EvalResult:
    """All metrics from one pass, with the one device-to-host copy of the whole pass."""
    predicted = out.top[:, 0]
    wrong = predicted != out.labels
    y_np = out.labels.cpu().numpy()
    p_np = predicted.cpu().numpy()
    n = len(y_np)
    cm = confusion_matrix(y_np, p_np, num_classes)
    pcm = per_class_metrics(cm)
    return EvalResult(
        # One float64 sum over every image's loss, in image order: the same number however the images were batched.
        loss=out.losses.double().sum().item() / n,
        accuracy=float(np.trace(cm)) / n,
        top5_accuracy=out.topk_hits.item() / n,
        topk=out.top.shape[1],
        confusion=cm,
        precision=pcm["precision"],
        recall=pcm["recall"],
        f1=pcm["f1"],
        support=pcm["support"],
        labels=y_np,
        predictions=p_np,
        confidences=out.probs.gather(1, predicted[:, None]).squeeze(1).cpu().numpy(),
        misclassified_indices=wrong.nonzero().squeeze(1).cpu().numpy(),
        misclassified_probabilities=out.probs[wrong].cpu().numpy(),
    )


# --------------------------------------------------------------------------- checkpoints


def load_model_for_data(
    path: str | Path,
    classes: Sequence[str],
    *,
    channels: int | None = None,
    image_size: Sequence[int] | None = None,
    data_source: str = "the prepared data",
) -> tuple[ResNet, dict[str, Any]]:
    """Load the checkpoint at ``path`` and rebuild its model, checking that it fits the data.

    Args:
        path: checkpoint file (``models/best.pt``).
        classes: the data's class names, index = label (``meta.json``'s ``classes``).
        channels, image_size: the data's, when known; a channel mismatch is an error,
            an image-size mismatch only a warning (the network pools globally).
        data_source: where ``classes`` came from, for error messages.

    Returns:
        (model on the CPU, the checkpoint dict).

    Raises:
        CheckpointError: missing, truncated, corrupt, or weights that do not fit the architecture.
        EvaluationError: the checkpoint was trained on other classes or channels.
    """
    path = Path(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    trained_on = list(ckpt["classes"])
    if trained_on != list(classes):
        raise EvaluationError(
            f"checkpoint {path} was trained on classes {_short(trained_on)} but {data_source} lists "
            f"{_short(list(classes))}; retrain on this data (dvc repro train) or prepare the data "
            "the model was trained on"
        )
    in_channels = ckpt["arch"].get("in_channels")
    if channels is not None and in_channels != channels:
        raise EvaluationError(
            f"checkpoint {path} expects {in_channels}-channel images but {data_source} has {channels}; "
            "set data.channels to match the model, or retrain (dvc repro train)"
        )
    trained_size = ckpt.get("image_size")
    if image_size is not None and trained_size is not None and list(trained_size) != list(image_size):
        log.warning(
            "checkpoint %s was trained on %s images, the data is %s; evaluating anyway",
            path,
            list(trained_size),
            list(image_size),
        )
    try:
        model = model_from_checkpoint(ckpt)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot rebuild its model ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "it was written by an incompatible version; rerun training (dvc repro train)"
        ) from e
    return model, ckpt


@dataclass
class SplitEvaluation:
    """A checkpoint evaluated on one prepared split: what the validate and evaluate stages write."""

    result: EvalResult
    checkpoint: Path
    epoch: int | None
    classes: list[str]
    images: np.ndarray  # the split's uint8 images, for the misclassified grid

    def metrics(self, prefix: str) -> dict[str, Any]:
        """The metrics JSON: prefixed numbers plus which checkpoint they describe.

        Per-class numbers go to the per-class CSV rather than here: nested in the JSON
        they would become one ``dvc metrics show`` column per class and metric.
        """
        return {
            **self.result.flat_metrics(prefix),
            "checkpoint": str(self.checkpoint),
            "epoch": self.epoch,
            "num_images": self.result.num_images,
            "num_classes": self.result.num_classes,
            # The accuracy of always answering the split's commonest class: what "learned nothing" scores.
            "chance_accuracy": self.result.chance_accuracy,
            "topk": self.result.topk,
        }


def trained_with(ckpt: dict[str, Any], device: torch.device) -> tuple[str, bool]:
    """(precision, channels_last) of the checkpoint's training run, as its per-epoch validation used them on ``device``.

    A checkpoint without params (not written by training) is evaluated in fp32, NCHW.
    """
    train = ckpt.get("params", {}).get("train", {})
    return resolve_precision(train.get("precision", "fp32"), device), bool(train.get("channels_last", False))


def evaluate_checkpoint(
    which: str,
    split: str,
    batch_size: int,
    *,
    device: torch.device,
    data_dir: str | Path = PREPARED,
    run_id: str | None = None,
) -> SplitEvaluation:
    """Evaluate ``models/<which>.pt`` on the prepared ``split``, normalised, and computed, as in training.

    The precision and memory format are those the training run validated in (:func:`trained_with`),
    so on the validation split this reproduces the val_* numbers training recorded for that epoch.

    Raises CheckpointError, EvaluationError or resnet.data.errors.DataError with a message
    that names the bad file or value and the fix.
    """
    data_dir, checkpoint = Path(data_dir), CHECKPOINTS[which]
    try:
        model, ckpt, classes, images, loader, precision = _load_for_split(
            checkpoint, data_dir, split, batch_size, device, run_id
        )
    except (KeyError, ValueError) as e:
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"cannot evaluate {checkpoint} on {data_dir}/{split}: {e}") from e
    n, epoch = len(images), ckpt.get("epoch")
    log.info(
        "evaluating %s (epoch %s) on %d %s images on %s, precision %s", checkpoint, epoch, n, split, device, precision
    )
    result = evaluate(model, loader, len(classes), device=device, precision=precision)
    log.info("%s: %s", split, ", ".join(f"{k} {v:.4f}" for k, v in result.flat_metrics().items()))
    bad = {k: v for k, v in result.flat_metrics(split).items() if not np.isfinite(v)}
    if bad:
        raise EvaluationError(
            f"{checkpoint} gives non-finite metrics on {split} ({_short(sorted(bad))}): the model diverged; "
            "lower train.lr or check the data, then retrain (dvc repro train)"
        )
    return SplitEvaluation(result, checkpoint, epoch, classes, images)


def _load_for_split(
    checkpoint: Path, data_dir: Path, split: str, batch_size: int, device: torch.device, run_id: str | None
) -> tuple[ResNet, dict[str, Any], list[str], np.ndarray, Any, str]:
    """The checkpoint's model (checked against the data and the run) and a loader over the split, as in training."""
    from resnet.data.store import load_meta, load_split
    from resnet.loader import DeviceLoader

    meta = load_meta(data_dir)
    classes = list(meta["classes"])
    model, ckpt = load_model_for_data(
        checkpoint,
        classes,
        channels=meta.get("channels"),
        image_size=meta.get("image_size"),
        data_source=str(data_dir / "meta.json"),
    )
    check_belongs_to_run(checkpoint, ckpt, run_id)
    _check_finite_weights(checkpoint, ckpt)
    images, labels = load_split(data_dir, split)
    precision, channels_last = trained_with(ckpt, torch.device(device))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    # The checkpoint's statistics, not recomputed ones: exactly what the model saw in training.
    loader = DeviceLoader(
        images, labels, batch_size, mean=ckpt["mean"], std=ckpt["std"], device=device, channels_last=channels_last
    )
    return model, ckpt, classes, images, loader, precision


def check_belongs_to_run(checkpoint: Path, ckpt: dict[str, Any], run_id: str | None) -> None:
    """Refuse a checkpoint that the train stage did not write for MLflow run ``run_id`` (run.json's run).

    ``run_id`` None: no run to check against (evaluation outside the pipeline).
    """
    if run_id is None:
        return
    extra = ckpt.get("extra")
    own = extra.get("run_id") if isinstance(extra, dict) else None
    if own is None:
        raise EvaluationError(
            f"checkpoint {checkpoint} records no MLflow run, so it was not written by the train stage of run "
            f"{run_id} in models/run.json; rerun training (dvc repro -f train)"
        )
    if own != run_id:
        raise EvaluationError(
            f"checkpoint {checkpoint} belongs to MLflow run {own}, not to run {run_id} in models/run.json; "
            "rerun training (dvc repro -f train) so checkpoint and run.json agree"
        )


def _check_finite_weights(checkpoint: Path, ckpt: dict[str, Any]) -> None:
    bad = [
        k
        for k, v in ckpt["model"].items()
        if isinstance(v, Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise EvaluationError(
            f"checkpoint {checkpoint} has non-finite weights ({_short(bad)}): the training diverged; "
            "lower train.lr or check the data, then retrain (dvc repro -f train)"
        )


def _short(items: list[str], limit: int = 12) -> str:
    """A class list for an error message, cut short for CIFAR-100-sized lists."""
    if len(items) <= limit:
        return repr(items)
    shown = ", ".join(repr(c) for c in items[:limit])
    return f"[{shown}, ...] ({len(items)} classes)"
