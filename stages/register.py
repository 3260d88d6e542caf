"""DVC stage `register`: log the evaluated model to the pipeline's MLflow run and register it.

Refused, before anything is registered, for a model with non-finite test metrics or
(register.refuse_at_chance) one no better than chance. The champion is the best
registered version on register.metric (see resnet.tracking.registry); the newest
version, while newer than the champion, is the `challenger`. What happened goes to
metrics/register.json; a rerun for the same run and checkpoint registers nothing twice.
"""

import logging
import sys
from pathlib import Path

import numpy as np

from resnet import paths, tracking
from resnet.checkpoint import load_checkpoint
from resnet.config import ConfigError, Params
from resnet.data.store import load_meta, load_split
from resnet.export import export_onnx
from resnet.split_evaluation import check_belongs_to_run
from resnet.stage import run_stage
from resnet.utils import PipelineError, read_handover_json, write_json

log = logging.getLogger("stages.register")


def run(params: Params) -> None:
    rp = params.register
    test = read_handover_json(paths.TEST_METRICS, "evaluate")
    metrics = {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if rp.metric not in metrics:
        raise ConfigError(
            f"register.metric: {rp.metric!r} is not in {paths.TEST_METRICS} "
            f"(it has {sorted(metrics)}); rerun the evaluate stage"
        )
    for key, kind in (("test_checkpoint", str), ("test_chance_accuracy", float), ("test_num_images", int)):
        if not isinstance(test.get(key), kind):
            raise PipelineError(f"{paths.TEST_METRICS} has no {key}: rerun the evaluate stage (dvc repro -f evaluate)")
    # From here on a refusal is about this run's model: it is recorded on the run too.
    with tracking.continue_run(params, paths.RUN_FILE, "register") as mlrun:
        tracking.check_registrable(metrics, rp.metric, str(paths.TEST_METRICS))
        if rp.refuse_at_chance:
            tracking.check_above_chance(
                test["test_accuracy"], test["test_chance_accuracy"], test["test_num_images"], str(paths.TEST_METRICS)
            )
        # Register exactly the checkpoint the evaluate stage measured, if it belongs to run.json's run.
        checkpoint = Path(test["test_checkpoint"])
        check_belongs_to_run(checkpoint, load_checkpoint(checkpoint), mlrun.run_id)
        example = np.array(load_split(paths.PREPARED, "test")[0][:16])  # a copy of 16, not the mapped split
        # The portable export first: a checkpoint onnxruntime cannot reproduce is not registered.
        onnx = export_onnx(checkpoint, paths.ONNX_MODEL, check_images=example[:16])
        mlrun.log_artifacts([paths.ONNX_MODEL], artifact_path="onnx")
        result = tracking.register_checkpoint(
            mlrun,
            checkpoint,
            example[:2],
            rp.model_name,
            rp.metric,
            metrics,
            {"onnx.max_abs_diff": f"{onnx['max_abs_diff']:.3g}"},
            meta=load_meta(paths.PREPARED),
        )
        result["onnx"] = onnx
        # The version, not its alias of the moment: aliases move, and the registry holds them.
        mlrun.set_tags({"registered_model": f"{result['model_name']}/{result['version']}"})
        write_json(paths.REGISTER_RESULT, result)
    if result["alias"]:
        log.info("models:/%s@%s is version %s", result["model_name"], result["alias"], result["version"])


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
