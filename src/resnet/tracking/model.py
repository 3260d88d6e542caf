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
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from resnet import preprocess
from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import TrackingParams
from resnet.loader import DeviceLoader
from resnet.tracking.runs import PipelineRun
from resnet.tracking.store import TrackingError, point_mlflow_at, quiet, resolve_tracking_uri

__all__ = ["ResNetClassifier", "log_model", "load_pyfunc"]

log = logging.getLogger("resnet.tracking")


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
    with warnings.catch_warnings(), quiet("mlflow.pyfunc"):
        # The class is pickled by reference (it lives in this package, shipped in
        # code_paths), and the signature is given explicitly: MLflow's warnings about
        # pickled objects and missing type hints do not apply.
        warnings.simplefilter("ignore", UserWarning)
        info = _log_pyfunc(checkpoint_path, ckpt, example)
    log.info("logged model %s", info.model_uri)
    return info.model_uri


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


def load_pyfunc(model_uri: str, params: TrackingParams | None = None) -> Any:
    """Load a logged model (``models:/name@champion``, ``runs:/...``, a path) from the pipeline's store.

    ``params`` None: the store of MLFLOW_TRACKING_URI, else mlflow.db at the repository root.
    """
    # Only tracking.uri matters here; the experiment name does not.
    uri = resolve_tracking_uri(params or TrackingParams(uri=None, experiment=""))
    point_mlflow_at(uri)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise TrackingError(f"cannot load {model_uri} from {uri}: {str(e).splitlines()[0]}") from e
