"""resnet.evaluation and the validate/evaluate stages.

Metric functions are checked against confusion matrices worked out by hand (and
against scikit-learn when it happens to be installed); evaluate() against a manual
loop and against logits whose metrics are known; the stage scripts end to end in a
temporary directory holding tiny data, a tiny checkpoint and a tiny params.yaml.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import matplotlib.image as mpimg
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml
from paramsets import repo_params
from torch import nn

from resnet import paths, tracking
from resnet.checkpoint import save_checkpoint
from resnet.data.store import load_split
from resnet.evaluation import (
    EvalResult,
    EvaluationError,
    confusion_matrix,
    evaluate,
    per_class_metrics,
)
from resnet.loader import DeviceLoader
from resnet.models import build_model
from resnet.plots import plot_confusion_matrix, plot_misclassified
from resnet.split_evaluation import trained_with

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCALARS = ["loss", "accuracy", "top5_accuracy", "macro_precision", "macro_recall", "macro_f1"]


# --------------------------------------------------------------------------- metric functions


def test_confusion_matrix_matches_hand_count() -> None:
    y_true = [0, 0, 1, 1, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 1]
    expected = np.array([[1, 1, 0], [0, 2, 0], [1, 1, 1]])
    cm = confusion_matrix(y_true, y_pred, 3)
    np.testing.assert_array_equal(cm, expected)
    assert cm.dtype == np.int64
    # Tensors are accepted too (what evaluate() has in hand).
    np.testing.assert_array_equal(confusion_matrix(torch.tensor(y_true), torch.tensor(y_pred), 3), expected)


def test_per_class_metrics_match_hand_computation() -> None:
    cm = np.array([[1, 1, 0], [0, 2, 0], [1, 1, 1]])
    m = per_class_metrics(cm)
    # precision = tp / column sum (2, 4, 1); recall = tp / row sum (2, 2, 3)
    np.testing.assert_allclose(m["precision"], [1 / 2, 2 / 4, 1 / 1])
    np.testing.assert_allclose(m["recall"], [1 / 2, 2 / 2, 1 / 3])
    # F1 = 2pr / (p + r): class 1: 2 * 0.5 * 1 / 1.5; class 2: 2 * 1 * (1/3) / (4/3)
    np.testing.assert_allclose(m["f1"], [0.5, 2 / 3, 0.5])
    np.testing.assert_array_equal(m["support"], [2, 2, 3])


def test_class_never_predicted_or_absent_gives_zeros_without_warnings() -> None:
    # Class 2 occurs but is never predicted; class 3 neither occurs nor is predicted.
    cm = confusion_matrix([0, 1, 2, 2], [0, 1, 1, 1], 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 RuntimeWarning would fail the test
        m = per_class_metrics(cm)
    np.testing.assert_allclose(m["precision"], [1.0, 1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(m["recall"], [1.0, 1.0, 0.0, 0.0])
    np.testing.assert_allclose(m["f1"], [1.0, 0.5, 0.0, 0.0])
    np.testing.assert_array_equal(m["support"], [1, 1, 2, 0])
    assert not any(np.isnan(v).any() for v in m.values())


def test_metrics_agree_with_sklearn_when_installed() -> None:
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    n = 7
    y_true = rng.integers(0, n, 300)
    y_pred = np.where(rng.random(300) < 0.4, y_true, rng.integers(0, n - 1, 300))  # class 6 rarely predicted
    cm = confusion_matrix(y_true, y_pred, n)
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y_true, y_pred, labels=range(n)))
    p, r, f, s = sk.precision_recall_fscore_support(y_true, y_pred, labels=range(n), zero_division=0)
    m = per_class_metrics(cm)
    np.testing.assert_allclose(m["precision"], p)
    np.testing.assert_allclose(m["recall"], r)
    np.testing.assert_allclose(m["f1"], f)
    np.testing.assert_array_equal(m["support"], s)


@pytest.mark.parametrize(
    ("y_true", "y_pred", "match"),
    [
        ([0, 1, 3], [0, 1, 1], r"y_true holds labels in 0\.\.3, outside 0\.\.2"),
        ([0, 1], [0, 1, 1], "equal length"),
        ([0, -1], [0, 1], "outside 0..2"),
        ([0.0, 1.0], [0.0, 1.0], "must be integers"),
    ],
)
def test_confusion_matrix_rejects_bad_labels(y_true: list, y_pred: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        confusion_matrix(y_true, y_pred, 3)


def test_per_class_metrics_rejects_non_square() -> None:
    with pytest.raises(ValueError, match="square"):
        per_class_metrics(np.zeros((2, 3)))


# --------------------------------------------------------------------------- evaluate()


def _known_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """Six classes, six images; the true class ranks 1st, 1st, 2nd, 5th, 6th, 6th."""
    logits = torch.tensor(
        [
            [5.0, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 0, rank 1
            [0.0, 4.0, 1.0, 0.0, 0.0, 0.0],  # label 1, rank 1
            [3.0, 0.0, 2.0, 0.0, 0.0, 0.0],  # label 2, rank 2 (predicted 0)
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 4, rank 5 (predicted 0)
            [6.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # label 5, rank 6 (predicted 0)
            [1.0, 0.0, 3.0, 2.0, 5.0, 4.0],  # label 1, rank 6 (predicted 4)
        ]
    )
    labels = torch.tensor([0, 1, 2, 4, 5, 1])
    return logits, labels


def test_evaluate_on_known_logits() -> None:
    logits, labels = _known_logits()
    # The "model" passes the logits through, so every metric is known in advance.
    batches = [(logits[:4], labels[:4]), (logits[4:], labels[4:])]
    result = evaluate(nn.Flatten(), batches, 6, device="cpu")

    assert result.topk == 5
    assert result.accuracy == pytest.approx(2 / 6)
    assert result.top5_accuracy == pytest.approx(4 / 6)
    expected_loss = (torch.logsumexp(logits, 1) - logits[torch.arange(6), labels]).mean().item()
    assert result.loss == pytest.approx(expected_loss, rel=1e-6)
    np.testing.assert_array_equal(result.predictions, [0, 1, 0, 0, 0, 4])
    np.testing.assert_array_equal(result.misclassified_indices, [2, 3, 4, 5])
    np.testing.assert_allclose(result.misclassified_probabilities, logits[2:].softmax(1).numpy(), rtol=1e-6)
    np.testing.assert_allclose(result.confidences, logits.softmax(1).max(1).values.numpy(), rtol=1e-6)
    expected_cm = confusion_matrix(labels, [0, 1, 0, 0, 0, 4], 6)
    np.testing.assert_array_equal(result.confusion, expected_cm)
    assert result.macro_f1 == pytest.approx(per_class_metrics(expected_cm)["f1"].mean())
    # Label smoothing changes the loss only.
    smoothed = evaluate(nn.Flatten(), batches, 6, device="cpu", label_smoothing=0.1)
    assert smoothed.loss != pytest.approx(result.loss)
    assert smoothed.accuracy == result.accuracy


def test_evaluate_loss_does_not_depend_on_the_batching() -> None:
    """Training validates at train.batch_size, the validate stage at validate.batch_size: same loss, bit for bit."""
    gen = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(1000, 10, generator=gen) * 3, torch.randint(0, 10, (1000,), generator=gen)

    def loss(batch: int) -> float:
        batches = [(logits[i : i + batch], labels[i : i + batch]) for i in range(0, 1000, batch)]
        return evaluate(nn.Flatten(), batches, 10, device="cpu").loss

    assert loss(7) == loss(128) == loss(500) == loss(1000)
    assert loss(1000) == pytest.approx(F.cross_entropy(logits.double(), labels).item(), rel=1e-7)


class _AutocastProbe(nn.Module):
    """Passes its input through, noting whether CPU autocast is on and to which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.seen: list[torch.dtype | None] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on = torch.is_autocast_enabled("cpu")
        self.seen.append(torch.get_autocast_dtype("cpu") if on else None)
        return x


