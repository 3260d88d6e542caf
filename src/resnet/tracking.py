"""MLflow: one run per pipeline run, the pyfunc model, and the Model Registry.

The only module that imports mlflow. The train stage creates the run and writes its
id to ``models/run.json`` (a DVC output); validate, evaluate and register continue
the same run from that file, so a whole ``dvc repro`` is one row in the MLflow UI.

Where the store lives: ``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` from
params.yaml, else an embedded SQLite store ``mlflow.db`` with artifacts in
``mlartifacts/`` at the repository root. ``dvc exp run --temp`` and queued
experiments run in a temporary copy under ``.dvc/tmp/exps/``; the store is resolved
to the real repository above it, so those runs land beside the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from resnet import preprocess
from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import Params, TrackingParams, to_flat_dict
from resnet.loader import DeviceLoader
from resnet.utils import PipelineError, read_handover_json, repo_root, workspace_root, write_json

__all__ = [
    "TrackingError",
    "store_root",
    "resolve_tracking_uri",
    "PipelineRun",
    "start_run",
    "continue_run",
    "check_registrable",
    "check_run",
    "ResNetClassifier",
    "log_model",
    "register_model",
    "device_description",
]

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


class TrackingError(PipelineError):
    """The MLflow run or model a stage needs is not in the store."""


# --------------------------------------------------------------------------- the store


def store_root() -> Path:
    """The repository whose mlflow.db holds the runs, seen through DVC's temporary copies."""
    return workspace_root()


# mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI /
# MLFLOW_REGISTRY_URI, to this process and every subprocess it starts. What we exported
# must not be mistaken for the user's setting the next time round.
_exported: dict[str, str] = {}


def _user_env(name: str) -> str | None:
    """The user's value of an MLflow variable, ignoring one this module exported itself."""
    value = os.environ.get(name)
    return None if value is None or value == _exported.get(name) else value


def _point_mlflow_at(uri: str) -> None:
    """Tracking and (unless the user chose another) registry in the store at ``uri``."""
    mlflow.set_tracking_uri(uri)
    _exported["MLFLOW_TRACKING_URI"] = uri
    registry = _user_env("MLFLOW_REGISTRY_URI") or uri
    mlflow.set_registry_uri(registry)
    _exported["MLFLOW_REGISTRY_URI"] = registry


