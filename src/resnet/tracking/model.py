"""The pyfunc model: the checkpoint plus this package's code, raw images in, classes out."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types.schema import ColSpec, Schema

from resnet import preprocess
from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import TrackingParams
from resnet.loader import DeviceLoader
from resnet.tracking.runs import PipelineRun
from resnet.tracking.store import TrackingError, point_mlflow_at, quiet, resolve_tracking_uri
from resnet.tta import TTAModel, checkpoint_tta

__all__ = ["InputError", "INPUT_CONTRACT", "request_images", "ResNetClassifier", "log_model", "load_pyfunc"]

log = logging.getLogger("resnet.tracking")


class InputError(MlflowException):
    """A request the model refuses: a 400 answer whose message is exactly this one short line.

    MLflow's scoring server rewrites the message of an MlflowException raised by
    ``predict`` to ``Failed to predict data '<the whole input array>' ...`` (1.7 KB for
    one 64x64 image); this message keeps the first value it was given.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


#: The input contract, shown in the model's metadata (MLmodel) and docs. MLflow's own schema
#: check would cast JSON numbers to the signature's dtype silently (0.5 -> 0, 300 -> 44) and
#: answer a wrong rank with the input array in the message: the model checks its input itself.
INPUT_CONTRACT = (
    "images as a 4-d array (N, H, W, C): any height and width, C = 3 (RGB) or 1 (grayscale); pixel values "
    "integers 0..255 (uint8, or numbers with integral values: JSON); floats in [0, 1] are refused, multiply by "
    '255 and round. JSON: {"inputs": [image, ...]}, each image a list of rows of [r, g, b] pixels.'
)


def request_images(model_input: Any) -> np.ndarray:
    """The request as uint8 images (N, H, W, C), or :class:`InputError` saying what is wrong and the fix."""
    if isinstance(model_input, pd.DataFrame):
        raise InputError(f"send images as a 4-d array, not a table; {INPUT_CONTRACT}")
    try:
        arr = np.asarray(model_input)
    except ValueError as e:  # ragged nested lists
        raise InputError(f"the images are not a regular 4-d array ({e}); {INPUT_CONTRACT}") from None
    if arr.dtype.kind not in "uif":
        raise InputError(f"pixel values must be numbers, got {arr.dtype.name} values; {INPUT_CONTRACT}")
    if arr.ndim != 4:
        hint = " (one image: wrap it in a list)" if arr.ndim == 3 else ""
        raise InputError(f"expected images (N, H, W, C), got an array of shape {arr.shape}{hint}; {INPUT_CONTRACT}")
    n, h, w, c = arr.shape
    if n == 0 or h == 0 or w == 0:
        raise InputError(f"the request holds no image (shape {arr.shape})")
    if c not in (1, 3):
        raise InputError(
            f"images must have C = 1 (grayscale) or 3 (RGB) channels, got shape {arr.shape}; "
            "drop an alpha channel: images[..., :3]"
        )
    try:
        preprocess.check_pixels(w, h)
    except preprocess.ImageError as e:
        raise InputError(str(e)) from None
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise InputError(
            f"pixel values must be integers 0..255, got floats in [{arr.min():g}, {arr.max():g}]: for images "
            "scaled to [0, 1], multiply by 255 and round"
        )
    if arr.min() < 0 or arr.max() > 255:
        raise InputError(f"pixel values must be 0..255, got values in [{arr.min():g}, {arr.max():g}]")
    return arr.astype(np.uint8)


