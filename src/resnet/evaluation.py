"""Evaluation: loss, top-1/top-5, per-class precision/recall/F1, confusion matrix.

Reads top to bottom:

* pure metric functions on NumPy arrays (:func:`confusion_matrix`,
  :func:`per_class_metrics`), easy to check by hand;
* :class:`EvalResult` and :func:`evaluate`, which runs a model over a loader (training's
  per-epoch validation runs it too, so train.json and val.json agree).

A checkpoint evaluated on a prepared split (what the validate and evaluate stages do)
is :mod:`resnet.split_evaluation`.
The files the validate and evaluate stages draw from a result are in :mod:`resnet.plots`.

Metric names are the same for every split; only the prefix differs (``val_accuracy``,
``test_accuracy``), so validation and test numbers line up in DVC and MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet.runtime import autocast
from resnet.tta import tta_logits
from resnet.utils import PipelineError

__all__ = [
    "EvaluationError",
    "confusion_matrix",
    "per_class_metrics",
    "EvalResult",
    "evaluate",
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
    tta: str = "none",
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
        tta: test-time augmentation, one of :data:`resnet.tta.TTA_MODES` (the checkpoint's
            ``model.tta``): the logits are :func:`resnet.tta.tta_logits`'s.

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
        outputs = _forward_pass(model, loader, num_classes, device, precision, label_smoothing, tta)
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
    tta: str,
) -> _PassOutputs:
    k = min(5, num_classes)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    losses, labels, tops, probs = [], [], [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        y = y.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = tta_logits(model, x, tta).float()
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
