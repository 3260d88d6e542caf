"""The GPU paths the params expose: CUDA device, bf16/fp16 autocast, channels_last, torch.compile.

Every test here needs a CUDA GPU and is skipped, with that reason, where there is none
(CI has none). They train tiny models on the quadrant task of test_training.py, so
they take seconds on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import make_loaders, make_meta, make_params, quadrant_task

from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import AugmentParams
from resnet.evaluation import evaluate
from resnet.loader import DeviceLoader
from resnet.resume import find_resume_checkpoint
from resnet.runtime import configure_torch
from resnet.split_evaluation import trained_with
from resnet.training import fit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)"),
]

CUDA = {"device": "cuda", "num_threads": 0}


def gpu_loaders(params, meta, **kw):
    """make_loaders() with the data on the GPU that configure_torch picks for train.device: cuda."""
    device = configure_torch(params.train)
    assert device.type == "cuda"
    return make_loaders(params, meta, device=str(device), **kw)


def test_auto_precision_on_gpu_is_bf16_where_supported_and_stored_in_the_checkpoint(tmp_path: Path) -> None:
    params, meta = make_params(epochs=1, precision="auto", **CUDA), make_meta()
    result = fit(params, meta, *gpu_loaders(params, meta), tmp_path)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert result.precision == expected and load_checkpoint(result.last_path)["precision"] == expected
    assert trained_with(load_checkpoint(result.last_path), torch.device("cuda"))[0] == expected


@pytest.mark.parametrize(
    "precision,channels_last,compile_",
    [
        ("fp32", False, False),
        ("fp32", True, False),
        ("bf16", True, False),
        ("fp16", False, False),
        ("fp16", True, False),
        ("bf16", True, True),
    ],
)
def test_fit_on_gpu_learns_and_checkpoints_load_on_cpu(
    tmp_path: Path, precision: str, channels_last: bool, compile_: bool
) -> None:
    params = make_params(epochs=4, lr=0.1, precision=precision, channels_last=channels_last, compile=compile_, **CUDA)
    meta = make_meta()
    result = fit(params, meta, *gpu_loaders(params, meta, n_train=512, n_val=128), tmp_path)

    assert result.device.startswith("cuda") and result.precision == precision
    assert next(result.model.parameters()).is_cuda
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.history[-1]["val_accuracy"] > 0.9, result.history  # the quadrant task is easy
    if channels_last:
        assert result.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ckpt = load_checkpoint(result.last_path)
    assert (ckpt["scaler"] is not None) == (precision == "fp16")  # a GradScaler only for fp16
    assert all(not k.startswith("_orig_mod") for k in ckpt["model"])

    # The checkpoint is usable without a GPU: same predictions on CPU as on the GPU in fp32.
    cpu_model = model_from_checkpoint(ckpt).eval()
    images, _ = quadrant_task(64, 16, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    gpu_model = result.model.float().eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    # Full fp32 on the GPU for the comparison: TF32 (on for training) differs from the CPU by ~1e-3.
    matmul_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            gpu_logits = gpu_model(x.cuda().contiguous(memory_format=layout)).cpu()
            cpu_logits = cpu_model(x)
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
    torch.testing.assert_close(cpu_logits, gpu_logits, atol=1e-4, rtol=1e-4)


def test_interrupted_gpu_run_resumes_and_finishes(tmp_path: Path) -> None:
    params = make_params(epochs=3, precision="fp16", channels_last=True, **CUDA)
    meta = make_meta()

    def stop_after_1(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(params, meta, *gpu_loaders(params, meta), tmp_path, on_epoch=stop_after_1)
    resume = find_resume_checkpoint(params, meta, tmp_path)
    assert resume is not None and resume["epoch"] == 1 and resume["scaler"] is not None
    result = fit(params, meta, *gpu_loaders(params, meta), tmp_path, resume=resume)
    assert result.resumed_from == 1 and result.epochs_completed == 3


def test_device_loader_on_gpu_matches_cpu_without_augmentation() -> None:
    images, labels = quadrant_task(100, 16)
    kw = {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "train": False}
    cpu = list(DeviceLoader(images, labels, 32, device="cpu", **kw))
    gpu = list(DeviceLoader(images, labels, 32, device="cuda", channels_last=True, **kw))
    assert [len(y) for _, y in gpu] == [32, 32, 32, 4]
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)


def test_a_streamed_split_on_the_gpu_gives_the_resident_batches(tmp_path: Path) -> None:
    """Read from the mapped file into pinned memory, copied without blocking: the same batches as resident."""
    from resnet.data.store import load_split, save_npz

    images, labels = quadrant_task(256, 16)
    save_npz(tmp_path / "train.npz", images=images, labels=labels)
    x, y = load_split(tmp_path, "train")
    aug = AugmentParams(crop_padding=0, flip=True, cutout=4, resized_crop_scale=0.3)
    kw = {"mean": [0.5] * 3, "std": [0.25] * 3, "device": "cuda", "train": True, "augment": aug, "seed": 1}
    resident, streamed = DeviceLoader(x, y, 64, **kw), DeviceLoader(x, y, 64, max_resident_bytes=0, **kw)
    assert streamed.streamed and not resident.streamed
    for (xa, ya), (xb, yb) in zip(resident, streamed, strict=True):
        assert xb.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)


def test_device_loader_augments_on_the_gpu() -> None:
    images, labels = quadrant_task(256, 16)
    aug = AugmentParams(crop_padding=2, flip=True, cutout=4, resized_crop_scale=0.0)
    loader = DeviceLoader(
        images, labels, 64, mean=[0.5] * 3, std=[0.25] * 3, device="cuda", train=True, augment=aug, seed=0
    )
    plain = DeviceLoader(images, labels, 64, mean=[0.5] * 3, std=[0.25] * 3, device="cuda", train=False)
    loader.set_epoch(0)
    first = [x.clone() for x, _ in loader]
    loader.set_epoch(0)
    again = [x for x, _ in loader]
    loader.set_epoch(1)
    other = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # (seed, epoch) fixes the augmentation
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    assert sum(x.shape[0] for x in first) == 256 and first[0].is_cuda
    assert not torch.equal(torch.cat(first).sort(0).values, torch.cat([x for x, _ in plain]).sort(0).values)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_evaluate_on_gpu_in_each_precision(precision: str) -> None:
    params = make_params(**CUDA)
    meta = make_meta()
    device = configure_torch(params.train)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 4)).to(device)
    images, labels = quadrant_task(128, 16)
    loader = DeviceLoader(images, labels, 50, mean=meta["mean"], std=meta["std"], device=device)
    out = evaluate(model, loader, 4, precision=precision)
    assert math.isfinite(out.loss) and 0.0 <= out.accuracy <= 1.0
    assert np.isclose(out.loss, evaluate(model, loader, 4).loss, rtol=2e-2)


def test_pyfunc_model_runs_on_the_gpu_by_default_and_agrees_with_the_cpu(tmp_path: Path) -> None:
    """model_config device auto picks the GPU; its answers equal the CPU's up to float rounding."""
    from types import SimpleNamespace

    from test_tracking import _checkpoint

    from resnet.tracking.model import ResNetClassifier

    _checkpoint(tmp_path / "best.pt")
    images = np.random.default_rng(0).integers(0, 256, (9, 24, 24, 3), dtype=np.uint8)
    answers = {}
    for device in ("auto", "cpu"):
        model = ResNetClassifier()
        model.load_context(
            SimpleNamespace(artifacts={"checkpoint": str(tmp_path / "best.pt")}, model_config={"device": device})
        )
        assert model.device.type == ("cuda" if device == "auto" else "cpu")
        answers[device] = model.predict(None, images)
    assert list(answers["auto"]["label"]) == list(answers["cpu"]["label"])
    np.testing.assert_allclose(
        answers["auto"].filter(like="prob_"), answers["cpu"].filter(like="prob_"), rtol=0, atol=1e-4
    )


