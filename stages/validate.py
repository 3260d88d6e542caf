"""Validate stage: the checkpoint chosen by ``validate.checkpoint`` on the validation split.

Reads ``models/{best,last}.pt`` and ``data/prepared/`` (val.npz, meta.json); writes
``metrics/val.json`` (``val_*`` metrics, the checkpoint and its epoch, per-class numbers)
and ``plots/val/confusion.csv`` (one ``actual,predicted`` row per image, for DVC's
confusion template). Exit status 1 with one clear log line when params, checkpoint or
data are unusable; nothing is written then.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from resnet.checkpoint import CheckpointError
from resnet.config import ConfigError, load_params
from resnet.data import DataError, load_meta, load_split
from resnet.evaluation import CHECKPOINTS, EvaluationError, evaluate, load_model_for_data, write_confusion_csv
from resnet.loader import DeviceLoader
from resnet.utils import resolve_device, setup_logging, write_json

log = logging.getLogger("stages.validate")

PARAMS = Path("params.yaml")
DATA_DIR = Path("data/prepared")
RUN_FILE = Path("models/run.json")
METRICS = Path("metrics/val.json")
CONFUSION_CSV = Path("plots/val/confusion.csv")
SPLIT, PREFIX = "val", "val"


def main() -> int:
    setup_logging()
    try:
        params = load_params(PARAMS)
    except ConfigError as e:
        log.error("%s", e)
        return 1
    if params.train.num_threads:
        torch.set_num_threads(params.train.num_threads)
    checkpoint = CHECKPOINTS[params.validate.checkpoint]

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
        loader = DeviceLoader(images, labels, params.validate.batch_size,
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

    # The plot first, metrics last: a metrics/val.json on disk means both were written.
    write_confusion_csv(CONFUSION_CSV, result, classes)
    write_json(METRICS, result.metrics_dict(
        PREFIX, classes, checkpoint=str(checkpoint), epoch=ckpt.get("epoch"),
        num_images=result.num_images, num_classes=result.num_classes, topk=result.topk,
    ))
    log.info("wrote %s and %s", METRICS, CONFUSION_CSV)

    # tracking: the lead adds MLflow logging here (this stage's only MLflow call), e.g.
    #     with tracking.continue_run(params, RUN_FILE) as run:
    #         run.log_metrics(result.flat_metrics(PREFIX), step=ckpt.get("epoch"))
    #         run.log_artifacts([METRICS, CONFUSION_CSV], artifact_path=PREFIX)
    # step = the checkpoint's epoch: training logs val_loss/val_accuracy per epoch, and a
    # point at the default step 0 would bend those curves.
    return 0


if __name__ == "__main__":
    sys.exit(main())