def resolve_tracking_uri(params: TrackingParams) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else sqlite:///<repo>/mlflow.db."""
    uri = _user_env("MLFLOW_TRACKING_URI") or params.uri
    if uri:
        return uri
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def _setup(params: TrackingParams) -> str:
    """Point mlflow at the store and return the experiment id (created if missing)."""
    embedded = not (_user_env("MLFLOW_TRACKING_URI") or params.uri)
    _point_mlflow_at(resolve_tracking_uri(params))
    exp = mlflow.get_experiment_by_name(params.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if embedded:
        # Artifacts beside the embedded store, not in whatever directory the stage ran from.
        location = (store_root() / "mlartifacts").as_uri()
    return mlflow.create_experiment(params.experiment, artifact_location=location)


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
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"cpu: {cpu} ({os.cpu_count()} cores)"


def _provenance_tags(meta: dict[str, Any], device: torch.device | str) -> dict[str, str]:
    # dvc exp run sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV; a plain dvc repro does not.
    commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD") or "unknown"
    tags = {
        "dvc.experiment": os.environ.get("DVC_EXP_NAME", "workspace"),
        "git.commit": commit,
        "mlflow.source.git.commit": commit,
        "dataset.sha256": str(meta.get("source_sha256", "unknown")),
        "dataset.source": str(meta.get("source", "unknown")),
        "device": device_description(device),
        "torch.version": torch.__version__,
    }
    if _git("status", "--porcelain", "--untracked-files=no"):
        tags["git.dirty"] = "true"
    return tags


# --------------------------------------------------------------------------- runs


@dataclass
class PipelineRun:
    """The MLflow run of one pipeline run; what the stages log through."""

    run_id: str
    experiment_id: str
    tracking_uri: str

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch curves: every metric with step = epoch."""
        values = {k: float(v) for k, v in metrics.items() if k != "epoch" and v is not None}
        mlflow.log_metrics(values, step=int(epoch), run_id=self.run_id)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numeric, step=step, run_id=self.run_id)

    def log_artifacts(self, paths: Sequence[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                mlflow.log_artifact(str(p), artifact_path=artifact_path, run_id=self.run_id)
            else:
                log.warning("not logging %s to MLflow: it does not exist", p)

    def set_tags(self, tags: dict[str, Any]) -> None:
        client = MlflowClient()
        for k, v in tags.items():
            client.set_tag(self.run_id, k, str(v))

    def save(self, run_file: str | Path) -> None:
        write_json(run_file, asdict(self))


def _log_dataset(meta: dict[str, Any]) -> None:
    """Record the data's provenance (source, checksum, counts) as the run's input dataset."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source_uri = str(meta.get("source", "unknown"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "can be interpreted in multiple ways"
            source = resolve_dataset_source(source_uri)
    except MlflowException:
        # A relative local path resolves to nothing; record it as a file URI instead.
        source = resolve_dataset_source(Path(source_uri).resolve().as_uri())
    digest = str(meta.get("source_sha256", ""))[:16] or None
    name = Path(source_uri.rstrip("/")).name or "dataset"
    # One input: MLflow keeps a dataset once per run, whatever the context, and the
    # train/val/test splits all come from this one source.
    mlflow.log_input(MetaDataset(source=source, name=name, digest=digest), context="training")


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
    FINISHED on success, KILLED on Ctrl-C and FAILED on an error.
    """
    experiment_id = _setup(params.tracking)
    run_id = None
    if resume_run_id:
        try:
            run_id = mlflow.get_run(resume_run_id).info.run_id
        except MlflowException:
            log.warning("MLflow run %s of the interrupted training is gone; starting a new run", resume_run_id)
    tags = _provenance_tags(meta, device)
    run_name = os.environ.get("DVC_EXP_NAME")
    with _run_status(
        mlflow.start_run(
            run_id=run_id, experiment_id=None if run_id else experiment_id, run_name=None if run_id else run_name
        )
    ) as active:
        run = PipelineRun(active.info.run_id, active.info.experiment_id, mlflow.get_tracking_uri())
        run.save(run_file)
        mlflow.set_tags(tags)
        if run_id is None:
            mlflow.log_params(to_flat_dict(params))
            _log_dataset(meta)
        log.info("MLflow run %s (%s) in %s", run.run_id, "resumed" if run_id else "new", run.tracking_uri)
        yield run


@contextlib.contextmanager
def _run_status(active: mlflow.ActiveRun) -> Iterator[mlflow.ActiveRun]:
    try:
        yield active
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


@contextlib.contextmanager
def continue_run(params: Params, run_file: str | Path) -> Iterator[PipelineRun]:
    """Continue the train stage's run (validate, evaluate, register)."""
    saved = check_run(params, run_file)
    with _run_status(mlflow.start_run(run_id=saved["run_id"])) as active:
        yield PipelineRun(active.info.run_id, active.info.experiment_id, mlflow.get_tracking_uri())


def check_run(params: Params, run_file: str | Path) -> dict[str, Any]:
    """``run.json`` read and its MLflow run found, without starting it: validate, evaluate and
    register call this before any work, so a broken hand-over fails before anything is written.
    """
    run_file = Path(run_file)
    if not run_file.is_file():
        raise TrackingError(f"{run_file} not found: the train stage writes it; run `dvc repro train` first")
    saved = read_handover_json(run_file, "train")
    if not isinstance(saved.get("run_id"), str) or not saved["run_id"]:
        raise TrackingError(f"{run_file} has no run_id: the train stage writes it; rerun it (dvc repro -f train)")
    _setup(params.tracking)
    if saved.get("tracking_uri") and saved["tracking_uri"] != mlflow.get_tracking_uri():
        log.warning(
            "run %s was created in %s but the store is now %s",
            saved["run_id"],
            saved["tracking_uri"],
            mlflow.get_tracking_uri(),
        )
    try:
        mlflow.get_run(saved["run_id"])
    except MlflowException as e:
        raise TrackingError(
            f"MLflow run {saved['run_id']} from {run_file} is not in {mlflow.get_tracking_uri()}; "
            "rerun the pipeline from train (dvc repro -f train)"
        ) from e
    return saved


# --------------------------------------------------------------------------- the model


class ResNetClassifier(mlflow.pyfunc.PythonModel):
    """Raw images in, class probabilities and labels out.

    Input: uint8 array (N, H, W, C) of any height and width, C = 3 (RGB) or 1
    (grayscale), as images are decoded (PIL, OpenCV, imageio). Each image goes the
    split stage's way to the model's input (:func:`resnet.preprocess.batch_pixels`:
    RGB, resize to the training size, grayscale for a 1-channel model), then the
    training normalisation (:class:`resnet.loader.DeviceLoader`). MLflow's schema
    check wants 4 dimensions: pass a grayscale batch as (N, H, W, 1). Output: a
    DataFrame with ``label`` (class name), ``class_index``, ``confidence`` and one
    ``prob_<class>`` column per class.
    """

    batch_size = 256

    def load_context(self, context: Any) -> None:
        ckpt = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu")
        self.model = model_from_checkpoint(ckpt).eval()
        self.classes = list(ckpt["classes"])
        self.image_size = preprocess.as_size(ckpt.get("image_size"))
        self.channels = ckpt["arch"]["in_channels"]
        self.mean, self.std = list(ckpt["mean"]), list(ckpt["std"])

    # np.ndarray: MLflow infers no schema from it (the logged signature describes the input).
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = preprocess.batch_pixels(np.asarray(model_input), self.image_size, self.channels)
        probs = []
        if len(images):
            loader = DeviceLoader(
                images,
                np.zeros(len(images), dtype=np.int64),
                self.batch_size,
                mean=self.mean,
                std=self.std,
                device="cpu",
            )
            with torch.inference_mode():
                probs = [torch.softmax(self.model(x), dim=1) for x, _ in loader]
        p = torch.cat(probs).numpy() if probs else np.zeros((0, len(self.classes)), dtype=np.float32)
        idx = p.argmax(axis=1)
        out = pd.DataFrame(
            {
                "label": [self.classes[i] for i in idx],
                "class_index": idx.astype(np.int64),
                "confidence": p.max(axis=1).astype(np.float64) if len(p) else np.zeros(0),
            }
        )
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = p[:, i].astype(np.float64)
        return out


def _signature(ckpt: dict[str, Any]) -> ModelSignature:
    """uint8 images of any number, height, width and channels in (the model refuses C not 1 or 3)."""
    outputs = [ColSpec("string", "label"), ColSpec("long", "class_index"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"prob_{name}") for name in ckpt["classes"]]
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, -1))]), outputs=Schema(outputs))