def test_system_metrics_include_the_gpus_utilisation_and_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess

    from test_tracking import system_metrics_of_a_training

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    metrics = system_metrics_of_a_training(True)
    assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= set(metrics), metrics


def test_the_train_stage_runs_on_nccl_under_torchrun(tmp_path: Path) -> None:
    """The NCCL path: torchrun with one process per GPU (all GPUs, at most 2), SyncBatchNorm on.

    With one GPU this is a world of one (the process group and NCCL start, DDP stays out);
    with two, DDP and PyTorch's SyncBatchNorm run for real and the weights match one process.
    """
    import subprocess
    import sys

    from test_distributed import STAGE, _workspace

    from resnet import paths

    nproc = min(2, torch.cuda.device_count())
    root = _workspace(tmp_path, nproc, n_train=256, epochs=2)
    raw = (
        (root / paths.PARAMS)
        .read_text()
        .replace("device: cpu", "device: cuda")
        .replace("backend: auto", "backend: nccl")
    )
    (root / paths.PARAMS).write_text(raw)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", str(STAGE)]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert f"rank 0 of {nproc} (local rank 0), nccl on cuda:0" in out
    ckpt = load_checkpoint(root / paths.LAST_CHECKPOINT)
    assert ckpt["epoch"] == 2 and all(math.isfinite(h["val_loss"]) for h in ckpt["history"])
