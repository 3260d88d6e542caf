"""evaluate stage: the final model (evaluate.checkpoint) on the held-out test split.

Writes metrics/test.json (test_* metrics: test_accuracy is what the register stage
compares), plots/test/confusion.csv (DVC confusion template), plots/test/per_class.csv,
plots/test/confusion.png and plots/test/misclassified.png, and logs them to the
pipeline's MLflow run. Exits 1 with one clear log line when params, checkpoint or data
are unusable; nothing is written then.
"""

import logging
import sys
from pathlib import Path

from resnet import tracking
from resnet.checkpoint import CheckpointError
from resnet.config import ConfigError, load_params
from resnet.data import DataError
from resnet.evaluation import (
    EvaluationError,
    evaluate_checkpoint,
    plot_confusion_matrix,
    plot_misclassified,
    write_confusion_csv,
    write_per_class_csv,
)
from resnet.utils import resolve_device, setup_logging, write_json

log = logging.getLogger("stages.evaluate")

RUN_FILE = Path("models/run.json")
METRICS = Path("metrics/test.json")
PLOTS = Path("plots/test")
CONFUSION_CSV = PLOTS / "confusion.csv"
PER_CLASS_CSV = PLOTS / "per_class.csv"
CONFUSION_PNG = PLOTS / "confusion.png"
MISCLASSIFIED_PNG = PLOTS / "misclassified.png"


def main() -> int:
    setup_logging()
    try:
        params = load_params("params.yaml")
        ev = evaluate_checkpoint(params.evaluate.checkpoint, "test", params.evaluate.batch_size,
                                 device=resolve_device(params.train.device))
    except (ConfigError, CheckpointError, EvaluationError, DataError, RuntimeError) as e:
        log.error("%s", e)
        return 1

    # Plots first, metrics last: a metrics/test.json on disk means the whole set was written.
    write_confusion_csv(CONFUSION_CSV, ev.result, ev.classes)
    write_per_class_csv(PER_CLASS_CSV, ev.result, ev.classes)
    plot_confusion_matrix(CONFUSION_PNG, ev.result.confusion, ev.classes,
                          title=f"Test confusion matrix ({ev.checkpoint.name}), accuracy {ev.result.accuracy:.2%}")
    plot_misclassified(MISCLASSIFIED_PNG, ev.images, ev.result, ev.classes,
                       limit=params.evaluate.misclassified_examples)
    write_json(METRICS, ev.metrics("test"))

    with tracking.continue_run(params, RUN_FILE) as run:
        run.log_metrics(ev.result.flat_metrics("test"))
        run.log_artifacts([METRICS, CONFUSION_CSV, PER_CLASS_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG],
                          artifact_path="test")
    return 0


if __name__ == "__main__":
    sys.exit(main())
