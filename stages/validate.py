"""DVC stage `validate`: the checkpoint chosen by validate.checkpoint on the validation split.

Writes metrics/val.json (val_* metrics, the checkpoint and its epoch),
plots/val/confusion.csv (one actual,predicted row per image, DVC's confusion template)
and plots/val/per_class.csv, and logs them to the pipeline's MLflow run. Nothing is
written when params, checkpoint or data are unusable.
"""

import sys

from resnet import paths, tracking
from resnet.config import Params
from resnet.plots import write_confusion_csv, write_per_class_csv
from resnet.split_evaluation import evaluate_checkpoint
from resnet.stage import run_stage
from resnet.utils import resolve_device, write_json


def run(params: Params) -> None:
    # run.json and its MLflow run first: nothing is evaluated or written for a broken or foreign run.
    # Inside the run, a failure is recorded on it (pipeline.failure) as well as logged here.
    with tracking.continue_run(params, paths.RUN_FILE, "validate") as mlrun:
        ev = evaluate_checkpoint(
            params.validate.checkpoint,
            "val",
            params.validate.batch_size,
            device=resolve_device(params.train.device),
            run_id=mlrun.run_id,
            max_resident_bytes=params.data.max_resident_bytes,
        )
        # Metrics last: a metrics/val.json on disk means the whole set was written.
        write_confusion_csv(paths.VAL_CONFUSION, ev.result, ev.classes)
        write_per_class_csv(paths.VAL_PER_CLASS, ev.result, ev.classes)
        results = ev.metrics("val")
        write_json(paths.VAL_METRICS, results)
        mlrun.log_results(results)
        mlrun.log_artifacts([paths.VAL_METRICS, paths.VAL_CONFUSION, paths.VAL_PER_CLASS], artifact_path="val")


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
