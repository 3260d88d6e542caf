"""register stage: log the evaluated model to the pipeline's MLflow run and register it.

The new version gets the alias `champion` only if it beats the current champion on
register.metric; otherwise `challenger`. What happened goes to metrics/register.json.
"""

import logging
import sys
from pathlib import Path

from resnet import tracking
from resnet.checkpoint import CheckpointError
from resnet.config import ConfigError, load_params
from resnet.data import load_split
from resnet.utils import read_json, setup_logging, write_json

log = logging.getLogger("register")

PREPARED = Path("data/prepared")
RUN_FILE = Path("models/run.json")
TEST_METRICS = Path("metrics/test.json")
OUT = Path("metrics/register.json")


def main() -> int:
    setup_logging()
    try:
        params = load_params("params.yaml")
        test = read_json(TEST_METRICS)
        # Register exactly the checkpoint the evaluate stage measured.
        checkpoint = Path("models") / f"{test['checkpoint']}.pt"
        metrics = {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if params.register.metric not in metrics:
            raise ConfigError(f"register.metric: {params.register.metric!r} is not in {TEST_METRICS} "
                              f"(it has {sorted(metrics)})")
        example, _ = load_split(PREPARED, "test")
        with tracking.continue_run(params, RUN_FILE) as run:
            model_uri = tracking.log_model(run, checkpoint, example[:2])
            result = tracking.register_model(run, model_uri, params.register.model_name,
                                             params.register.metric, metrics)
            run.set_tags({"registered_model": f"{result['model_name']}/{result['version']}",
                          "registered_alias": result["alias"]})
    except (ConfigError, CheckpointError, FileNotFoundError, KeyError) as e:
        log.error("%s", e)
        return 1
    write_json(OUT, result)
    log.info("models:/%s@%s is version %s", result["model_name"], result["alias"], result["version"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
