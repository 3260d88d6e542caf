"""Evaluation: loss, top-1/top-5, per-class precision/recall/F1, confusion matrix, plots.

Reads top to bottom:

* pure metric functions on NumPy arrays (:func:`confusion_matrix`,
  :func:`per_class_metrics`), easy to check by hand;
* :class:`EvalResult` and :func:`evaluate`, which runs a model over a loader;
* loading a checkpoint for evaluation, checking that it fits the data;
* the files the validate and evaluate stages write: metrics JSON, DVC confusion CSV,
  per-class CSV, and two PNGs drawn with Matplotlib's Agg canvas (no display, and no
  global pyplot state, so importing this module never changes anyone's backend).

Metric names are the same for every split; only the prefix differs (``val_accuracy``,
``test_accuracy``), so validation and test numbers line up in DVC and MLflow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from resnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from resnet.models import ResNet
from resnet.utils import PipelineError, atomic_path

__all__ = [
    "CHECKPOINTS",
    "EvaluationError",
    "confusion_matrix",
    "per_class_metrics",
    "EvalResult",
    "evaluate",
    "load_model_for_data",
    "SplitEvaluation",
    "evaluate_checkpoint",
    "write_confusion_csv",
    "write_per_class_csv",
    "plot_confusion_matrix",
    "plot_misclassified",
]

log = logging.getLogger(__name__)

#: Where the params' ``checkpoint: best | last`` choice points.
CHECKPOINTS: dict[str, Path] = {"best": Path("models/best.pt"), "last": Path("models/last.pt")}

#: Beyond this many classes the per-cell counts would be unreadable, so the PNG shows colours only.
MAX_ANNOTATED_CLASSES = 40


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
    actual = cm.sum(axis=1)                         # row sums: tp + fn = support

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

    loss: float                                 # mean cross-entropy
    accuracy: float
    top5_accuracy: float
    topk: int
    confusion: np.ndarray                       # (C, C) int64, rows = actual, cols = predicted
    precision: np.ndarray                       # (C,)
    recall: np.ndarray                          # (C,)
    f1: np.ndarray                              # (C,)
    support: np.ndarray                         # (C,) int64, images per actual class
    labels: np.ndarray                          # (N,) actual class per image, loader order
    predictions: np.ndarray                     # (N,) predicted class per image
    confidences: np.ndarray                     # (N,) softmax probability of the predicted class
    misclassified_indices: np.ndarray           # (M,) image indices where prediction != label
    misclassified_probabilities: np.ndarray     # (M, C) full softmax rows of those images

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.confusion.shape[0])

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
        return pd.DataFrame({
            "class": list(classes),
            "precision": self.precision,
            "recall": self.recall,
            "f1": self.f1,
            "support": self.support,
            "accuracy": self.recall,
        })

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
) -> EvalResult:
    """Run ``model`` over every batch of ``loader`` and compute all metrics.

    Args:
        model: a classifier returning logits (N, num_classes); moved to ``device`` and put
            in eval mode for the pass, then returned to its previous train/eval mode.
        loader: yields ``(x, y)`` batches in a fixed order, e.g. ``DeviceLoader(train=False)``.
        num_classes: number of classes (the model's output size).
        device: where to compute; None = where the model's parameters are.
        label_smoothing: for the loss only (0.0 = plain cross-entropy, comparable across runs).

    Everything is accumulated on the device and copied to the host once at the end: a
    ``.item()`` per batch would stall a GPU on every step. The full softmax rows are kept
    on the device until then (N x C floats) so that misclassified images keep theirs.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    k = min(5, num_classes)
    was_training = model.training
    model.to(device).eval()

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    labels: list[Tensor] = []
    preds: list[Tensor] = []
    probs: list[Tensor] = []
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logits = model(x).float()
            if logits.ndim != 2 or logits.shape[1] != num_classes:
                raise EvaluationError(
                    f"the model outputs shape {tuple(logits.shape)}, expected (batch, {num_classes}); "
                    "num_classes must match the model's classifier"
                )
            loss_sum += F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
            # Top-1 is the first of the top-k, so ties can never make top-5 < top-1.
            top = logits.topk(k, dim=1).indices
            topk_hits += (top == y[:, None]).any(dim=1).sum()
            labels.append(y)
            preds.append(top[:, 0])
            probs.append(logits.softmax(dim=1))
    finally:
        model.train(was_training)
    if not labels:
        raise EvaluationError("the loader yielded no batches; there is nothing to evaluate")

    y_all, p_all, prob_all = torch.cat(labels), torch.cat(preds), torch.cat(probs)
    wrong = p_all != y_all
    # The one device-to-host copy of the whole pass.
    y_np = y_all.cpu().numpy()
    p_np = p_all.cpu().numpy()
    conf_np = prob_all.gather(1, p_all[:, None]).squeeze(1).cpu().numpy()
    wrong_idx = wrong.nonzero().squeeze(1).cpu().numpy()
    wrong_probs = prob_all[wrong].cpu().numpy()
    n = len(y_np)
    loss = loss_sum.item() / n
    top5 = topk_hits.item() / n

    cm = confusion_matrix(y_np, p_np, num_classes)
    pcm = per_class_metrics(cm)
    return EvalResult(
        loss=loss,
        accuracy=float(np.trace(cm)) / n,
        top5_accuracy=top5,
        topk=k,
        confusion=cm,
        precision=pcm["precision"],
        recall=pcm["recall"],
        f1=pcm["f1"],
        support=pcm["support"],
        labels=y_np,
        predictions=p_np,
        confidences=conf_np,
        misclassified_indices=wrong_idx,
        misclassified_probabilities=wrong_probs,
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
        log.warning("checkpoint %s was trained on %s images, the data is %s; evaluating anyway",
                    path, list(trained_size), list(image_size))
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
        return {**self.result.flat_metrics(prefix), "checkpoint": str(self.checkpoint), "epoch": self.epoch,
                "num_images": self.result.num_images, "num_classes": self.result.num_classes,
                "topk": self.result.topk}


def evaluate_checkpoint(which: str, split: str, batch_size: int, *, device: torch.device,
                        data_dir: str | Path = "data/prepared") -> SplitEvaluation:
    """Evaluate ``models/<which>.pt`` on the prepared ``split``, normalised as in training.

    Raises CheckpointError, EvaluationError or resnet.data.DataError with a message
    that names the bad file or value and the fix.
    """
    from resnet.data import load_meta, load_split
    from resnet.loader import DeviceLoader

    data_dir = Path(data_dir)
    checkpoint = CHECKPOINTS[which]
    meta = load_meta(data_dir)
    try:
        classes = list(meta["classes"])
        model, ckpt = load_model_for_data(checkpoint, classes, channels=meta.get("channels"),
                                          image_size=meta.get("image_size"),
                                          data_source=str(data_dir / "meta.json"))
        images, labels = load_split(data_dir, split)
        # The checkpoint's statistics, not recomputed ones: exactly what the model saw in training.
        loader = DeviceLoader(images, labels, batch_size, mean=ckpt["mean"], std=ckpt["std"], device=device)
    except (KeyError, ValueError) as e:
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"cannot evaluate {checkpoint} on {data_dir}/{split}: {e}") from e
    log.info("evaluating %s (epoch %s) on %d %s images on %s", checkpoint, ckpt.get("epoch"), len(labels), split, device)
    result = evaluate(model, loader, len(classes), device=device)
    log.info("%s: loss %.4f, accuracy %.4f, top-%d %.4f, macro F1 %.4f", split, result.loss, result.accuracy,
             result.topk, result.top5_accuracy, result.macro_f1)
    return SplitEvaluation(result, checkpoint, ckpt.get("epoch"), classes, images)


def _short(items: list[str], limit: int = 12) -> str:
    """A class list for an error message, cut short for CIFAR-100-sized lists."""
    if len(items) <= limit:
        return repr(items)
    shown = ", ".join(repr(c) for c in items[:limit])
    return f"[{shown}, ...] ({len(items)} classes)"


# --------------------------------------------------------------------------- files


def write_confusion_csv(path: str | Path, result: EvalResult, classes: Sequence[str]) -> None:
    """One row per image, ``actual,predicted`` class names: DVC's ``confusion`` plot template."""
    result._check_classes(classes)
    names = np.asarray(list(classes), dtype=object)
    frame = pd.DataFrame({"actual": names[result.labels], "predicted": names[result.predictions]})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_per_class_csv(path: str | Path, result: EvalResult, classes: Sequence[str]) -> None:
    """The per-class table (:meth:`EvalResult.per_class_frame`) as CSV, by class index."""
    frame = result.per_class_frame(classes)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # the Agg canvas renders off-screen
    return fig


def _save_png(fig: Figure, path: str | Path, dpi: int = 100) -> None:
    # The temp file ends in .tmp, so the format must be named rather than guessed.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def plot_confusion_matrix(path: str | Path, cm: np.ndarray, classes: Sequence[str], *, title: str) -> None:
    """Confusion matrix PNG: colours normalised per row (the share of each actual class),
    cells annotated with counts, class names on both axes."""
    cm = np.asarray(cm)
    n = len(classes)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix of shape {cm.shape} for {n} class names")
    rows = cm.sum(axis=1, keepdims=True)
    # Row-normalised so a rare class's errors are as visible as a common one's.
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)

    side = min(max(4.0, 0.35 * n + 2.5), 30.0)
    fig = _new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the actual class")
    small = 8 if n <= 20 else 6
    ax.set_xticks(range(n), labels=list(classes), rotation=45 if n <= 20 else 90,
                  ha="right" if n <= 20 else "center", rotation_mode="anchor" if n <= 20 else "default",
                  fontsize=small)
    ax.set_yticks(range(n), labels=list(classes), fontsize=small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=small,
                        color="white" if share[i, j] > 0.5 else "black")
    _save_png(fig, path)