def test_evaluate_runs_the_forward_pass_in_the_precision_asked() -> None:
    logits, labels = _known_logits()
    probe = _AutocastProbe()
    plain = evaluate(probe, [(logits, labels)], 6)
    half = evaluate(probe, [(logits, labels)], 6, precision="bf16")
    assert probe.seen == [None, torch.bfloat16]
    assert half.loss == plain.loss  # the loss is computed in fp32 from the logits, outside autocast
    evaluate(probe, [(logits, labels)], 6, precision="fp16")
    assert probe.seen[-1] == torch.float16


def test_checkpoints_are_evaluated_as_their_training_validated_them() -> None:
    cpu = torch.device("cpu")
    trained = {"params": {"train": {"precision": "bf16", "channels_last": True}}}
    assert trained_with(trained, cpu) == ("bf16", True)  # bf16 autocast runs on any CPU, as training did
    trained = {"params": {"train": {"precision": "fp16", "channels_last": True}}}
    assert trained_with(trained, cpu) == ("fp32", True)  # fp16 is for GPUs: CPU training ran fp32
    assert trained_with({"params": {"train": {"precision": "fp32", "channels_last": False}}}, cpu) == ("fp32", False)
    assert trained_with({"params": {}}, cpu) == ("fp32", False)  # a hand-made checkpoint: plain fp32
    # train.precision auto: what it resolved to where it trained, stored beside the params, not what it would here.
    auto = {"params": {"train": {"precision": "auto", "channels_last": False}}}
    assert trained_with({**auto, "precision": "bf16"}, cpu) == ("bf16", False)
    assert trained_with({**auto, "precision": "fp32"}, cpu) == ("fp32", False)
    assert trained_with({**auto, "precision": "fp16"}, cpu) == ("fp32", False)  # a GPU's fp16: fp32 on a CPU


