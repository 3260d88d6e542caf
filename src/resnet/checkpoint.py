"""Checkpoints: save atomically, load with clear errors, rebuild the model they hold.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` accepts (tensors,
numbers, strings, lists, dicts), so loading one never runs pickled code. Keys:

    version      CHECKPOINT_VERSION
    arch         {"name", "num_classes", "in_channels", "options"}: what build_model takes;
                 "tta": model.tta, how the model predicts (absent in older ones: none, resnet.tta)
    model        the model's state_dict
    classes      class names, index = label
    mean, std    per-channel normalisation (0..1 scale) the model was trained with
    image_size   [H, W] of the training images
    params       the whole validated params.yaml as a nested dict
    epoch        epochs completed
    ... and, for resumable checkpoints, optimizer / scheduler / scaler / rng / history.
    ema          with train.ema on: ``model`` is the average, this the training weights and
                 the average's counters (resnet.ema); absent otherwise
"""

from __future__ import annotations

import io
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet.models import ResNet, build_model
from resnet.utils import PipelineError, atomic_path

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "model_from_checkpoint",
    "load_pretrained",
    "freeze_batchnorm_if_frozen",
]

CHECKPOINT_VERSION = 1
log = logging.getLogger(__name__)


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not one of ours."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: an interrupted save never leaves a broken file.

    Serialized in memory first, then written as plain bytes: torch.save's own file
    writer turns a full disk into an opaque RuntimeError ("PytorchStreamWriter failed
    writing file"), a plain write gives an OSError naming ``path`` (resnet.stage reports it).
    """
    state = {"version": CHECKPOINT_VERSION, **state}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buffer.getbuffer())


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; run the train stage first (dvc repro train)")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); delete it and rerun training (dvc repro train)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        pickle.UnpicklingError,
        ValueError,
        OSError,
        IndexError,  # a text file through the weights-only unpickler
        KeyError,
        TypeError,
    ) as e:
        first = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {first}); "
            "delete it and rerun training (dvc repro train)"
        ) from e


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints, checking that it is complete."""
    path = Path(path)
    ckpt = _torch_load(path, map_location)
    required = ("version", "arch", "model", "classes", "mean", "std")
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (missing {missing}); "
            "rerun training (dvc repro train) to write one"
        )
    if ckpt["version"] > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}; this package reads up to "
            f"{CHECKPOINT_VERSION}: update the package, or retrain with this one"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> ResNet:
    """Rebuild the network a checkpoint describes and load its weights (strictly)."""
    arch = ckpt["arch"]
    model = build_model(arch["name"], arch["num_classes"], arch["in_channels"], **arch.get("options", {}))
    model.load_state_dict(ckpt["model"])
    return model


def load_pretrained(model: ResNet, path: str | Path, freeze_backbone: bool = False) -> ResNet:
    """Initialise ``model`` from a checkpoint on disk, for fine-tuning.

    ``path`` may be one of our checkpoints or a plain state dict such as a
    torchvision ResNet's (``torch.save(torchvision.models.resnet18(weights=...).state_dict(), p)``).
    Every tensor whose name and shape match is loaded; the classifier is kept fresh
    when the number of classes differs. With ``freeze_backbone`` only ``fc`` trains.
    """
    path = Path(path)
    obj = _torch_load(path, "cpu")
    state = obj["model"] if isinstance(obj, dict) and "model" in obj and "arch" in obj else obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds neither one of our checkpoints nor a state dict of tensors")

    own = model.state_dict()
    loadable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(state) - set(loadable))
    backbone = [k for k in own if not k.startswith("fc.")]
    missing_backbone = [k for k in backbone if k not in loadable]
    if missing_backbone:
        raise CheckpointError(
            f"{path} does not fit model: {len(missing_backbone)} backbone tensors missing or of another shape "
            f"(first: {missing_backbone[0]}); check model.name, model.stem and model.width_multiplier"
        )
    model.load_state_dict(loadable, strict=False)
    log.info(
        "loaded %d tensors from %s%s",
        len(loadable),
        path,
        f"; kept a fresh classifier ({', '.join(skipped)})" if skipped else "",
    )

    if freeze_backbone:
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("fc.")
    return model


def freeze_batchnorm_if_frozen(model: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed in layers whose parameters are frozen.

    A frozen backbone in train() mode would still update its BN statistics, so
    'train only the head' would quietly change the backbone. Call after model.train().
    """
    for m in model.modules():
        # All parameters, not only the weight: resnet9's BatchNorms fix their weight and train their bias.
        if isinstance(m, nn.BatchNorm2d) and m.affine and not any(p.requires_grad for p in m.parameters()):
            m.eval()
