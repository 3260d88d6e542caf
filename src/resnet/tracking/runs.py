"""One MLflow run per pipeline run, and a status that says what happened to it.

The train stage creates the run and writes its id to ``models/run.json`` (a DVC
output); validate, evaluate and register continue the same run from that file, so a
whole ``dvc repro`` is one row in the MLflow UI.

Each stage records itself in the run's tags: ``pipeline.stage.<stage>`` is
``running``, ``finished``, ``failed`` or ``killed``, and a failure leaves
``pipeline.failed_stage`` and ``pipeline.failure`` (its one-line message). The run's
status is the pipeline's: FAILED (or KILLED) while any stage's last attempt failed (or
was interrupted), FINISHED once every stage that ran has finished. A later stage never
revives a run whose training did not finish; rerunning the stage that failed is what
clears its failure.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import requests
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from resnet import paths
from resnet.config import Params, to_flat_dict
from resnet.runtime import cpu_info, cpu_summary, resolve_precision
from resnet.tracking.lineage import log_dataset
from resnet.tracking.store import TrackingError, logging_failure, setup
from resnet.utils import PipelineError, interrupts_deferred, read_handover_json, repo_root, write_json

__all__ = ["EPOCH_PREFIX", "PipelineRun", "start_run", "continue_run", "check_run", "device_description", "STAGE_TAG"]

log = logging.getLogger("resnet.tracking")

# Per-epoch series are logged under this prefix (the UI groups them in a section of their
# own); the unprefixed names hold the final figures of metrics/*.json.
EPOCH_PREFIX = "epoch/"
STAGE_TAG = "pipeline.stage."  # + stage name: running | finished | failed | killed
FAILED_STAGE, FAILURE = "pipeline.failed_stage", "pipeline.failure"


# --------------------------------------------------------------------------- provenance


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=repo_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_description(device: torch.device | str) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU; the CPU model and core count otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = cpu_info()[0]
    cpu = model if model != "unknown" else platform.machine() or model
    return f"cpu: {cpu} ({os.cpu_count()} cores)"


def _dirty_code() -> list[str]:
    """Tracked files changed since the commit, apart from what the pipeline itself writes.

    ``dvc exp run`` writes params.yaml before any stage starts (the params are logged as
    the run's params), and dvc.lock and the git-tracked metrics and plots are outputs:
    none of them makes the code differ from the commit.
    """
    produced = [paths.PARAMS, Path("dvc.lock"), *(p for outs in paths.STAGE_OUTPUTS.values() for p in outs)]
    changed = _git("diff", "--name-only", "HEAD", "--", ".", *(f":(exclude){p}" for p in produced))
    return (changed or "").splitlines()


def param_values(params: Params) -> dict[str, str]:
    """The flattened params as MLflow shows them: as params.yaml writes them (null, true, [15, 25]), not None."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in to_flat_dict(params).items()}


def _run_name(params: Params, commit: str, dirty: bool) -> str:
    """The DVC experiment's name; else one that says where the run came from: commit and recipe.

    ``repro-1c8175d-resnet20-e15-lr0.2-3f9a1c``: a plain ``dvc repro`` at that commit (with
    ``+`` after it when the code was changed), the model, epochs, learning rate and a
    digest of all the params, so runs that differ in any param differ in name.
    """
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    digest = hashlib.sha256(repr(sorted(to_flat_dict(params).items())).encode()).hexdigest()[:6]
    t = params.train
    return f"repro-{commit[:7]}{'+' if dirty else ''}-{params.model.label}-e{t.epochs}-lr{t.lr:g}-{digest}"


def _provenance_tags(meta: dict[str, Any], device: torch.device | str) -> dict[str, str]:
    # dvc exp run sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV; a plain dvc repro does not.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "unknown"
    dirty = _dirty_code()
    tags = {
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "dataset.sha256": str(meta.get("source_sha256", "unknown")),
        "dataset.source": str(meta.get("source", "unknown")),
        "device": device_description(device),
        "torch.version": torch.__version__,
        **cpu_summary(),  # the CPU's model and flags: what train.precision auto decided on
    }
    tags["git.dirty"] = "true" if dirty else "false"
    if dirty:  # which files, so a reader can tell a stray edit from a change of method
        tags["git.dirty_files"] = ", ".join(dirty[:20]) + (f" and {len(dirty) - 20} more" if len(dirty) > 20 else "")
    return tags


# --------------------------------------------------------------------------- runs


@dataclass
class PipelineRun:
    """The MLflow run of one pipeline run; what the stages log through."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch curves: every metric as ``epoch/<name>`` with step = epoch, once per epoch.

        Their own names, so the run table's ``val_accuracy`` is metrics/val.json's (the
        evaluated checkpoint's), not the last epoch's. An epoch already logged (a resumed
        training re-sends the one saved just before the interruption) is not logged again.
        """
        values = {EPOCH_PREFIX + k: float(v) for k, v in metrics.items() if k != "epoch" and v is not None}
        if not values:
            return
        client = MlflowClient()
        # Ctrl-C or SIGTERM between epochs: the epoch is logged first.
        with self._writing(f"logging epoch {epoch}"), interrupts_deferred():
            if any(m.step == int(epoch) for m in client.get_metric_history(self.run_id, next(iter(values)))):
                return
            mlflow.log_metrics(values, step=int(epoch), run_id=self.run_id)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """A write the store refused or never answered (a server gone mid-training) as one line saying what is kept."""
        try:
            yield
        except (MlflowException, requests.RequestException) as e:
            error = logging_failure(self.tracking_uri, what, e)
            raise TrackingError(
                f"{error}; what the stage wrote is kept (checkpoints in models/): rerun it (dvc repro) once the "
                f"store answers, to resume into the same MLflow run {self.run_id}"
            ) from e

    def log_results(self, results: dict[str, Any]) -> None:
        """A stage's results file (metrics/*.json) under the same names: what the run table shows.

        Numbers (booleans as 0/1) become metrics, strings tags, None nothing. A value the
        run holds already is not logged again; a changed one (the stage rerun on other
        params) is logged at the next step, so the table's value, the last step's, is the
        file's and no step holds two values.
        """
        client = MlflowClient()
        with self._writing("logging the results"):
            current = client.get_run(self.run_id).data.metrics
            now = int(time.time() * 1000)
            metrics = []
            for key, value in results.items():
                if isinstance(value, str):
                    client.set_tag(self.run_id, key, value)
                elif isinstance(value, (int, float)) and current.get(key) != float(value):
                    step = len(client.get_metric_history(self.run_id, key)) if key in current else 0
                    metrics.append(Metric(key, float(value), now, step))
            if metrics:
                with interrupts_deferred():
                    client.log_batch(self.run_id, metrics=metrics)

    def log_artifacts(self, paths: Sequence[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                with self._writing(f"uploading {p}"):
                    mlflow.log_artifact(str(p), artifact_path=artifact_path, run_id=self.run_id)
            else:
                log.warning("not logging %s to MLflow: it does not exist", p)

    def set_tags(self, tags: dict[str, Any]) -> None:
        client = MlflowClient()
        with self._writing("setting tags"):
            for k, v in tags.items():
                client.set_tag(self.run_id, k, str(v))

    def save(self, run_file: str | Path) -> None:
        write_json(run_file, asdict(self))


def _failure_text(e: BaseException) -> str:
    """The failure in one line: a PipelineError's message as the stage logged it, else the error's type too."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C or SIGTERM)"
    first = (str(e).strip().splitlines() or [""])[0]
    return (first if isinstance(e, PipelineError) and first else f"{type(e).__name__}: {first}")[:500]


def _end_status(tags: dict[str, str]) -> str:
    """FAILED / KILLED while a stage's last attempt failed / was interrupted, else FINISHED."""
    states = {v for k, v in tags.items() if k.startswith(STAGE_TAG)}
    return "FAILED" if "failed" in states else "KILLED" if "killed" in states else "FINISHED"


@contextlib.contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's HTTP client without retries and with a short timeout, for the block."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _stage_status(run_id: str, stage: str) -> Iterator[None]:
    """Record ``stage`` in the active run's tags while it runs, and end the run with the pipeline's status."""
    client = MlflowClient()
    client.set_tag(run_id, STAGE_TAG + stage, "running")
    try:
        yield
    except BaseException as e:
        state = "killed" if isinstance(e, KeyboardInterrupt) else "failed"
        # The store itself may be what failed: one try each, not a minute of retries per write.
        with _one_try():
            with contextlib.suppress(Exception):
                client.set_tag(run_id, STAGE_TAG + stage, state)
                client.set_tag(run_id, FAILED_STAGE, stage)
                client.set_tag(run_id, FAILURE, f"{stage}: {_failure_text(e)}")
            with contextlib.suppress(Exception):
                mlflow.end_run(state.upper())
        raise
    client.set_tag(run_id, STAGE_TAG + stage, "finished")
    tags = client.get_run(run_id).data.tags
    if tags.get(FAILED_STAGE) == stage:  # this stage's earlier failure is mended
        client.delete_tag(run_id, FAILED_STAGE)
        client.delete_tag(run_id, FAILURE)
    mlflow.end_run(_end_status(tags))


def _reusable_run(run_file: Path, params: Params) -> str | None:
    """run.json's run if its training was cut off before any epoch reached MLflow, with these params.

    The new training then logs into it, so the pipeline run stays one MLflow run. A
    cut-off run that cannot be reused (other params, epochs already logged) is closed
    KILLED with the reason, instead of showing RUNNING forever.
    """
    try:
        run_id = read_handover_json(run_file, "train")["run_id"]
        run = mlflow.get_run(run_id)
    except Exception:  # no usable run.json: nothing to reuse or close
        return None
    if run.data.tags.get(STAGE_TAG + "train") == "finished" or run.info.status == "FINISHED":
        return None
    same_params = run.data.params == param_values(params)
    if same_params and not run.data.metrics:
        log.info("MLflow run %s: its training stopped before the first epoch; training again in it", run_id)
        return run_id
    if run.info.status == "RUNNING":
        client = MlflowClient()
        client.set_tag(run_id, STAGE_TAG + "train", "killed")
        client.set_tag(run_id, FAILED_STAGE, "train")
        client.set_tag(run_id, FAILURE, "train: the process ended without closing the run (killed); superseded")
        client.set_terminated(run_id, "KILLED")
        log.warning("MLflow run %s was left RUNNING by a killed training: marked KILLED", run_id)
    return None


@contextlib.contextmanager
def start_run(
    params: Params,
    meta: dict[str, Any],
    device: torch.device | str,
    run_file: str | Path,
    resume_run_id: str | None = None,
) -> Iterator[PipelineRun]:
    """Start the pipeline's MLflow run (or resume an interrupted one) for the train stage.

    Logs the flattened params, provenance tags and the dataset; writes ``run_file``
    as soon as the run exists, so a crash still leaves the id behind. The run ends
    FINISHED on success, KILLED on Ctrl-C and FAILED on an error, with the reason in
    its tags (see the module's docstring).
    """
    experiment_id = setup(params.tracking)
    run_id = None
    if resume_run_id:
        try:
            run_id = mlflow.get_run(resume_run_id).info.run_id
        except MlflowException:
            log.warning("MLflow run %s of the interrupted training is gone; starting a new run", resume_run_id)
    else:
        run_id = _reusable_run(Path(run_file), params)
    tags = _provenance_tags(meta, device)
    # What train.precision (auto, say) resolves to here: fit resolves it alike, and warns.
    tags["precision"] = resolve_precision(params.train.precision, torch.device(device), warn=False)
    tags["model"] = params.model.label  # a custom network's layout, which model.name alone does not say
    run_name = _run_name(params, tags["git.commit"], tags["git.dirty"] == "true")
    system = params.tracking.system_metrics
    if system:  # system/* metrics from a thread while the run is active (the training only)
        mlflow.set_system_metrics_sampling_interval(params.tracking.system_metrics_interval)
    active = mlflow.start_run(
        run_id=run_id,
        experiment_id=None if run_id else experiment_id,
        run_name=None if run_id else run_name,
        log_system_metrics=system,
    )
    with _stage_status(active.info.run_id, "train"):
        run = PipelineRun(active.info.run_id, active.info.experiment_id, mlflow.get_tracking_uri())
        run.save(run_file)
        mlflow.set_tags(tags)
        if run_id is None:  # a resumed or reused run has them already
            mlflow.log_params(param_values(params))
            log_dataset(meta)
        log.info("MLflow run %s (%s) in %s", run.run_id, "resumed" if run_id else "new", run.tracking_uri)
        yield run


@contextlib.contextmanager
def continue_run(params: Params, run_file: str | Path, stage: str) -> Iterator[PipelineRun]:
    """Continue the train stage's run in ``stage`` (validate, evaluate, register), recording its outcome.

    Refused (TrackingError, before the run is touched) when run.json is unusable or the
    run's training did not finish.
    """
    saved = check_run(params, run_file)
    previous = mlflow.get_run(saved["run_id"])
    if previous.info.status in ("FAILED", "KILLED"):
        log.warning(
            "MLflow run %s is %s (%s); continuing it in stage %s",
            saved["run_id"],
            previous.info.status,
            previous.data.tags.get(FAILURE, "no reason recorded"),
            stage,
        )
    active = mlflow.start_run(run_id=saved["run_id"])
    with _stage_status(active.info.run_id, stage):
        yield PipelineRun(active.info.run_id, active.info.experiment_id, mlflow.get_tracking_uri())


def check_run(params: Params, run_file: str | Path) -> dict[str, Any]:
    """``run.json`` read and its MLflow run found, its training finished, without starting it.

    Validate, evaluate and register call this before any work, so a broken hand-over
    fails before anything is written.
    """
    run_file = Path(run_file)
    if not run_file.is_file():
        raise TrackingError(f"{run_file} not found: the train stage writes it; run `dvc repro train` first")
    saved = read_handover_json(run_file, "train")
    if not isinstance(saved.get("run_id"), str) or not saved["run_id"]:
        raise TrackingError(f"{run_file} has no run_id: the train stage writes it; rerun it (dvc repro -f train)")
    setup(params.tracking)
    if saved.get("tracking_uri") and saved["tracking_uri"] != mlflow.get_tracking_uri():
        log.warning(
            "run %s was created in %s but the store is now %s",
            saved["run_id"],
            saved["tracking_uri"],
            mlflow.get_tracking_uri(),
        )
    try:
        run = mlflow.get_run(saved["run_id"])
    except MlflowException as e:
        raise TrackingError(
            f"MLflow run {saved['run_id']} from {run_file} is not in {mlflow.get_tracking_uri()}; "
            "rerun the pipeline from train (dvc repro -f train)"
        ) from e
    train = run.data.tags.get(STAGE_TAG + "train")
    # Runs from before stage tags: a FINISHED run had finished its training.
    if train != "finished" and not (train is None and run.info.status == "FINISHED"):
        reason = run.data.tags.get(FAILURE, f"status {run.info.status}")
        raise TrackingError(
            f"MLflow run {saved['run_id']} from {run_file} did not finish training ({reason}); "
            "rerun training (dvc repro train)"
        )
    return saved