def test_topk_uses_all_classes_when_fewer_than_five() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    result = evaluate(nn.Flatten(), [(logits, torch.tensor([0, 2]))], 3, device="cpu")
    assert result.topk == 3
    assert result.accuracy == 0.0
    assert result.top5_accuracy == 1.0


def _tiny_model(num_classes: int, seed: int = 0, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes, in_channels, width_multiplier=0.25)
    # Non-trivial BatchNorm statistics, so eval mode differs from train mode and images
    # get different predictions (a fresh network tends to predict one class for all).
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
    return model


def _tiny_split(n: int, num_classes: int, seed: int, size: int = 8, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    return images, labels


def test_evaluate_matches_manual_argmax_loop() -> None:
    num_classes = 10
    images, labels = _tiny_split(37, num_classes, seed=1)
    model = _tiny_model(num_classes)
    model.train()
    # batch 8 over 37 images: the last batch is partial and must count.
    loader = DeviceLoader(images, labels, 8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], device="cpu")

    result = evaluate(model, loader, num_classes, device="cpu")
    assert model.training, "evaluate() must give the model back in the mode it found it"

    model.eval()
    all_logits, all_y = [], []
    with torch.no_grad():
        for x, y in loader:
            all_logits.append(model(x))
            all_y.append(y)
    logits, y = torch.cat(all_logits), torch.cat(all_y)
    manual_pred = logits.argmax(1)
    assert result.num_images == 37
    np.testing.assert_array_equal(result.labels, labels)
    np.testing.assert_array_equal(result.predictions, manual_pred.numpy())
    assert result.accuracy == pytest.approx((manual_pred == y).float().mean().item())
    assert result.loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    top5 = (logits.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    assert result.top5_accuracy == pytest.approx(top5)
    assert result.top5_accuracy >= result.accuracy
    assert len(np.unique(result.predictions)) > 1, "test model should not predict a single class"
    assert result.confusion.sum() == 37
    np.testing.assert_array_equal(result.support, np.bincount(labels, minlength=num_classes))
    np.testing.assert_array_equal(result.misclassified_indices, np.flatnonzero(manual_pred.numpy() != labels))
    np.testing.assert_allclose(result.misclassified_probabilities.sum(1), 1.0, rtol=1e-5)


def test_evaluate_rejects_wrong_num_classes_and_empty_loader() -> None:
    logits, labels = _known_logits()
    with pytest.raises(EvaluationError, match=r"expected \(batch, 4\)"):
        evaluate(nn.Flatten(), [(logits, labels)], 4, device="cpu")
    with pytest.raises(EvaluationError, match="no batches"):
        evaluate(nn.Flatten(), [], 6, device="cpu")


def test_flat_metrics_share_names_across_prefixes() -> None:
    logits, labels = _known_logits()
    result = evaluate(nn.Flatten(), [(logits, labels)], 6, device="cpu")
    val, test = result.flat_metrics("val"), result.flat_metrics("test")
    assert list(val) == [f"val_{k}" for k in SCALARS]
    assert [k.removeprefix("test_") for k in test] == [k.removeprefix("val_") for k in val]
    assert all(isinstance(v, float) for v in test.values())
    assert result.flat_metrics() == dict(zip(SCALARS, test.values(), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_evaluate_syncs_a_fixed_number_of_times_on_gpu() -> None:
    """No per-batch host syncs: 12 batches must sync exactly as often as 2."""
    images, labels = _tiny_split(48, 10, seed=2)
    model = _tiny_model(10).cuda()

    def syncs(batch_size: int) -> int:
        loader = DeviceLoader(images, labels, batch_size, mean=[0.5] * 3, std=[0.25] * 3, device="cuda")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                evaluate(model, loader, 10, device="cuda")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    syncs(24)  # warm-up: CUDA, cuDNN and allocator set-up must not count
    assert syncs(4) == syncs(24)


# --------------------------------------------------------------------------- plots


def _perfect_result() -> EvalResult:
    labels = torch.tensor([0, 1, 2, 1])
    return evaluate(nn.Flatten(), [(F.one_hot(labels, 3).float() * 5, labels)], 3, device="cpu")


def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path} is not a PNG"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50


def test_misclassified_png_without_mistakes_still_written(tmp_path: Path) -> None:
    result = _perfect_result()
    assert len(result.misclassified_indices) == 0
    images = np.zeros((4, 8, 8, 3), dtype=np.uint8)
    plot_misclassified(tmp_path / "m.png", images, result, ["a", "b", "c"], limit=36)
    _assert_png(tmp_path / "m.png")


def test_misclassified_png_grayscale_and_confusion_png(tmp_path: Path) -> None:
    logits, labels = _known_logits()
    result = evaluate(nn.Flatten(), [(logits, labels)], 6, device="cpu")
    images, _ = _tiny_split(6, 6, seed=3, channels=1)
    classes = [f"class{i}" for i in range(6)]
    plot_misclassified(tmp_path / "m.png", images, result, classes, limit=3)
    plot_confusion_matrix(tmp_path / "c.png", result.confusion, classes, title="accuracy 33%")
    _assert_png(tmp_path / "m.png")
    _assert_png(tmp_path / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "m.png"], "temp files left behind"
    with pytest.raises(ValueError, match="4 images for a result over 6"):
        plot_misclassified(tmp_path / "x.png", images[:4], result, classes, limit=3)
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- the stages

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog"]
N_VAL, N_TEST = 14, 23


def _checkpoint_state(
    classes: list[str], seed: int, epoch: int, run_id: str | None = None, tta: str | None = None
) -> dict:
    """A tiny model's checkpoint; ``run_id``: the MLflow run the train stage would record in it;
    ``tta`` None: no model.tta, as checkpoints older than it."""
    model = _tiny_model(len(classes), seed=seed)
    return {
        **({"extra": {"run_id": run_id}} if run_id else {}),
        "arch": {
            "name": "resnet20",
            "num_classes": len(classes),
            "in_channels": 3,
            "options": {"width_multiplier": 0.25},
            **({"tta": tta} if tta else {}),
        },
        "model": model.state_dict(),
        "classes": list(classes),
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "image_size": [8, 8],
        "params": {},
        "epoch": epoch,
    }


def _stage_params(validate_ckpt: str = "best", evaluate_ckpt: str = "best", misclassified: int = 9) -> dict:
    """The repository's params.yaml, for the CPU and the tiny checkpoints, as a plain mapping."""
    return dataclasses.asdict(
        repo_params(
            {
                "train.device": "cpu",
                "validate.checkpoint": validate_ckpt,
                "validate.batch_size": 5,
                "evaluate.checkpoint": evaluate_ckpt,
                "evaluate.batch_size": 5,
                "evaluate.misclassified_examples": misclassified,
            }
        )
    )


def _write_params(validate_ckpt: str = "best", evaluate_ckpt: str = "best", misclassified: int = 9) -> None:
    paths.PARAMS.write_text(yaml.safe_dump(_stage_params(validate_ckpt, evaluate_ckpt, misclassified)))


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository-shaped temp dir: params.yaml, data/prepared, models/{best,last}.pt."""
    monkeypatch.chdir(tmp_path)
    _write_params()
    prepared = tmp_path / paths.PREPARED
    prepared.mkdir(parents=True)
    counts = {}
    for seed, (split, n) in enumerate({"train": 12, "val": N_VAL, "test": N_TEST}.items()):
        images, labels = _tiny_split(n, len(CLASSES), seed=10 + seed)
        np.savez(prepared / f"{split}.npz", images=images, labels=labels)
        counts[split] = {c: int((labels == i).sum()) for i, c in enumerate(CLASSES)}
    meta = {
        "classes": CLASSES,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "image_size": [8, 8],
        "channels": 3,
        "counts": counts,
        "source": "synthetic",
        "source_sha256": "0" * 64,
    }
    (tmp_path / paths.META).write_text(json.dumps(meta))
    # The MLflow run the train stage would have created, in a SQLite store in tmp_path.
    subprocess.run(["git", "init", "-q"], check=True)
    with tracking.start_run(repo_params(), meta, "cpu", paths.RUN_FILE) as run:
        pass
    save_checkpoint(tmp_path / paths.BEST_CHECKPOINT, _checkpoint_state(CLASSES, 0, 3, run.run_id))
    save_checkpoint(tmp_path / paths.LAST_CHECKPOINT, _checkpoint_state(CLASSES, 1, 5, run.run_id))
    return tmp_path


def workspace_run_id() -> str:
    """The MLflow run of the ``workspace`` fixture (models/run.json's)."""
    return json.loads(paths.RUN_FILE.read_text())["run_id"]


def _run_data() -> mlflow.entities.RunData:
    run_id = json.loads(paths.RUN_FILE.read_text())["run_id"]
    return mlflow.get_run(run_id).data


def _stage(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import stages/<name>.py as a module; its main() then runs in-process (fast)."""
    spec = importlib.util.spec_from_file_location(f"_stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _declared_outputs(stage: str) -> list[Path]:
    """The metrics and plots dvc.yaml declares for a stage."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    entries = spec.get("metrics", []) + spec.get("plots", []) + spec.get("outs", [])
    return [Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries]


def _output_files(root: Path) -> list[Path]:
    return sorted(p for d in ("metrics", "plots") for p in (root / d).rglob("*") if p.is_file())


def _labels(split: str) -> np.ndarray:
    with np.load(paths.PREPARED / f"{split}.npz") as f:
        return f["labels"]


def _check_confusion_csv(path: Path, split: str) -> pd.DataFrame:
    frame = pd.read_csv(path)
    labels = _labels(split)
    assert list(frame.columns) == ["actual", "predicted"]
    assert len(frame) == len(labels)
    assert list(frame["actual"]) == [CLASSES[i] for i in labels]
    assert set(frame["predicted"]) <= set(CLASSES)
    return frame


@pytest.mark.parametrize(("choice", "epoch"), [("best", 3), ("last", 5)])
def test_validate_stage(workspace: Path, monkeypatch: pytest.MonkeyPatch, choice: str, epoch: int) -> None:
    _write_params(validate_ckpt=choice)
    assert _stage("validate", monkeypatch).main() == 0

    for path in _declared_outputs("validate"):
        assert path.is_file(), f"dvc.yaml declares {path} but the stage did not write it"
    metrics = json.loads(paths.VAL_METRICS.read_text())
    assert list(metrics) == [
        f"val_{k}"
        for k in (*SCALARS, "checkpoint", "checkpoint_epoch", "tta", "num_images", "num_classes", "chance_accuracy")
    ]
    # The commonest class's share of the split: what a model that learned nothing scores.
    _, labels = load_split(paths.PREPARED, "val")
    assert metrics["val_chance_accuracy"] == pytest.approx(np.bincount(labels).max() / len(labels))
    assert metrics["val_checkpoint"] == f"models/{choice}.pt"
    assert metrics["val_checkpoint_epoch"] == epoch
    assert metrics["val_tta"] == "none"  # a checkpoint without model.tta predicts without test-time augmentation
    assert metrics["val_num_images"] == N_VAL
    per_class = pd.read_csv(paths.VAL_PER_CLASS)
    assert list(per_class["class"]) == CLASSES and per_class["support"].sum() == N_VAL

    # Logged to the pipeline's MLflow run under the same names, once; the string as a tag.
    run_id = json.loads(paths.RUN_FILE.read_text())["run_id"]
    history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(0, metrics["val_accuracy"])]
    assert _run_data().tags["val_checkpoint"] == metrics["val_checkpoint"]
    assert _run_data().tags["val_tta"] == "none"

    frame = _check_confusion_csv(paths.VAL_CONFUSION, "val")
    # The metrics file and the plot data must tell the same story.
    assert metrics["val_accuracy"] == pytest.approx((frame["actual"] == frame["predicted"]).mean())
    assert 0.0 <= metrics["val_accuracy"] <= metrics["val_top5_accuracy"] <= 1.0


def test_evaluate_stage_writes_every_declared_output(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _stage("evaluate", monkeypatch).main() == 0

    declared = _declared_outputs("evaluate")
    for path in declared:
        assert path.is_file(), f"dvc.yaml declares {path} but the stage did not write it"
    assert _output_files(workspace) == sorted(workspace / p for p in declared), "undeclared or temp files"

    metrics = json.loads(paths.TEST_METRICS.read_text())
    assert list(metrics)[: len(SCALARS)] == [f"test_{k}" for k in SCALARS]
    assert 0.0 <= metrics["test_accuracy"] <= metrics["test_top5_accuracy"] <= 1.0
    assert metrics["test_loss"] > 0
    assert metrics["test_num_images"] == N_TEST and metrics["test_checkpoint_epoch"] == 3

    frame = _check_confusion_csv(paths.TEST_CONFUSION, "test")
    assert metrics["test_accuracy"] == pytest.approx((frame["actual"] == frame["predicted"]).mean())

    per_class = pd.read_csv(paths.TEST_PER_CLASS)
    assert list(per_class.columns) == ["class", "precision", "recall", "f1", "support", "accuracy"]
    assert list(per_class["class"]) == CLASSES
    assert per_class["support"].sum() == N_TEST
    np.testing.assert_allclose(per_class["accuracy"], per_class["recall"])
    assert metrics["test_macro_f1"] == pytest.approx(per_class["f1"].mean())

    _assert_png(paths.TEST_CONFUSION_PNG)
    _assert_png(paths.TEST_MISCLASSIFIED_PNG)

    run = _run_data()
    assert run.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    run_id = json.loads(paths.RUN_FILE.read_text())["run_id"]
    logged = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run_id, "test")}
    assert logged == {f"test/{p.name}" for p in declared}


def test_evaluate_stage_predicts_with_the_checkpoints_tta(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _checkpoint_state(CLASSES, 0, 3, workspace_run_id(), tta="flip_translate")
    save_checkpoint(paths.BEST_CHECKPOINT, state)
    assert _stage("evaluate", monkeypatch).main() == 0
    metrics = json.loads(paths.TEST_METRICS.read_text())
    assert metrics["test_tta"] == "flip_translate"

    # The figures of evaluate() with the checkpoint's TTA, not those of the plain logits.
    model = _tiny_model(len(CLASSES), seed=0)
    model.load_state_dict(state["model"])
    images, labels = load_split(paths.PREPARED, "test")
    loader = DeviceLoader(images, labels, 7, mean=state["mean"], std=state["std"])
    with_tta = evaluate(model, loader, len(CLASSES), tta="flip_translate")
    plain = evaluate(model, loader, len(CLASSES))
    assert metrics["test_loss"] == pytest.approx(with_tta.loss, rel=1e-6)
    assert metrics["test_loss"] != pytest.approx(plain.loss, rel=1e-6)
    assert metrics["test_accuracy"] == with_tta.accuracy


def test_val_and_test_metrics_have_the_same_names(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _stage("validate", monkeypatch).main() == 0
    assert _stage("evaluate", monkeypatch).main() == 0
    val = json.loads(paths.VAL_METRICS.read_text())
    test = json.loads(paths.TEST_METRICS.read_text())
    assert [k.removeprefix("val_") for k in val] == [k.removeprefix("test_") for k in test]


@pytest.mark.parametrize("stage", ["validate", "evaluate"])
def test_mismatched_classes_fail_clearly(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, stage: str
) -> None:
    other = ["apple", "pear", "plum", "fig", "kiwi", "lime"]
    save_checkpoint(paths.BEST_CHECKPOINT, _checkpoint_state(other, 0, 3, workspace_run_id()))
    assert _stage(stage, monkeypatch).main() == 1
    message = caplog.text
    assert "models/best.pt was trained on classes" in message
    assert "'apple'" in message and "'plane'" in message and "data/prepared/meta.json" in message
    assert "dvc repro train" in message
    assert _output_files(workspace) == []


def test_bad_params_fail_clearly(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _stage_params()
    raw["evaluate"]["checkpoint"] = "newest"
    paths.PARAMS.write_text(yaml.safe_dump(raw))
    assert _stage("evaluate", monkeypatch).main() == 1
    assert "evaluate.checkpoint: 'newest' is not allowed" in caplog.text
    assert _output_files(workspace) == []


def test_truncated_checkpoint_fails_clearly_from_the_command_line(workspace: Path) -> None:
    """The real CLI: exit status 1, the CheckpointError message on stderr, no outputs."""
    best = paths.BEST_CHECKPOINT
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "evaluate.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "checkpoint models/best.pt is corrupt or truncated" in proc.stderr
    assert "dvc repro train" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _output_files(workspace) == []


def test_missing_split_fails_clearly(
    workspace: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (paths.PREPARED / "val.npz").unlink()
    assert _stage("validate", monkeypatch).main() == 1
    assert "data/prepared/val.npz not found" in caplog.text
    assert _output_files(workspace) == []
