"""MLflow: one run per pipeline run, the pyfunc model, and the Model Registry.

The only package that imports mlflow, split by concern: ``store`` (where the runs
live, the store's creation and failures), ``runs`` (the pipeline's run and its
status), ``model`` (the pyfunc model) and ``registry`` (versions and the champion).
Stages use the names below as ``tracking.<name>``.
"""

from resnet.tracking.model import ResNetClassifier, load_pyfunc, log_model
from resnet.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    check_above_chance,
    check_registrable,
    register_checkpoint,
    register_model,
)
from resnet.tracking.runs import PipelineRun, check_run, continue_run, device_description, start_run
from resnet.tracking.store import TrackingError, resolve_tracking_uri, store_root

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "PipelineRun",
    "ResNetClassifier",
    "TrackingError",
    "check_above_chance",
    "check_registrable",
    "check_run",
    "continue_run",
    "device_description",
    "load_pyfunc",
    "log_model",
    "register_checkpoint",
    "register_model",
    "resolve_tracking_uri",
    "start_run",
    "store_root",
]
