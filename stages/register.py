"""DVC stage `register`: log the evaluated model to the pipeline's MLflow run and register it.

The new version gets the alias `champion` only if it beats the current champion on
register.metric; otherwise `challenger`. What happened goes to metrics/register.json.
"""

import logging
import sys
from pathlib import Path

from resnet import paths, tracking
from resnet.checkpoint import load_checkpoint
from resnet.config import ConfigError, Params
from resnet.data.store import load_split
from resnet.stage import run_stage
from resnet.utils import PipelineError, read_handover_json, write_json

log = logging.getLogger("stages.register")


def run(params: Params) -> None:
    test = read_handover_json(paths.TEST_METRICS, "evaluate")
    metrics = {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if params.register.metric not in metrics:
        raise ConfigError(
            f"register.metric: {params.register.metric!r} is not in {paths.TEST_METRICS} "
            f"(it has {sorted(metrics)}); rerun the evaluate stage"
        )
    if not isinstance(test.get("checkpoint"), str):
        raise PipelineError(
            f"{paths.TEST_METRICS} names no checkpoint: rerun the evaluate stage (dvc repro -f evaluate)"
        )
    tracking.check_registrable(metrics, params.register.metric, str(paths.TEST_METRICS))
    # Register exactly the checkpoint the evaluate stage measured, if it belongs to run.json's run.
    checkpoint = Path(test["checkpoint"])
    run_id = tracking.check_run(params, paths.RUN_FILE)["run_id"]
    extra = load_checkpoint(checkpoint).get("extra")
    own = extra.get("run_id") if isinstance(extra, dict) else None
    if own is not None and own != run_id:
        raise PipelineError(
            f"checkpoint {checkpoint} belongs to MLflow run {own}, not to run {run_id} in {paths.RUN_FILE}; "
            "rerun training (dvc repro -f train)"
        )
    example, _ = load_split(paths.PREPARED, "test")
    with tracking.continue_run(params, paths.RUN_FILE) as mlrun:
        model_uri = tracking.log_model(mlrun, checkpoint, example[:2])
        result = tracking.register_model(mlrun, model_uri, params.register.model_name, params.register.metric, metrics)
        mlrun.set_tags(
            {"registered_model": f"{result['model_name']}/{result['version']}", "registered_alias": result["alias"]}
        )
    write_json(paths.REGISTER_RESULT, result)
    log.info("models:/%s@%s is version %s", result["model_name"], result["alias"], result["version"])


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
