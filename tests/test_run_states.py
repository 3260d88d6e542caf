"""The MLflow run's status and tags say what happened to the pipeline run.

* A training that diverges at an epoch's end (validation loss or weights, where the
  per-step loss check cannot see it) stops before saving that epoch; the run is FAILED
  with the reason in ``pipeline.failure``.
* A later stage refuses to continue a run whose training did not finish, and leaves it
  as it was.
* A stage that fails marks the run FAILED with its reason; rerunning that stage
  finishes the run and clears the reason; a rerun of register registers nothing twice.
* A run left RUNNING by a training killed before its first epoch is reused by the next
  training with the same params, or closed KILLED with the reason otherwise.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from paramsets import repo_params
from test_evaluation import REPO, _output_files, _stage
from test_evaluation import workspace as workspace  # noqa: F401  (the fixture)
from test_handover_files import _one_line_error, _test_json
from test_training import load_stage_module, write_stage_inputs

from resnet import paths, tracking
from resnet.checkpoint import load_checkpoint
from resnet.tracking.runs import param_values
from resnet.training import Trainer
from resnet.utils import interrupt, interrupts_deferred


def _run() -> mlflow.entities.Run:
    return mlflow.get_run(json.loads(paths.RUN_FILE.read_text())["run_id"])


def _diverge_at_epoch_2(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Epoch 2 ends diverged: a NaN validation loss, or a BatchNorm running variance gone infinite."""
    validate, train_epoch = Trainer.validate, Trainer.train_epoch

    def bad_validate(self: Trainer) -> dict[str, float]:
        val = validate(self)
        return {**val, "val_loss": math.nan} if how == "val_loss" and self._epoch == 1 else val

    def bad_train_epoch(self: Trainer, epoch: int) -> dict[str, float]:
        self._epoch = epoch
        out = train_epoch(self, epoch)
        if how == "weights" and epoch == 1:
            bn = next(m for m in self.parts.model.modules() if hasattr(m, "running_var"))
            bn.running_var[0] = math.inf
        return out

    monkeypatch.setattr(Trainer, "validate", bad_validate)
    monkeypatch.setattr(Trainer, "train_epoch", bad_train_epoch)


@pytest.mark.parametrize(("how", "needle"), [("val_loss", "validation loss nan"), ("weights", "non-finite weights")])
def test_a_diverged_epoch_stops_training_unsaved_and_the_run_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str, needle: str
) -> None:
    write_stage_inputs(tmp_path, {"epochs": 3, "eval_every": 1})
    monkeypatch.chdir(tmp_path)
    _diverge_at_epoch_2(monkeypatch, how)
    assert load_stage_module().main() == 1
    _one_line_error(caplog, "diverged in epoch 2", needle, "train.lr")
    # The last good epoch is what last.pt holds; no metrics of a diverged model.
    assert load_checkpoint(paths.LAST_CHECKPOINT)["epoch"] == 1
    assert not paths.TRAIN_METRICS.exists()
    run = _run()
    assert run.info.status == "FAILED"
    assert run.data.tags["pipeline.stage.train"] == "failed" and run.data.tags["pipeline.failed_stage"] == "train"
    assert "diverged in epoch 2" in run.data.tags["pipeline.failure"]

    # validate does not continue a run whose training failed: one line, nothing written, still FAILED.
    caplog.clear()
    assert _stage("validate", monkeypatch).main() == 1
    _one_line_error(caplog, "did not finish training", "diverged in epoch 2", "dvc repro train")
    assert not paths.VAL_METRICS.exists()
    assert _run().info.status == "FAILED"


