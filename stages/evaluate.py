"""Evaluate stage: the final model (``evaluate.checkpoint``) on the held-out test split.

Reads ``models/{best,last}.pt`` and ``data/prepared/`` (test.npz, meta.json); writes

* ``metrics/test.json``: ``test_*`` metrics at the top level (``test_accuracy`` is what
  ``dvc metrics show`` and the register stage read), the checkpoint and its epoch,
  per-class numbers under ``test_per_class``;
* ``plots/test/confusion.csv``: one ``actual,predicted`` row per image (DVC confusion template);
* ``plots/test/per_class.csv``: class, precision, recall, f1, support, accuracy;
* ``plots/test/confusion.png`` and ``plots/test/misclassified.png``.

Exit status 1 with one clear log line when params, checkpoint or data are unusable;
nothing is written then.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from resnet.checkpoint import CheckpointError
from resnet.config import ConfigError, load_params
from resnet.data import DataError, load_meta, load_split
from resnet.evaluation import (
    CHECKPOINTS,
    EvaluationError,
    evaluate,
    load_model_for_data,
    plot_confusion_matrix,
    plot_misclassified,
    write_confusion_csv,
    write_per_class_csv,
)
from resnet.loader import DeviceLoader
from resnet.utils import resolve_device, setup_logging, write_json

log = logging.getLogger("stages.evaluate")

PARAMS = Path("params.yaml")
DATA_DIR = Path("data/prepared")
RUN_FILE = Path("models/run.json")
METRICS = Path("metrics/test.json")
PLOTS = Path("plots/test")
CONFUSION_CSV = PLOTS / "confusion.csv"
PER_CLASS_CSV = PLOTS / "per_class.csv"
CONFUSION_PNG = PLOTS / "confusion.png"
MISCLASSIFIED_PNG = PLOTS / "misclassified.png"
SPLIT, PREFIX = "test", "test"


def main() -> int:
    setup_logging()
    try:
        params = load_params(PARAMS)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    if params.train.num_threads:
        torch.set_num_threads(params.train.num_threads)
    checkpoint = CHECKPOINTS[params.evaluate.checkpoint]

    try:
        device = resolve_device(params.train.device)
        meta = load_meta(DATA_DIR)
        classes = list(meta["classes"])
        model, ckpt = load_model_for_data(
            checkpoint, classes, channels=meta.get("channels"), image_size=meta.get("image_size"),
            data_source=str(DATA_DIR / "meta.json"),
        )
        images, labels = load_split(DATA_DIR, SPLIT)
        # Normalise exactly as in training: the checkpoint's statistics, not recomputed ones.
        loader = DeviceLoader(images, labels, params.evaluate.batch_size,
                              mean=ckpt["mean"], std=ckpt["std"], device=device, train=False)
    except (CheckpointError, EvaluationError, DataError) as e:
        # Their messages name the bad file or value and the fix.
        log.error("%s", e)
        return 1
    except (KeyError, ValueError, RuntimeError) as e:
        # meta.json without classes, mean/std that do not fit the images, or
        # train.device: cuda without a GPU.
        log.error("cannot evaluate %s on %s/%s: %s", checkpoint, DATA_DIR, SPLIT, e)
        return 1

    log.info("evaluating %s (epoch %s) on %d %s images on %s",
             checkpoint, ckpt.get("epoch"), len(labels), SPLIT, device)
    result = evaluate(model, loader, len(classes), device=device)
    log.info("%s: loss %.4f, accuracy %.4f, top-%d %.4f, macro F1 %.4f", SPLIT, result.loss,
             result.accuracy, result.topk, result.top5_accuracy, result.macro_f1)

    # Plots first, metrics last: a metrics/test.json on disk means the whole set was written.
    write_confusion_csv(CONFUSION_CSV, result, classes)
    write_per_class_csv(PER_CLASS_CSV, result, classes)
    plot_confusion_matrix(CONFUSION_PNG, result.confusion, classes,
                          title=f"Test confusion matrix ({checkpoint.name}), accuracy {result.accuracy:.2%}")
    plot_misclassified(MISCLASSIFIED_PNG, images, result, classes, limit=params.evaluate.misclassified_examples)
    write_json(METRICS, result.metrics_dict(
        PREFIX, classes, checkpoint=str(checkpoint), epoch=ckpt.get("epoch"),
        num_images=result.num_images, num_classes=result.num_classes, topk=result.topk,
    ))
    log.info("wrote %s and %s/", METRICS, PLOTS)

    # tracking: the lead adds MLflow logging here (this stage's only MLflow call), e.g.
    #     with tracking.continue_run(params, RUN_FILE) as run:
    #         run.log_metrics(result.flat_metrics(PREFIX), step=ckpt.get("epoch"))
    #         run.log_artifacts([METRICS, CONFUSION_PNG, MISCLASSIFIED_PNG,
    #                             CONFUSION_CSV, PER_CLASS_CSV], artifact_path=PREFIX)
    # step = the checkpoint's epoch: training logs val_loss/val_accuracy per epoch, and a
    # point at the default step 0 would bend those curves.
    return 0


if __name__ == "__main__":
    sys.exit(main())
