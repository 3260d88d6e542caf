"""DVC stage `evaluate`: the final model (evaluate.checkpoint) on the held-out test split.

Writes metrics/test.json (test_* metrics: test_accuracy is what the register stage
compares), plots/test/confusion.csv (DVC confusion template), plots/test/per_class.csv,
plots/test/confusion.png and plots/test/misclassified.png, and logs them to the
pipeline's MLflow run. Nothing is written when params, checkpoint or data are unusable.
"""

import sys
from typing import Any

from resnet import paths, tracking
from resnet.config import Params
from resnet.plots import plot_confusion_matrix, plot_misclassified, write_confusion_csv, write_per_class_csv
from resnet.split_evaluation import SplitEvaluation, evaluate_checkpoint
from resnet.stage import run_stage
from resnet.utils import resolve_device, write_json


def run(params: Params) -> None:
    # run.json and its MLflow run first: nothing is evaluated or written for a broken or foreign run.
    with tracking.continue_run(params, paths.RUN_FILE, "evaluate") as mlrun:
        ev = evaluate_checkpoint(
            params.evaluate.checkpoint,
            "test",
            params.evaluate.batch_size,
            device=resolve_device(params.train.device),
            run_id=mlrun.run_id,
            max_resident_bytes=params.data.max_resident_bytes,
        )
        mlrun.log_results(_write_results(ev, params.evaluate.misclassified_examples))
        mlrun.log_artifacts(
            [
                paths.TEST_METRICS,
                paths.TEST_CONFUSION,
                paths.TEST_PER_CLASS,
                paths.TEST_CONFUSION_PNG,
                paths.TEST_MISCLASSIFIED_PNG,
            ],
            artifact_path="test",
        )


def _write_results(ev: SplitEvaluation, misclassified_examples: int) -> dict[str, Any]:
    """The files of the test split's results; returns what metrics/test.json holds."""
    # Plots first, metrics last: a metrics/test.json on disk means the whole set was written.
    write_confusion_csv(paths.TEST_CONFUSION, ev.result, ev.classes)
    write_per_class_csv(paths.TEST_PER_CLASS, ev.result, ev.classes)
    plot_confusion_matrix(
        paths.TEST_CONFUSION_PNG,
        ev.result.confusion,
        ev.classes,
        title=f"Test confusion matrix ({ev.checkpoint.name}), accuracy {ev.result.accuracy:.2%}",
    )
    plot_misclassified(paths.TEST_MISCLASSIFIED_PNG, ev.images, ev.result, ev.classes, limit=misclassified_examples)
    results = ev.metrics("test")
    write_json(paths.TEST_METRICS, results)
    return results


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