class ResNetClassifier(mlflow.pyfunc.PythonModel):
    """Raw images in, class probabilities and labels out.

    Input: see :data:`INPUT_CONTRACT`, as images are decoded (PIL, OpenCV, imageio),
    checked by :func:`request_images`. Each image goes the split stage's way to the
    model's input (:func:`resnet.preprocess.batch_pixels`: RGB, resize to the training
    size, grayscale for a 1-channel model), then the training normalisation
    (:class:`resnet.loader.DeviceLoader`), ``batch_size`` images at a time so that a
    large request needs memory for one batch of model inputs only. Output: a DataFrame
    with ``label`` (class name), ``class_index``, ``confidence`` and one ``prob_<class>``
    column per class.

    Settings (``model_config``, given at logging or to ``mlflow.pyfunc.load_model(...,
    model_config={...})``): ``device`` ("auto": a CUDA GPU where there is one, else
    the CPU; or "cpu", "cuda", "cuda:1") and ``batch_size``.
    """

    def load_context(self, context: Any) -> None:
        config = {**DEFAULT_CONFIG, **(getattr(context, "model_config", None) or {})}
        self.device = _serving_device(str(config["device"]))
        self.batch_size = int(config["batch_size"])
        if self.batch_size < 1:
            raise MlflowException(f"model_config batch_size must be at least 1, got {config['batch_size']!r}")
        ckpt = load_checkpoint(context.artifacts["checkpoint"], map_location="cpu")
        # The checkpoint's test-time augmentation (model.tta), as the evaluate stage measured it.
        self.model = TTAModel(model_from_checkpoint(ckpt), checkpoint_tta(ckpt)).eval().to(self.device)
        self.classes = list(ckpt["classes"])
        self.image_size = preprocess.as_size(ckpt.get("image_size"))
        self.channels = ckpt["arch"]["in_channels"]
        self.mean, self.std = list(ckpt["mean"]), list(ckpt["std"])

    # np.ndarray: MLflow infers no schema from this hint (the model checks its input itself, any type).
    def predict(self, context: Any, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        images = request_images(model_input)
        probs = [self._probabilities(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        p = np.concatenate(probs)
        idx = p.argmax(axis=1)
        out = pd.DataFrame(
            {
                "label": [self.classes[i] for i in idx],
                "class_index": idx.astype(np.int64),
                "confidence": p.max(axis=1).astype(np.float64),
            }
        )
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = p[:, i].astype(np.float64)
        return out

    def _probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax of one batch: resized, normalised and run on the model's device."""
        pixels = preprocess.batch_pixels(images, self.image_size, self.channels)
        labels = np.zeros(len(pixels), dtype=np.int64)
        loader = DeviceLoader(pixels, labels, len(pixels), mean=self.mean, std=self.std, device=self.device)
        with torch.inference_mode():
            return torch.cat([torch.softmax(self.model(x).float(), dim=1) for x, _ in loader]).cpu().numpy()


#: model_config defaults: the GPU where there is one, and batches that fit any machine.
DEFAULT_CONFIG = {"device": "auto", "batch_size": 64}


def _serving_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MlflowException(f"model_config device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        log.warning("model_config device %r: no CUDA GPU here; running on the CPU", name)
        return torch.device("cpu")
    return device


def _signature(ckpt: dict[str, Any]) -> ModelSignature:
    """The output columns; no input schema (see :data:`INPUT_CONTRACT`: the model checks its input)."""
    outputs = [ColSpec("string", "label"), ColSpec("long", "class_index"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", f"prob_{name}") for name in ckpt["classes"]]
    return ModelSignature(inputs=None, outputs=Schema(outputs))


def log_model(run: PipelineRun, checkpoint_path: str | Path, example_images: np.ndarray) -> str:
    """Log the checkpoint as a pyfunc model with signature and input example; return its URI.

    The model is our checkpoint plus the ``resnet`` package's code (code_paths), not
    a pickled or exported nn.Module: it loads back wherever torch and mlflow are
    installed, whatever the input shape. (MLflow 3's torch.export ("pt2") default
    for mlflow.pytorch fixes the batch size and input shape at export time.)
    """
    ckpt = load_checkpoint(checkpoint_path)
    example = np.ascontiguousarray(example_images[:2])
    with warnings.catch_warnings(), quiet("mlflow.pyfunc"):
        # The class is pickled by reference (it lives in this package, shipped in
        # code_paths), and the signature is given explicitly: MLflow's warnings about
        # pickled objects and missing type hints do not apply.
        warnings.simplefilter("ignore", UserWarning)
        info = _log_pyfunc(checkpoint_path, ckpt, example, _model_name(run, ckpt))
    log.info("logged model %s", info.model_uri)
    return info.model_uri


def _model_name(run: PipelineRun, ckpt: dict[str, Any]) -> str:
    """``resnet20-repro-1c8175d-resnet20-e15-lr0_2-3f9a1c``: the architecture and the run, as MLflow allows."""
    run_name = mlflow.get_run(run.run_id).info.run_name or run.run_id
    name = f"{ckpt['arch']['name']}-{run_name}"
    return "".join("_" if c in "/:.%\"'" else c for c in name)


def _log_pyfunc(checkpoint_path: str | Path, ckpt: dict[str, Any], example: np.ndarray, name: str) -> Any:
    import PIL

    import resnet

    return mlflow.pyfunc.log_model(
        name=name,
        python_model=ResNetClassifier(),
        # Produced at the checkpoint's epoch: MLflow links the run's metrics at this step (that
        # epoch's epoch/* series) to the model; its test figures are linked with their dataset
        # by the registry (resnet.tracking.lineage).
        step=int(ckpt.get("epoch", 0)),
        artifacts={"checkpoint": str(checkpoint_path)},
        code_paths=[str(Path(resnet.__file__).parent)],
        signature=_signature(ckpt),
        input_example=example,
        model_config=DEFAULT_CONFIG,
        metadata={
            "input": INPUT_CONTRACT,
            "classes": list(ckpt["classes"]),
            "image_size": ckpt.get("image_size"),
            "tta": checkpoint_tta(ckpt),  # how it predicts (model.tta), as evaluate measured it
        },
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


def load_pyfunc(model_uri: str, params: TrackingParams | None = None) -> Any:
    """Load a logged model (``models:/name@champion``, ``runs:/...``, a path) from the pipeline's store.

    ``params`` None: the store of MLFLOW_TRACKING_URI, else mlflow.db at the repository root.
    """
    # Only tracking.uri matters here; the experiment name does not.
    uri = resolve_tracking_uri(
        params or TrackingParams(uri=None, experiment="", system_metrics=False, system_metrics_interval=10)
    )
    point_mlflow_at(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise TrackingError(f"cannot load {model_uri} from {uri}: {str(e).splitlines()[0]}") from e
