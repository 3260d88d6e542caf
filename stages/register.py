"""DVC stage `register`: log the evaluated model to the pipeline's MLflow run and register it.

The new version gets the alias `champion` only if it beats the current champion on
register.metric; otherwise `challenger`. What happened goes to metrics/register.json.
"""

import logging
import sys
from pathlib import Path

from resnet import paths, tracking
from resnet.config import ConfigError, Params
from resnet.data.store import load_split
from resnet.stage import run_stage
from resnet.utils import read_json, write_json

log = logging.getLogger("stages.register")


def run(params: Params) -> None:
    test = read_json(paths.TEST_METRICS)
    metrics = {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if params.register.metric not in metrics:
        raise ConfigError(
            f"register.metric: {params.register.metric!r} is not in {paths.TEST_METRICS} "
            f"(it has {sorted(metrics)}); rerun the evaluate stage"
        )
    # Register exactly the checkpoint the evaluate stage measured.
    checkpoint = Path(test["checkpoint"])
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
