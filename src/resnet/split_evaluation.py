"""A checkpoint evaluated on a prepared split, as the validate and evaluate stages do it.

The checkpoint is checked before anything is computed: it fits the data (classes,
channels, image size), belongs to run.json's MLflow run, and holds finite weights. It is
then evaluated by the one evaluation, :func:`resnet.evaluation.evaluate`, in the
precision and memory format its training validated in, so the validation split
reproduces the val_* numbers training recorded for that epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from resnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from resnet.evaluation import EvalResult, EvaluationError, evaluate
from resnet.models import ResNet
from resnet.paths import CHECKPOINTS, PREPARED
from resnet.runtime import resolve_precision
from resnet.tta import checkpoint_tta

__all__ = ["load_model_for_data", "SplitEvaluation", "trained_with", "evaluate_checkpoint", "check_belongs_to_run"]

log = logging.getLogger(__name__)


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
    tta: str = "none"  # the checkpoint's test-time augmentation (model.tta) the figures were measured with

    def metrics(self, prefix: str) -> dict[str, Any]:
        """The metrics JSON: prefixed numbers plus which checkpoint they describe.

        Per-class numbers go to the per-class CSV rather than here: nested in the JSON
        they would become one ``dvc metrics show`` column per class and metric.
        """
        return {
            **self.result.flat_metrics(prefix),
            # Every name prefixed, as in the MLflow run, where val and test results sit side by side.
            f"{prefix}_checkpoint": str(self.checkpoint),
            f"{prefix}_checkpoint_epoch": self.epoch,
            # How the figures were predicted: the registered model predicts the same way (resnet.tta).
            f"{prefix}_tta": self.tta,
            f"{prefix}_num_images": self.result.num_images,
            f"{prefix}_num_classes": self.result.num_classes,
            # The accuracy of always answering the split's commonest class: what "learned nothing" scores.
            f"{prefix}_chance_accuracy": self.result.chance_accuracy,
        }


def trained_with(ckpt: dict[str, Any], device: torch.device) -> tuple[str, bool]:
    """(precision, channels_last) of the checkpoint's training run, as its per-epoch validation used them on ``device``.

    The precision training resolved and stored (train.precision ``auto`` depends on the
    machine), else the params' (checkpoints from before it was stored), as it resolves on
    ``device``: a GPU run's fp16 is fp32 on a CPU. A checkpoint without params (not written
    by training) is evaluated in fp32, NCHW.
    """
    train = ckpt.get("params", {}).get("train", {})
    trained = ckpt.get("precision") or train.get("precision", "fp32")
    return resolve_precision(trained, device), bool(train.get("channels_last", False))


def evaluate_checkpoint(
    which: str,
    split: str,
    batch_size: int,
    *,
    device: torch.device,
    data_dir: str | Path = PREPARED,
    run_id: str | None = None,
    max_resident_bytes: int | None = None,
) -> SplitEvaluation:
    """Evaluate ``models/<which>.pt`` on the prepared ``split``, normalised, and computed, as in training.

    The precision, memory format and test-time augmentation are those the training run validated
    in (:func:`trained_with`, :func:`resnet.tta.checkpoint_tta`), so on the validation split this
    reproduces the val_* numbers training recorded for that epoch.

    A split larger than ``max_resident_bytes`` is streamed from its file (resnet.loader).
    Raises CheckpointError, EvaluationError or resnet.data.errors.DataError with a message
    that names the bad file or value and the fix.
    """
    data_dir, checkpoint = Path(data_dir), CHECKPOINTS[which]
    try:
        model, ckpt, classes, images, loader, precision = _load_for_split(
            checkpoint, data_dir, split, batch_size, device, run_id, max_resident_bytes
        )
    except (KeyError, ValueError) as e:
        if isinstance(e, EvaluationError):
            raise
        raise EvaluationError(f"cannot evaluate {checkpoint} on {data_dir}/{split}: {e}") from e
    n, epoch, tta = len(images), ckpt.get("epoch"), checkpoint_tta(ckpt)
    log.info(
        "evaluating %s (epoch %s) on %d %s images on %s, precision %s, test-time augmentation %s",
        checkpoint,
        epoch,
        n,
        split,
        device,
        precision,
        tta,
    )
    result = evaluate(model, loader, len(classes), device=device, precision=precision, tta=tta)
    log.info("%s: %s", split, ", ".join(f"{k} {v:.4f}" for k, v in result.flat_metrics().items()))
    bad = {k: v for k, v in result.flat_metrics(split).items() if not np.isfinite(v)}
    if bad:
        raise EvaluationError(
            f"{checkpoint} gives non-finite metrics on {split} ({_short(sorted(bad))}): the model diverged; "
            "lower train.lr or check the data, then retrain (dvc repro train)"
        )
    return SplitEvaluation(result, checkpoint, epoch, classes, images, tta)


def _load_for_split(
    checkpoint: Path,
    data_dir: Path,
    split: str,
    batch_size: int,
    device: torch.device,
    run_id: str | None,
    max_resident_bytes: int | None,
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
    norm = {"mean": ckpt["mean"], "std": ckpt["std"], "channels_last": channels_last}
    loader = DeviceLoader(images, labels, batch_size, device=device, max_resident_bytes=max_resident_bytes, **norm)
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
