"""validate stage: the checkpoint chosen by validate.checkpoint on the validation split.

Writes metrics/val.json (val_* metrics, the checkpoint and its epoch),
plots/val/confusion.csv (one actual,predicted row per image, DVC's confusion template)
and plots/val/per_class.csv, and logs them to the pipeline's MLflow run. Exits 1 with
one clear log line when params, checkpoint or data are unusable; nothing is written then.
"""

import logging
import sys
from pathlib import Path

from resnet import tracking
from resnet.checkpoint import CheckpointError
from resnet.config import ConfigError, load_params
from resnet.data import DataError
from resnet.evaluation import EvaluationError, evaluate_checkpoint, write_confusion_csv, write_per_class_csv
from resnet.utils import resolve_device, setup_logging, write_json

log = logging.getLogger("stages.validate")

RUN_FILE = Path("models/run.json")
METRICS = Path("metrics/val.json")
CONFUSION_CSV = Path("plots/val/confusion.csv")
PER_CLASS_CSV = Path("plots/val/per_class.csv")


def main() -> int:
    setup_logging()
    try:
        params = load_params("params.yaml")
        ev = evaluate_checkpoint(params.validate.checkpoint, "val", params.validate.batch_size,
                                 device=resolve_device(params.train.device))
    except (ConfigError, CheckpointError, EvaluationError, DataError, RuntimeError) as e:
        log.error("%s", e)
        return 1

    # Metrics last: a metrics/val.json on disk means the whole set was written.
    write_confusion_csv(CONFUSION_CSV, ev.result, ev.classes)
    write_per_class_csv(PER_CLASS_CSV, ev.result, ev.classes)
    write_json(METRICS, ev.metrics("val"))

    with tracking.continue_run(params, RUN_FILE) as run:
        # step = the checkpoint's epoch, so the point sits on training's val curves.
        run.log_metrics(ev.result.flat_metrics("val"), step=ev.epoch)
        run.log_artifacts([METRICS, CONFUSION_CSV, PER_CLASS_CSV], artifact_path="val")
    return 0


if __name__ == "__main__":
    sys.exit(main())