def plot_misclassified(
    path: str | Path,
    images: np.ndarray,
    result: EvalResult,
    classes: Sequence[str],
    *,
    limit: int,
) -> None:
    """A grid of up to ``limit`` misclassified images, most confident mistakes first.

    ``images`` are the split's original uint8 (N, H, W, C) pixels, in the order the
    result was computed (what the normalised batches were made from). Each tile is
    titled ``true → predicted (p=0.87)``. With no mistakes (or ``limit`` 0) the PNG
    says so, so the declared output always exists.
    """
    images = np.asarray(images)
    if len(images) != result.num_images:
        raise ValueError(f"{len(images)} images for a result over {result.num_images}")
    result._check_classes(classes)
    wrong = result.misclassified_indices
    # Stable sort: equal confidences keep image order, so the grid is reproducible.
    order = wrong[np.argsort(-result.confidences[wrong], kind="stable")]
    shown = order[: max(limit, 0)]

    if len(shown) == 0:
        fig = _new_figure(5.0, 2.0)
        ax = fig.add_subplot()
        ax.axis("off")
        reason = ("no misclassified images" if len(wrong) == 0
                  else f"{len(wrong)} misclassified images; evaluate.misclassified_examples is 0")
        ax.text(0.5, 0.5, f"{reason}\n({result.num_images} images, accuracy {result.accuracy:.2%})",
                ha="center", va="center", fontsize=11)
        _save_png(fig, path)
        return

    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = _new_figure(1.9 * cols, 2.0 * rows + 0.5)
    fig.suptitle(f"{len(wrong)} of {result.num_images} images misclassified; "
                 f"the {len(shown)} most confident mistakes")
    for tile, idx in enumerate(shown):
        ax = fig.add_subplot(rows, cols, tile + 1)
        img = images[idx]
        if img.shape[-1] == 1:
            ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(img, interpolation="nearest")
        true, pred = classes[result.labels[idx]], classes[result.predictions[idx]]
        ax.set_title(f"{true} → {pred} (p={result.confidences[idx]:.2f})", fontsize=7)
        ax.axis("off")
    _save_png(fig, path)
