"""The files validate and evaluate write from an :class:`~resnet.evaluation.EvalResult`.

DVC's confusion CSV (one ``actual,predicted`` row per image), the per-class table, and
two PNGs drawn with Matplotlib's Agg canvas: no display, and no global pyplot state,
so importing this module never changes anyone's backend. Every file is written
atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from resnet.evaluation import EvalResult
from resnet.utils import atomic_path

__all__ = ["write_confusion_csv", "write_per_class_csv", "plot_confusion_matrix", "plot_misclassified"]

#: Beyond this many classes the per-cell counts would be unreadable, so the PNG shows colours only.
MAX_ANNOTATED_CLASSES = 40


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
    ax.set_xticks(
        range(n),
        labels=list(classes),
        rotation=45 if n <= 20 else 90,
        ha="right" if n <= 20 else "center",
        rotation_mode="anchor" if n <= 20 else "default",
        fontsize=small,
    )
    ax.set_yticks(range(n), labels=list(classes), fontsize=small)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=small,
                    color="white" if share[i, j] > 0.5 else "black",
                )
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
        reason = (
            "no misclassified images"
            if len(wrong) == 0
            else f"{len(wrong)} misclassified images; evaluate.misclassified_examples is 0"
        )
        ax.text(
            0.5,
            0.5,
            f"{reason}\n({result.num_images} images, accuracy {result.accuracy:.2%})",
            ha="center",
            va="center",
            fontsize=11,
        )
        _save_png(fig, path)
        return

    cols = math.ceil(math.sqrt(len(shown)))
    rows = math.ceil(len(shown) / cols)
    fig = _new_figure(1.9 * cols, 2.0 * rows + 0.5)
    fig.suptitle(f"{len(wrong)} of {result.num_images} images misclassified; the {len(shown)} most confident mistakes")
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
