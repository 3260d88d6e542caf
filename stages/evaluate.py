"""DVC stage `evaluate`: the final model (evaluate.checkpoint) on the held-out test split.

Writes metrics/test.json (test_* metrics: test_accuracy is what the register stage
compares), plots/test/confusion.csv (DVC confusion template), plots/test/per_class.csv,
plots/test/confusion.png and plots/test/misclassified.png, and logs them to the
pipeline's MLflow run. Nothing is written when params, checkpoint or data are unusable.
"""

import sys
from pathlib import Path

from resnet import tracking
from resnet.config import Params
from resnet.evaluation import (
    evaluate_checkpoint,
    plot_confusion_matrix,
    plot_misclassified,
    write_confusion_csv,
    write_per_class_csv,
)
from resnet.stage import run_stage
from resnet.utils import resolve_device, write_json

RUN_FILE = Path("models/run.json")
METRICS = Path("metrics/test.json")
PLOTS = Path("plots/test")
CONFUSION_CSV = PLOTS / "confusion.csv"
PER_CLASS_CSV = PLOTS / "per_class.csv"
CONFUSION_PNG = PLOTS / "confusion.png"
MISCLASSIFIED_PNG = PLOTS / "misclassified.png"


def run(params: Params) -> None:
    ev = evaluate_checkpoint(params.evaluate.checkpoint, "test", params.evaluate.batch_size,
                             device=resolve_device(params.train.device))
    # Plots first, metrics last: a metrics/test.json on disk means the whole set was written.
    write_confusion_csv(CONFUSION_CSV, ev.result, ev.classes)
    write_per_class_csv(PER_CLASS_CSV, ev.result, ev.classes)
    plot_confusion_matrix(CONFUSION_PNG, ev.result.confusion, ev.classes,
                          title=f"Test confusion matrix ({ev.checkpoint.name}), accuracy {ev.result.accuracy:.2%}")
    plot_misclassified(MISCLASSIFIED_PNG, ev.images, ev.result, ev.classes,
                       limit=params.evaluate.misclassified_examples)
    write_json(METRICS, ev.metrics("test"))

    with tracking.continue_run(params, RUN_FILE) as mlrun:
        mlrun.log_metrics(ev.result.flat_metrics("test"))
        mlrun.log_artifacts([METRICS, CONFUSION_CSV, PER_CLASS_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG],
                            artifact_path="test")


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
