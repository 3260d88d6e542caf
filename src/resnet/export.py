"""A portable ONNX export of a checkpoint, checked with onnxruntime against PyTorch.

The ONNX model takes what a user has after resizing: input ``images``, float32
``(N, H, W, C)`` pixels 0..255 at the checkpoint's image size (C = the model's
channels), any N; output ``probabilities``, ``(N, num_classes)``. The training
normalisation (the checkpoint's mean and std) and the NHWC to NCHW permute are inside
the graph, so nothing of this package is needed to run it; the class names, image size,
channels, mean, std and the checkpoint's sha256 are in the file's metadata.

Exported in fp32 on the CPU in eval mode whatever the training precision, with the
TorchScript-based exporter (``dynamo=False``): for these plain conv/BN/ReLU graphs it
gives the same operators as the dynamo path, takes ``dynamic_axes`` for the batch
dimension directly, and does not depend on torch.export tracing the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.tta import TTAModel, checkpoint_tta
from resnet.utils import PipelineError, atomic_path

__all__ = ["ExportError", "OPSET", "TOLERANCE", "export_onnx"]

log = logging.getLogger(__name__)

OPSET = 17
#: Largest accepted difference of probabilities between onnxruntime and PyTorch (fp32 on both).
TOLERANCE = 1e-4


class ExportError(PipelineError):
    """The ONNX export does not compute what the PyTorch model computes."""


class _Portable(nn.Module):
    """uint8-valued float NHWC pixels -> normalised NCHW -> the network -> softmax."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        # As resnet.loader.DeviceLoader: x / 255, then (x - mean) / std per channel.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2) / 255.0
        return torch.softmax(self.model((x - self.mean) / self.std), dim=1)


def _portable(ckpt: dict[str, Any]) -> _Portable:
    # With the checkpoint's test-time augmentation, so the exported graph answers as the pyfunc model does.
    model = TTAModel(model_from_checkpoint(ckpt).float(), checkpoint_tta(ckpt))
    return _Portable(model.eval(), list(ckpt["mean"]), list(ckpt["std"])).eval()


def _to_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes
        torch.onnx.export(
            module,
            (example,),
            buffer,
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    return buffer.getvalue()


def _with_metadata(onnx_bytes: bytes, ckpt: dict[str, Any], digest: str) -> bytes:
    import onnx

    proto = onnx.load_from_string(onnx_bytes)
    meta = {
        "classes": json.dumps(list(ckpt["classes"])),
        "image_size": json.dumps(list(ckpt["image_size"])),
        "channels": str(ckpt["arch"]["in_channels"]),
        "mean": json.dumps(list(ckpt["mean"])),
        "std": json.dumps(list(ckpt["std"])),
        "checkpoint_sha256": digest,
        "tta": checkpoint_tta(ckpt),  # the graph includes it (_portable)
        "input": "images: float32 (N, H, W, C) pixels 0..255 at image_size; output probabilities (N, classes)",
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _check_images(ckpt: dict[str, Any], images: np.ndarray | None) -> list[np.ndarray]:
    """Batches to compare on: the given images, or seeded random ones; two batch sizes either way."""
    h, w = ckpt["image_size"]
    c = ckpt["arch"]["in_channels"]
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (8, h, w, c), dtype=np.uint8)
    images = np.asarray(images, dtype=np.float32)
    return [images[:1], images] if len(images) > 1 else [images]


def export_onnx(checkpoint: str | Path, out: str | Path, *, check_images: np.ndarray | None = None) -> dict[str, Any]:
    """Export ``checkpoint`` to ``out`` (atomically) and check it; return what was checked.

    ``check_images``: uint8 ``(N, H, W, C)`` at the training size (default: seeded random
    ones); compared at batch 1 and N, so the dynamic batch is exercised. Raises
    :class:`ExportError` when onnxruntime and PyTorch differ by more than :data:`TOLERANCE`.
    """
    import onnxruntime as ort

    checkpoint, out = Path(checkpoint), Path(out)
    raw = checkpoint.read_bytes()
    ckpt = load_checkpoint(checkpoint)
    module = _portable(ckpt)
    batches = _check_images(ckpt, check_images)
    onnx_bytes = _with_metadata(_to_onnx(module, torch.from_numpy(batches[0])), ckpt, hashlib.sha256(raw).hexdigest())
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    diff = 0.0
    with torch.inference_mode():
        for batch in batches:
            want = module(torch.from_numpy(batch)).numpy()
            (got,) = session.run(["probabilities"], {"images": batch})
            diff = max(diff, float(np.abs(got - want).max()))
    if not diff <= TOLERANCE:
        raise ExportError(
            f"the ONNX export of {checkpoint} differs from PyTorch by {diff:.3g} (tolerance {TOLERANCE:g}); "
            "not written: report it with the checkpoint's architecture"
        )
    with atomic_path(out) as tmp:
        tmp.write_bytes(onnx_bytes)
    log.info("ONNX export %s: max |onnxruntime - torch| %.2g over batches %s", out, diff, [len(b) for b in batches])
    return {
        "path": str(out),
        "opset": OPSET,
        "max_abs_diff": diff,
        "batch_sizes_checked": [len(b) for b in batches],
        "onnxruntime_version": ort.__version__,
        "bytes": len(onnx_bytes),
    }