def log_model(run: PipelineRun, checkpoint_path: str | Path, example_images: np.ndarray) -> str:
    """Log the checkpoint as a pyfunc model with signature and input example; return its URI.

    The model is our checkpoint plus the ``resnet`` package's code (code_paths), not
    a pickled or exported nn.Module: it loads back wherever torch and mlflow are
    installed, whatever the input shape. (MLflow 3's torch.export ("pt2") default
    for mlflow.pytorch fixes the batch size and input shape at export time.)
    """
    ckpt = load_checkpoint(checkpoint_path)
    example = np.ascontiguousarray(example_images[:2])
    with warnings.catch_warnings(), _quiet("mlflow.pyfunc"):
        # The class is pickled by reference (it lives in this package, shipped in
        # code_paths), and the signature is given explicitly: MLflow's warnings about
        # pickled objects and missing type hints do not apply.
        warnings.simplefilter("ignore", UserWarning)
        info = _log_pyfunc(checkpoint_path, ckpt, example)
    log.info("logged model %s", info.model_uri)
    return info.model_uri


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    lg = logging.getLogger(logger)
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _log_pyfunc(checkpoint_path: str | Path, ckpt: dict[str, Any], example: np.ndarray) -> Any:
    import PIL

    import resnet

    return mlflow.pyfunc.log_model(
        name="model",
        python_model=ResNetClassifier(),
        artifacts={"checkpoint": str(checkpoint_path)},
        code_paths=[str(Path(resnet.__file__).parent)],
        signature=_signature(ckpt),
        input_example=example,
        # Pinned explicitly: inferring requirements starts a subprocess that loads the model.
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
            f"pandas=={pd.__version__}",
            f"mlflow=={mlflow.__version__}",
            f"pillow=={PIL.__version__}",
            "pyyaml",
        ],
    )


