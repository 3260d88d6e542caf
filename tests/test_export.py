"""The ONNX export: onnxruntime computes what the pipeline's pyfunc model computes, at any batch size."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_tracking import CLASSES, _checkpoint

from resnet import export
from resnet.checkpoint import load_checkpoint, save_checkpoint
from resnet.tracking.model import ResNetClassifier


def _pyfunc_probs(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    model = ResNetClassifier()
    model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config={"device": "cpu"}))
    return model.predict(None, images).filter(like="prob_").to_numpy()


@pytest.mark.parametrize("channels,tta", [(3, None), (1, None), (3, "flip_translate")])
def test_onnx_export_matches_the_pyfunc_model_at_any_batch_size(tmp_path: Path, channels: int, tta: str | None) -> None:
    ckpt_path = tmp_path / "best.pt"
    _checkpoint(ckpt_path, tta=tta)  # with test-time augmentation the exported graph includes it
    if channels == 1:  # the same network for grayscale input: a 1-channel first convolution
        ckpt = load_checkpoint(ckpt_path)
        ckpt["arch"]["in_channels"] = 1
        ckpt["model"]["conv1.weight"] = ckpt["model"]["conv1.weight"][:, :1].clone()
        ckpt["mean"], ckpt["std"] = [0.4], [0.25]
        save_checkpoint(ckpt_path, ckpt)
    out = tmp_path / "model.onnx"
    result = export.export_onnx(ckpt_path, out)
    assert result["max_abs_diff"] <= export.TOLERANCE and result["batch_sizes_checked"] == [1, 8]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        images = np.random.default_rng(n).integers(0, 256, (n, 16, 16, channels), dtype=np.uint8)
        (probs,) = session.run(["probabilities"], {"images": images.astype(np.float32)})
        np.testing.assert_allclose(probs, _pyfunc_probs(ckpt_path, images), rtol=0, atol=1e-5)

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["classes"]) == CLASSES and json.loads(meta["image_size"]) == [16, 16]
    assert meta["channels"] == str(channels) and len(meta["checkpoint_sha256"]) == 64
    assert meta["tta"] == (tta or "none")


def test_a_wrong_export_is_refused_and_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _checkpoint(tmp_path / "best.pt")
    real = export._to_onnx

    class Halved(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 0.5

    # What is exported disagrees with the PyTorch model: the check must catch it.
    monkeypatch.setattr(export, "_to_onnx", lambda module, example: real(Halved(module), example))
    with pytest.raises(export.ExportError, match=r"differs from PyTorch by .* \(tolerance 0.0001\)"):
        export.export_onnx(tmp_path / "best.pt", tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()