def test_a_failed_register_fails_the_run_with_its_reason_and_a_rerun_finishes_it_registering_once(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    _test_json(test_loss=math.nan)
    assert _stage("register", monkeypatch).main() == 1
    run = _run()
    assert run.info.status == "FAILED" and run.data.tags["pipeline.failed_stage"] == "register"
    assert "non-finite test_loss" in run.data.tags["pipeline.failure"]
    assert run.data.tags["pipeline.stage.train"] == "finished"

    # Rerunning the failed stage says it continues a failed run, then finishes it.
    caplog.set_level(logging.WARNING)
    caplog.clear()
    _test_json()
    capfd.readouterr()
    assert _stage("register", monkeypatch).main() == 0
    # No noise from MLflow around it: no download bars, no "already exists" for a model just created.
    err = capfd.readouterr().err
    assert "Downloading artifacts" not in err and "already exists" not in err, err
    assert "is FAILED (register: " in caplog.text and "continuing it in stage register" in caplog.text
    run = _run()
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.stage.register"] == "finished"
    assert "pipeline.failure" not in run.data.tags and "pipeline.failed_stage" not in run.data.tags
    first = json.loads(paths.REGISTER_RESULT.read_text())
    # The portable export went with it, checked against PyTorch, and the version says by how much.
    assert paths.ONNX_MODEL.is_file() and first["onnx"]["max_abs_diff"] <= 1e-4
    version = MlflowClient().get_model_version(first["model_name"], str(first["version"]))
    assert float(version.tags["onnx.max_abs_diff"]) == pytest.approx(first["onnx"]["max_abs_diff"], rel=1e-2, abs=1e-12)

    # Register again for the same run and checkpoint (a kill after registering): no second version.
    assert _stage("register", monkeypatch).main() == 0
    again = json.loads(paths.REGISTER_RESULT.read_text())
    assert again["version"] == first["version"] == 1 and again["alias"] == "champion"
    assert again["reason"] == f"already the champion (test_accuracy {again['value']:.4f})"  # not "x > x"
    assert len(MlflowClient().search_model_versions(f"name='{first['model_name']}'")) == 1


@pytest.mark.parametrize("refuse", [True, False])
def test_register_refuses_a_model_at_chance_level_unless_told_not_to(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    refuse: bool,
) -> None:
    """23 test images, the commonest class 4 of them: 0.3 is within chance (the bar is 0.3577), not learning."""
    params = yaml.safe_load(paths.PARAMS.read_text())
    params["register"]["refuse_at_chance"] = refuse
    paths.PARAMS.write_text(yaml.safe_dump(params))
    _test_json(test_accuracy=0.3)
    before = _output_files(workspace)
    assert _stage("register", monkeypatch).main() == (1 if refuse else 0)
    if refuse:
        _one_line_error(caplog, "test accuracy 0.3000 is at chance level", "0.1739", "0.3577", "refuse_at_chance")
        assert _output_files(workspace) == before and not paths.REGISTER_RESULT.exists()
        assert "at chance level" in _run().data.tags["pipeline.failure"]
    else:
        assert json.loads(paths.REGISTER_RESULT.read_text())["version"] == 1


def _cut_off_training(params_changes: dict | None = None) -> str:
    """The state a training killed (SIGKILL) before its first epoch leaves: a RUNNING run named by run.json."""
    params = repo_params(params_changes or {})
    experiment_id = tracking.store.setup(params.tracking)
    client = MlflowClient()
    run = client.create_run(experiment_id, tags={"pipeline.stage.train": "running"})  # RUNNING, never ended
    client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in param_values(params).items()])
    tracking.PipelineRun(run.info.run_id, experiment_id, mlflow.get_tracking_uri()).save(paths.RUN_FILE)
    return run.info.run_id


@pytest.mark.parametrize("same_params", [True, False])
def test_a_run_left_running_by_a_killed_training_is_reused_or_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_params: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    cut = _cut_off_training(None if same_params else {"train.lr": 0.01})
    params = repo_params()
    with tracking.start_run(params, {"source": "x"}, "cpu", paths.RUN_FILE) as run:
        pass
    client = MlflowClient()
    if same_params:
        assert run.run_id == cut and client.get_run(cut).info.status == "FINISHED"
    else:
        assert run.run_id != cut and client.get_run(run.run_id).info.status == "FINISHED"
        old = client.get_run(cut)
        assert old.info.status == "KILLED" and "ended without closing the run" in old.data.tags["pipeline.failure"]
    assert len(client.search_runs([client.get_experiment_by_name(params.tracking.experiment).experiment_id])) == (
        1 if same_params else 2
    )


def test_sigterm_ends_a_training_like_ctrl_c_with_the_run_killed(tmp_path: Path) -> None:
    """kill, a CI timeout or a container stop: the run is closed KILLED with the reason, not left RUNNING."""
    write_stage_inputs(tmp_path, {"epochs": 200})
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "stages" / "train.py")], cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    last = tmp_path / paths.LAST_CHECKPOINT
    deadline = time.monotonic() + 120
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted; rerun the stage (dvc repro) to resume from models/last.pt" in err and "Traceback" not in err
    run_id = json.loads((tmp_path / paths.RUN_FILE).read_text())["run_id"]
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["pipeline.stage.train"] == "killed"
    assert run.data.tags["pipeline.failure"] == "train: interrupted (Ctrl-C or SIGTERM)"


def test_a_signal_during_a_deferred_write_is_raised_once_the_write_is_done() -> None:
    """Ctrl-C or SIGTERM inside an MLflow write waits for it (no half-done write, no database traceback)."""
    previous = signal.signal(signal.SIGTERM, interrupt)
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match="signal 15"), interrupts_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler has run by now: the interrupt is held
            done.append("written")
        assert done == ["written"]
        with pytest.raises(KeyboardInterrupt):  # outside a deferred block: at once
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        signal.signal(signal.SIGTERM, previous)