# --------------------------------------------------------------------------- registry


def _version_metric(client: MlflowClient, version: Any, metric: str) -> float | None:
    if metric in version.tags:
        with contextlib.suppress(ValueError):
            return float(version.tags[metric])
    if version.run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(version.run_id).data.metrics.get(metric)
    return None


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists; any other failure (auth, connection) is an error."""
    try:
        client.create_registered_model(name, description="ResNets trained by the resnet-pipeline DVC pipeline")
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            return
        raise TrackingError(
            f"cannot create registered model {name!r} in {mlflow.get_registry_uri()}: {str(e).splitlines()[0]} "
            f"({e.error_code}); check the registry's address and credentials (MLFLOW_TRACKING_URI, tracking.uri)"
        ) from e


def check_registrable(metrics: dict[str, Any], metric: str, source: str = "the test metrics") -> None:
    """Refuse a diverged model: any non-finite metric, ``metric`` (the one register compares) included."""
    fix = (
        "the model diverged; fix the training (e.g. lower train.lr or set train.grad_clip) and rerun (dvc repro train)"
    )
    bad = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v))
    if bad:
        raise TrackingError(f"{source} has non-finite {', '.join(bad)}: not registered; {fix}")


def register_model(
    run: PipelineRun, model_uri: str, name: str, metric: str, metrics: dict[str, float]
) -> dict[str, Any]:
    """Register a version; alias it ``champion`` if it beats the current champion on ``metric``.

    Otherwise the new version gets the alias ``challenger``. The champion keeps its
    alias on a tie: a model must be better, not equal, to replace it.
    """
    check_registrable(metrics, metric)
    client = MlflowClient()
    _ensure_registered_model(client, name)
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in metrics.items()})
    client.set_model_version_tag(name, version.version, "mlflow.run_id", run.run_id)

    new_value = float(metrics[metric])
    # The aliases as the registry lists them: a missing champion is no error, while a failing registry is.
    champion_version = client.get_registered_model(name).aliases.get(CHAMPION)
    champion = client.get_model_version(name, champion_version) if champion_version else None
    champion_value = _version_metric(client, champion, metric) if champion else None
    if champion is None or champion_value is None or new_value > champion_value:
        alias = CHAMPION
    else:
        alias = CHALLENGER
    client.set_registered_model_alias(name, alias, version.version)
    reason = (
        f"{metric} {new_value:.4f} > champion v{champion.version}'s {champion_value:.4f}"
        if alias == CHAMPION and champion is not None and champion_value is not None
        else "no champion yet"
        if alias == CHAMPION
        else f"{metric} {new_value:.4f} does not beat champion v{champion.version}'s {champion_value:.4f}"
    )
    log.info("registered %s version %s as @%s (%s)", name, version.version, alias, reason)
    return {
        "model_name": name,
        "version": int(version.version),
        "alias": alias,
        "reason": reason,
        "metric": metric,
        "value": new_value,
        "previous_champion_version": int(champion.version) if champion else None,
        "previous_champion_value": champion_value,
        "model_uri": model_uri,
        "run_id": run.run_id,
    }


# --------------------------------------------------------------------------- inference


def load_pyfunc(model_uri: str, params: TrackingParams | None = None) -> Any:
    """Load a logged model (``models:/name@champion``, ``runs:/...``, a path) from the pipeline's store.

    ``params`` None: the store of MLFLOW_TRACKING_URI, else mlflow.db at the repository root.
    """
    # Only tracking.uri matters here; the experiment name does not.
    uri = resolve_tracking_uri(params or TrackingParams(uri=None, experiment=""))
    _point_mlflow_at(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise TrackingError(f"cannot load {model_uri} from {uri}: {str(e).splitlines()[0]}") from e
