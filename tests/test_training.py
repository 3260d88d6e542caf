"""The training loop and the train stage, on tiny models and tiny synthetic data.

The task: four classes, one per image quadrant; the class's quadrant is bright. A
ResNet learns it in a few epochs, so "training works" is testable in seconds.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import torchvision
import yaml
from paramsets import repo_params, section_changes
from torch import nn

from resnet import evaluation, optim, paths, resume, runtime, training
from resnet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from resnet.config import ConfigError, Params, override
from resnet.epoch import train_one_epoch
from resnet.loader import DeviceLoader
from resnet.optim import build_optimizer, build_scheduler
from resnet.parts import create_model
from resnet.resume import TrainState, find_resume_checkpoint, rng_state, set_rng_state
from resnet.runtime import configure_torch, cpu_info, native_bf16, resolve_precision
from resnet.split_evaluation import trained_with
from resnet.training import (
    HISTORY_FIELDS,
    EarlyStopping,
    TrainingError,
    fit,
)
from resnet.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "train.py"
#: The model keys tests pin, so that they do not follow params.yaml's default model; a test's model dict changes them.
PINNED_MODEL = {"width_multiplier": 1.0, "stem": None, "tta": "none"}
TINY_MODEL = {"name": "resnet20", "width_multiplier": 0.25}
#: The tests' changes to params.yaml's recipe (pinned, so they do not follow the default recipe): tiny batches,
#: plain SGD settings, validation every epoch, no augmentation, no label smoothing, one thread, fp32, and NCHW
#: (the tiny model's 4- and 8-channel 1x1 stride-2 convolutions refuse channels_last on CPU).
TEST_RECIPE = {
    "epochs": 2,
    "batch_size": 32,
    "lr": 0.05,
    "schedule": "cosine",
    "warmup_epochs": 0,
    "momentum": 0.9,
    "norm_bias_lr_scale": 1.0,
    "eval_every": 1,
    "num_threads": 1,
    "label_smoothing": 0.0,
    "channels_last": False,
    "augment": {"crop_padding": 0, "flip": False, "cutout": 0},
    # Not auto, which picks bf16 on CPUs with native bf16: the tests' numbers must not depend on the machine.
    "precision": "fp32",
}
CLASSES = ["top-left", "top-right", "bottom-left", "bottom-right"]


@pytest.fixture(autouse=True)
def one_thread():
    """One CPU thread: on a shared 2-core machine two OpenMP threads can run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


def quadrant_task(n: int, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, size, size, 3) noise with the labelled quadrant brightened by 150."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 100, (n, size, size, 3)).astype(np.uint8)
    h = size // 2
    for i, c in enumerate(labels):
        r, col = divmod(int(c), 2)
        images[i, r * h : (r + 1) * h, col * h : (col + 1) * h] += 150
    return images, labels.astype(np.int64)


def make_meta(size: int = 16, counts: dict | None = None) -> dict[str, Any]:
    return {
        "classes": CLASSES,
        "mean": [0.33, 0.33, 0.33],
        "std": [0.3, 0.3, 0.3],
        "image_size": [size, size],
        "channels": 3,
        "counts": counts or {"train": 128, "val": 64},
        "source": "synthetic",
        "source_sha256": "0" * 64,
    }


def make_params(model: dict | None = None, **train: Any) -> Params:
    """params.yaml with a tiny model (or `model`'s keys) and TEST_RECIPE, which `train` changes further."""
    return repo_params(
        {
            **section_changes("model", {**PINNED_MODEL, **(model or TINY_MODEL)}),
            **section_changes("train", {**TEST_RECIPE, **train}),
        }
    )


def make_loaders(
    params: Params,
    meta: dict,
    n_train: int = 128,
    n_val: int = 64,
    size: int = 16,
    std: list[float] | None = None,
    device: str = "cpu",
) -> tuple[DeviceLoader, DeviceLoader]:
    tp = params.train
    norm = {"mean": meta["mean"], "std": std or meta["std"], "channels_last": tp.channels_last, "device": device}
    train = DeviceLoader(
        *quadrant_task(n_train, size, seed=1), tp.batch_size, train=True, augment=tp.augment, seed=tp.seed, **norm
    )
    val = DeviceLoader(*quadrant_task(n_val, size, seed=2), 64, **norm)
    return train, val


def interrupt_after(n: int):
    """An on_epoch callback that plays Ctrl-C after epoch n."""

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == n:
            raise KeyboardInterrupt

    return on_epoch


def load_stage_module(name: str = "train"):
    """stages/<name>.py as a module, imported now (so monkeypatches made before it apply to its imports)."""
    spec = importlib.util.spec_from_file_location(f"{name}_stage", ROOT / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_stage_inputs(
    root: Path, train: dict, n_train: int = 128, n_val: int = 64, size: int = 16, changes: dict | None = None
) -> None:
    """params.yaml and data/prepared/ as the split stage writes them.

    params.yaml is the tests' tiny CPU recipe with the dotted `changes` (validated), then
    the `train` keys written as they are (unvalidated, so a bad value reaches the stage).
    """
    prepared = root / paths.PREPARED
    prepared.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        images, labels = quadrant_task(n, size, seed)
        np.savez(prepared / f"{split}.npz", images=images, labels=labels)
    (root / paths.META).write_text(json.dumps(make_meta(size, {"train": n_train, "val": n_val})))
    params = override(make_params(device="cpu", augment={"crop_padding": 2, "flip": True, "cutout": 0}), changes or {})
    raw = dataclasses.asdict(params)
    raw["train"].update(train)
    (root / paths.PARAMS).write_text(yaml.safe_dump(raw))


# ----------------------------------------------------------------------------- learning


def test_fit_learns_the_quadrant_task(tmp_path: Path) -> None:
    params = make_params(epochs=3, batch_size=16, lr=0.05, schedule="onecycle")
    meta = make_meta()
    train, val = make_loaders(params, meta, n_train=256)
    seen: list[tuple[int, dict]] = []
    result = fit(params, meta, train, val, tmp_path, extra={"run_id": "abc"}, on_epoch=lambda e, m: seen.append((e, m)))

    assert result.best_metric > 0.6  # chance is 0.25
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert [e for e, _ in seen] == [1, 2, 3] and result.epochs_completed == 3 and not result.stopped_early
    assert all(tuple(m) == HISTORY_FIELDS for _, m in seen)
    assert all(math.isfinite(v) for _, m in seen for v in m.values())

    # Both checkpoints load with weights_only=True and rebuild the network.
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == result.best_epoch and last["epoch"] == 3
    assert last["extra"] == {"run_id": "abc", "resumed_from": None} and last["classes"] == CLASSES
    assert last["arch"] == {
        "name": "resnet20",
        "num_classes": 4,
        "in_channels": 3,
        "options": params.model.build_options(),
        "tta": "none",
    }
    assert last["params"] == dataclasses.asdict(params) and len(last["history"]) == 3
    model = model_from_checkpoint(last)
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# ----------------------------------------------------------------------------- optimizers and schedules


def lr_curve(tp_params: Params, steps_per_epoch: int) -> list[float]:
    tp = tp_params.train
    opt = build_optimizer(nn.Linear(2, 2), tp)
    sched = build_scheduler(opt, tp, steps_per_epoch)
    lrs = []
    for _ in range(tp.epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_warms_up_from_a_tenth_then_decays_to_near_zero() -> None:
    lrs = lr_curve(make_params(epochs=4, lr=0.2, schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.02)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rises through the warm-up
    assert lrs[10] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))
    assert lrs[-1] < 0.01 * 0.2


def test_multistep_drops_by_gamma_at_each_milestone() -> None:
    lrs = lr_curve(make_params(epochs=4, lr=0.1, schedule="multistep", milestones=[2, 3], gamma=0.1), steps_per_epoch=5)
    assert lrs[:10] == pytest.approx([0.1] * 10)
    assert lrs[10:15] == pytest.approx([0.01] * 5)
    assert lrs[15:] == pytest.approx([0.001] * 5)


def test_constant_with_warmup() -> None:
    lrs = lr_curve(make_params(epochs=3, lr=0.1, schedule="constant", warmup_epochs=0.5), steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.01) and lrs[4] < 0.1
    assert lrs[5:] == pytest.approx([0.1] * 25)


def test_onecycle_peaks_at_lr() -> None:
    lrs = lr_curve(make_params(epochs=5, lr=0.4, schedule="onecycle"), steps_per_epoch=20)
    peak = max(lrs)
    assert peak == pytest.approx(0.4, rel=1e-3)
    assert 20 <= lrs.index(peak) <= 40  # pct_start 0.3 of 100 steps
    assert lrs[0] == pytest.approx(0.4 / 25) and lrs[-1] < 0.4 * 1e-3


@pytest.mark.parametrize(
    "schedule,extra",
    [("onecycle", {}), ("cosine", {"warmup_epochs": 1}), ("multistep", {"milestones": [2]}), ("constant", {})],
)
def test_schedule_state_resumes_exactly_through_weights_only_load(tmp_path: Path, schedule: str, extra: dict) -> None:
    tp = make_params(epochs=3, lr=0.1, schedule=schedule, **extra).train
    whole = lr_curve(make_params(epochs=3, lr=0.1, schedule=schedule, **extra), steps_per_epoch=8)
    opt = build_optimizer(nn.Linear(2, 2), tp)
    sched = build_scheduler(opt, tp, 8)
    for _ in range(11):
        opt.step()
        sched.step()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    opt2 = build_optimizer(nn.Linear(2, 2), tp)
    sched2 = build_scheduler(opt2, tp, 8)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    rest = []
    for _ in range(24 - 11):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert rest == whole[11:]


def test_sgd_and_adamw_build_and_step() -> None:
    model = nn.Linear(3, 2)
    sgd = build_optimizer(model, make_params(optimizer="sgd", momentum=0.9, nesterov=True).train)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.9
    adamw = build_optimizer(model, make_params(optimizer="adamw", lr=1e-3, weight_decay=0.05).train)
    assert isinstance(adamw, torch.optim.AdamW)
    before = model.weight.detach().clone()
    model(torch.randn(4, 3)).sum().backward()
    adamw.step()
    assert not torch.equal(before, model.weight)


@pytest.mark.parametrize("no_decay", [True, False])
def test_weight_decay_skips_norm_and_bias_when_asked(no_decay: bool) -> None:
    params = make_params(weight_decay=5e-4, no_decay_norm_bias=no_decay)
    model = create_model(params, make_meta())
    opt = build_optimizer(model, params.train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed | undecayed == set(names.values())
    if no_decay:
        assert "fc.bias" in undecayed and "bn1.weight" in undecayed and "layer1.0.bn2.bias" in undecayed
        assert decayed == {n for n, p in model.named_parameters() if p.ndim > 1}
    else:
        assert not undecayed


# ----------------------------------------------------------------------------- resuming


def test_interrupted_then_resumed_run_equals_uninterrupted_bitwise(tmp_path: Path) -> None:
    params = make_params(
        epochs=3,
        schedule="cosine",
        warmup_epochs=1,
        label_smoothing=0.1,
        grad_clip=2.0,
        augment={"crop_padding": 2, "flip": True, "cutout": 4},
    )
    meta = make_meta()
    whole = fit(params, meta, *make_loaders(params, meta), tmp_path / "a")

    with pytest.raises(KeyboardInterrupt):
        fit(
            params,
            meta,
            *make_loaders(params, meta),
            tmp_path / "b",
            extra={"run_id": "r1"},
            on_epoch=interrupt_after(1),
        )
    resume = find_resume_checkpoint(params, meta, tmp_path / "b")
    assert resume is not None and resume["epoch"] == 1 and resume["extra"] == {"run_id": "r1", "resumed_from": None}
    torch.manual_seed(1234)  # a new process starts with other RNG states; the checkpoint restores them
    resumed = fit(params, meta, *make_loaders(params, meta), tmp_path / "b", resume=resume)

    assert resumed.resumed_from == 1 and resumed.epochs_completed == 3
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resuming"

    def drop_time(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in m.items() if k not in ("images_per_sec", "epoch_seconds")} for m in history]

    assert drop_time(whole.history) == drop_time(resumed.history)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["extra"] == {"run_id": "r1", "resumed_from": 1}


def test_rng_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    seed_everything(7)
    torch.save({"rng": rng_state()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    seed_everything(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_truncated_last_pt_is_a_clear_error_not_a_fresh_start(tmp_path: Path) -> None:
    params, meta = make_params(epochs=2), make_meta()
    with pytest.raises(KeyboardInterrupt):
        fit(params, meta, *make_loaders(params, meta), tmp_path, on_epoch=interrupt_after(1))
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        find_resume_checkpoint(params, meta, tmp_path)
    assert str(last) in str(err.value) and "delete it" in str(err.value)


def test_finished_or_mismatched_last_pt_means_a_fresh_start(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="resnet.resume")
    params, meta = make_params(epochs=2), make_meta()
    with pytest.raises(KeyboardInterrupt):
        fit(params, meta, *make_loaders(params, meta), tmp_path, on_epoch=interrupt_after(1))
    assert find_resume_checkpoint(params, meta, tmp_path)["epoch"] == 1
    assert "resuming from" in caplog.text
    # Where and how fast to run is not part of the recipe: a resume survives changing it.
    assert find_resume_checkpoint(make_params(epochs=2, num_threads=2, device="cpu"), meta, tmp_path) is not None

    caplog.clear()
    assert find_resume_checkpoint(make_params(epochs=2, lr=0.01), meta, tmp_path) is None
    assert "starting fresh" in caplog.text and "train.lr: 0.05 -> 0.01" in caplog.text
    caplog.clear()
    assert find_resume_checkpoint(params, make_meta(counts={"train": 999}), tmp_path) is None
    assert "prepared data" in caplog.text

    fit(params, meta, *make_loaders(params, meta), tmp_path)  # runs to the end
    caplog.clear()
    assert find_resume_checkpoint(params, meta, tmp_path) is None
    assert "finished run (epoch 2/2)" in caplog.text
    assert find_resume_checkpoint(params, meta, tmp_path / "nowhere") is None


def _stage_command() -> list[str]:
    return [sys.executable, str(STAGE)]


@pytest.mark.slow
def test_killed_stage_resumes_from_last_pt(tmp_path: Path) -> None:
    epochs = 40  # ~0.1 s each: a wide window to kill it in
    write_stage_inputs(tmp_path, {"epochs": epochs})
    env = {**os.environ, "RESNET_NO_PROGRESS": "1"}
    proc = subprocess.Popen(
        _stage_command(), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    last, killed_at = tmp_path / "models" / "last.pt", None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists():
                epoch = torch.load(last, weights_only=True)["epoch"]  # atomic writes: never half a file
                if epoch >= 1:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = epoch
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert killed_at is not None and killed_at < epochs, "the stage finished before it could be killed"
    assert not (tmp_path / "metrics" / "train.json").exists()

    rerun = subprocess.run(_stage_command(), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    history = load_checkpoint(last)["history"]  # the resumed run kept the first run's epochs
    assert "resuming from models/last.pt at epoch" in rerun.stderr
    summary = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert summary["epochs_completed"] == epochs and len(history) == epochs
    assert summary["resumed_from_epoch"] >= killed_at
    rows = (tmp_path / "plots" / "train" / "history.csv").read_text().splitlines()
    assert len(rows) == epochs + 1


# ----------------------------------------------------------------------------- failures and stopping


@pytest.mark.parametrize("cause", ["huge_lr", "poisoned_input"])
def test_non_finite_loss_raises_training_error(tmp_path: Path, cause: str) -> None:
    meta = make_meta()
    if cause == "huge_lr":
        params = make_params(epochs=2, lr=1e6, schedule="constant")
        loaders = make_loaders(params, meta)
    else:
        params = make_params(epochs=2)
        loaders = make_loaders(params, meta, std=[0.3, 0.0, 0.3])  # x / 0: inf and NaN inputs
    with pytest.raises(TrainingError, match=r"epoch 1, step \d+ of 4.*train\.lr.*train\.grad_clip"):
        fit(params, meta, *loaders, tmp_path)
    assert not (tmp_path / "last.pt").exists()  # a diverged epoch is never checkpointed


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count host reads of tensors (.item(), bool(), float(), int(), .tolist()) until monkeypatch.undo()."""
    reads = {"n": 0}
    for name in ("item", "__bool__", "__float__", "__int__", "tolist"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            reads["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return reads


def test_train_loop_does_not_sync_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host reads (.item(), bool(), float(), int()) happen a handful of times per epoch, not per batch."""
    params, meta = make_params(batch_size=4, grad_clip=1.0), make_meta(size=8)
    loader = DeviceLoader(*quadrant_task(240, 8), 4, mean=meta["mean"], std=meta["std"], train=True)
    model = create_model(params, meta)
    model.train()
    opt = build_optimizer(model, params.train)
    sched = build_scheduler(opt, params.train, len(loader))
    reads = count_host_reads(monkeypatch)
    out = train_one_epoch(
        model, loader, opt, sched, torch.amp.GradScaler("cpu", enabled=False), nn.CrossEntropyLoss(), grad_clip=1.0
    )
    monkeypatch.undo()
    assert len(loader) == 60 and out["images"] == 240
    assert reads["n"] <= 6, f"{reads['n']} host reads in 60 steps"


def test_early_stopping_stops_when_patience_runs_out(tmp_path: Path) -> None:
    # Four validation images: accuracy can rise strictly at most 4 times, so with
    # patience 2 the run must stop well before 20 epochs.
    params, meta = make_params(epochs=20, early_stopping_patience=2, lr=0.2), make_meta()
    train, _ = make_loaders(params, meta)
    val = DeviceLoader(*quadrant_task(4, 16, seed=3), 4, mean=meta["mean"], std=meta["std"])
    calls: list[int] = []
    result = fit(params, meta, train, val, tmp_path, on_epoch=lambda e, m: calls.append(e))
    assert result.stopped_early and result.epochs_completed < 20
    assert calls == list(range(1, result.epochs_completed + 1))
    assert result.best_epoch == result.epochs_completed - 2
    best = result.history[result.best_epoch - 1]["val_accuracy"]
    assert all(h["val_accuracy"] <= best for h in result.history[result.best_epoch :])
    assert load_checkpoint(tmp_path / "last.pt")["stopped_early"]
    assert find_resume_checkpoint(params, meta, tmp_path) is None  # a stopped run is finished


def test_eval_every_validates_on_schedule_and_after_the_last_epoch(tmp_path: Path) -> None:
    params, meta = make_params(epochs=3, eval_every=2), make_meta()
    result = fit(params, meta, *make_loaders(params, meta), tmp_path)
    assert ["val_accuracy" in h for h in result.history] == [False, True, True]


# ----------------------------------------------------------------------------- one evaluation


def test_training_has_no_evaluation_of_its_own() -> None:
    """fit validates with resnet.evaluation.evaluate, the function the validate stage runs."""
    assert training.evaluate is evaluation.evaluate
    for module in (training, resume, optim, runtime):
        defined = [
            n.name
            for n in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and "evaluat" in n.name
        ]
        assert not defined, f"{module.__name__} defines its own evaluation: {defined}"


def test_train_json_and_val_json_agree_exactly_for_the_same_checkpoint(tmp_path, monkeypatch) -> None:
    """The validate stage reproduces, to the last bit, the validation numbers training recorded for a checkpoint.

    Channels-last training (shortcut A: no narrow 1x1 projections) and several validation
    batches: an evaluation in another memory format, or summing the loss in float32, shows.
    """
    changes = {"model.shortcut": "A", "train.channels_last": True, "validate.batch_size": 32}
    write_stage_inputs(tmp_path, {"epochs": 3, "lr": 0.2}, n_val=100, changes=changes)
    monkeypatch.chdir(tmp_path)
    assert load_stage_module("train").main() == 0
    train = json.loads(paths.TRAIN_METRICS.read_text())
    raw = yaml.safe_load(paths.PARAMS.read_text())
    for which, prefix in (("best", "best"), ("last", "final")):
        raw["validate"]["checkpoint"] = which
        paths.PARAMS.write_text(yaml.safe_dump(raw))
        assert load_stage_module("validate").main() == 0
        val = json.loads(paths.VAL_METRICS.read_text())
        assert val["val_checkpoint"] == str(paths.CHECKPOINTS[which])
        assert (val["val_loss"], val["val_accuracy"]) == (train[f"{prefix}_val_loss"], train[f"{prefix}_val_accuracy"])


def test_configure_torch_leaves_process_wide_memory_settings_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[bool] = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: called.append(True) or True)
    assert configure_torch(make_params(device="cpu").train) == torch.device("cpu")
    assert called == []


# ----------------------------------------------------------------------------- the run's state


def test_train_state_round_trips_through_a_weights_only_checkpoint(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.5, "train_accuracy": 0.25},
        {"epoch": 2, "train_loss": 1.25, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.625},
    ]
    state = TrainState(
        epoch=2,
        history=history,
        best_metric=0.625,
        best_epoch=2,
        bad_evals=0,
        stopped_early=False,
        extra={"run_id": "r1"},
    )
    torch.save(state.to_checkpoint(), tmp_path / "state.pt")
    assert TrainState.from_checkpoint(torch.load(tmp_path / "state.pt", weights_only=True)) == state
    assert set(state.to_checkpoint()) <= set(resume.RESUME_KEYS)  # find_resume_checkpoint asks for all of it


def test_early_stopping_keeps_the_best_and_stops_after_patience_bad_validations() -> None:
    stop, state = EarlyStopping("val_loss", patience=2), TrainState()
    assert stop.update(state, {"val_loss": 1.0, "val_accuracy": 0.1}, epoch=1)  # the first is the best so far
    assert not stop.update(state, {"val_loss": 1.0}, epoch=2)  # equal is not better
    assert stop.update(state, {"val_loss": 0.5}, epoch=3) and state.bad_evals == 0
    assert not stop.update(state, {"val_loss": 0.6}, epoch=4) and not state.stopped_early
    assert not stop.update(state, {"val_loss": 0.7}, epoch=5) and state.stopped_early
    assert (state.best_metric, state.best_epoch, state.bad_evals) == (0.5, 3, 2)

    never, state = EarlyStopping("val_accuracy", patience=0), TrainState()
    assert never.update(state, {"val_accuracy": 0.5}, epoch=1)
    assert not any(never.update(state, {"val_accuracy": 0.4}, epoch=e) for e in range(2, 20))
    assert not state.stopped_early and (state.best_metric, state.best_epoch) == (0.5, 1)
    assert EarlyStopping.from_params(make_params(early_stopping_patience=3).train) == EarlyStopping("val_accuracy", 3)


# ----------------------------------------------------------------------------- fine-tuning and paths


def test_finetune_from_torchvision_state_dict_with_frozen_backbone(tmp_path: Path) -> None:
    tv = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():  # distinctive BN statistics, to see that training leaves them alone
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    tv_state = tv.state_dict()
    model_cfg = {"name": "resnet18", "pretrained": str(tmp_path / "tv.pt")}
    meta = make_meta()

    # Without freezing: the backbone loads, the 4-class head is fresh, everything trains.
    params = make_params(model=model_cfg, batch_size=16)
    model = create_model(params, meta)
    assert torch.equal(model.conv1.weight, tv_state["conv1.weight"]) and model.fc.out_features == 4
    assert len(build_optimizer(model, params.train).param_groups[0]["params"]) > 2

    frozen = make_params(model={**model_cfg, "freeze_backbone": True}, epochs=1, batch_size=16, lr=0.1)
    seed_everything(frozen.train.seed)
    initial_fc = create_model(frozen, meta).fc.weight.detach().clone()
    opt = build_optimizer(create_model(frozen, meta), frozen.train)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2  # fc.weight and fc.bias only
    result = fit(frozen, meta, *make_loaders(frozen, meta, n_train=64), tmp_path / "out")
    after = result.model.state_dict()
    for k, v in tv_state.items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), f"frozen {k} changed"
    assert not torch.equal(after["fc.weight"], initial_fc)


def test_channels_last_and_grad_clip_paths_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clipped: list[float] = []
    original = nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        nn.utils,
        "clip_grad_norm_",
        lambda params, max_norm, **kw: clipped.append(max_norm) or original(params, max_norm, **kw),
    )
    # Shortcut A: no 1x1 stride-2 convolution, which oneDNN mishandles in NHWC at this width (below).
    params = make_params(model={**TINY_MODEL, "shortcut": "A"}, epochs=1, channels_last=True, grad_clip=0.5)
    meta = make_meta()
    result = fit(params, meta, *make_loaders(params, meta), tmp_path)
    assert clipped == [0.5] * 4
    assert result.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(result.history[0]["train_loss"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is for CPU training; train.device auto picks the GPU")
def test_params_refuse_nhwc_for_narrow_projection_shortcuts_on_cpu() -> None:
    # resnet20 x0.25 with shortcut B has 1x1 stride-2 convs with 4 and 8 input channels:
    # oneDNN's NHWC backward crashes the process or returns wrong gradients there. Loading the params refuses it.
    narrow = {**section_changes("model", TINY_MODEL), "train.channels_last": False}
    with pytest.raises(ConfigError, match=r"train\.channels_last.*layer2\.0\.downsample\.0.*oneDNN"):
        repo_params({**narrow, "train.channels_last": True})
    with pytest.raises(ConfigError, match=r"train\.compile.*oneDNN"):  # inductor picks NHWC for convolutions on CPU
        repo_params({**narrow, "train.compile": True})
    repo_params({**narrow, "train.channels_last": True, "model.shortcut": "A"})  # no 1x1 projections: fine
    repo_params({"model.name": "resnet20", "model.width_multiplier": 1.0, "train.channels_last": True})  # 16: fine


def test_params_refuse_nesterov_without_momentum_and_cuda_without_a_gpu() -> None:
    with pytest.raises(ConfigError, match=r"train\.nesterov.*momentum"):
        make_params(momentum=0.0, nesterov=True)
    make_params(momentum=0.0, nesterov=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"train\.device: 'cuda'.*'auto' or 'cpu'"):
            make_params(device="cuda")


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni {extra}
processor\t: 1
model name\t: AMD EPYC 9R14 96-Core Processor
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512_vnni {extra}
"""


def test_cpu_info_reads_the_model_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(extra="avx512_bf16"))
    model, flags = cpu_info(path)
    assert model == "AMD EPYC 9R14 96-Core Processor" and {"avx2", "avx512_bf16"} <= flags and native_bf16(flags)
    path.write_text(CPUINFO.format(extra=""))
    assert not native_bf16(cpu_info(path)[1])
    path.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")  # ARM names them Features; no x86 bf16 flag
    assert cpu_info(path) == ("unknown", frozenset({"fp", "asimd", "bf16"}))
    assert cpu_info(tmp_path / "missing")[1] == frozenset()  # not Linux: no flags, so auto means fp32


@pytest.mark.parametrize(
    "flags,auto", [({"avx2", "amx_bf16"}, "bf16"), ({"avx2", "avx512_bf16"}, "bf16"), ({"avx2"}, "fp32")]
)
def test_precision_auto_takes_bf16_where_the_cpu_has_it(monkeypatch, caplog, flags: set, auto: str) -> None:
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("a CPU", frozenset(flags)))
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == auto
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for: honoured, emulated or not
    assert ("emulated" in caplog.text) == (auto == "fp32")
    assert resolve_precision("fp16", cpu) == "fp32" and "running in fp32" in caplog.text


def test_bf16_on_cpu_trains_under_autocast(tmp_path: Path, monkeypatch) -> None:
    params, meta = make_params(epochs=1, precision="bf16"), make_meta()
    dtypes = []
    monkeypatch.setattr(torch.nn.Conv2d, "forward", _recording_conv(dtypes))
    result = fit(params, meta, *make_loaders(params, meta), tmp_path)
    assert result.precision == "bf16" and math.isfinite(result.history[0]["train_loss"])
    assert torch.bfloat16 in dtypes  # the convolutions ran in bf16, not fp32
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert ckpt["precision"] == "bf16" and trained_with(ckpt, torch.device("cpu"))[0] == "bf16"


def test_auto_precision_is_stored_and_a_resume_on_another_cpu_says_so(tmp_path: Path, monkeypatch, caplog) -> None:
    params, meta = make_params(precision="auto"), make_meta()
    amx, avx2 = ("a CPU with AMX", frozenset({"avx2", "amx_bf16"})), ("an AVX2 CPU", frozenset({"avx2"}))
    monkeypatch.setattr(runtime, "cpu_info", lambda: amx)
    with pytest.raises(KeyboardInterrupt):
        fit(params, meta, *make_loaders(params, meta), tmp_path, on_epoch=interrupt_after(1))
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["precision"] == "bf16" and ckpt["params"]["train"]["precision"] == "auto"

    # Elsewhere, auto means fp32: validate and evaluate still compute as training did.
    monkeypatch.setattr(runtime, "cpu_info", lambda: avx2)
    assert trained_with(ckpt, torch.device("cpu"))[0] == "bf16"
    resumed = fit(
        params, meta, *make_loaders(params, meta), tmp_path, resume=find_resume_checkpoint(params, meta, tmp_path)
    )
    assert resumed.precision == "fp32" and resumed.epochs_completed == 2
    assert "the checkpoint was trained in bf16; it resumes in fp32 here (train.precision auto)" in caplog.text
    assert load_checkpoint(tmp_path / "last.pt")["precision"] == "fp32"

    # A finished training is not trained again: its result says what it was trained in.
    monkeypatch.setattr(runtime, "cpu_info", lambda: amx)
    done = fit(params, meta, *make_loaders(params, meta), tmp_path, resume=load_checkpoint(tmp_path / "last.pt"))
    assert done.precision == "fp32" and done.history == resumed.history


def _recording_conv(dtypes: list) -> Any:
    original = torch.nn.Conv2d.forward

    def forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        out = original(self, x)
        dtypes.append(out.dtype)
        return out

    return forward


@pytest.mark.slow
def test_torch_compile_path_trains(tmp_path: Path) -> None:
    params, meta = make_params(model={**TINY_MODEL, "shortcut": "A"}, epochs=1, compile=True), make_meta()
    result = fit(params, meta, *make_loaders(params, meta), tmp_path)
    assert math.isfinite(result.history[0]["train_loss"])
    assert all(not k.startswith("_orig_mod") for k in load_checkpoint(tmp_path / "last.pt")["model"])


# ----------------------------------------------------------------------------- the stage


def test_stage_writes_its_outputs_then_starts_fresh_after_a_finished_run(tmp_path, monkeypatch, caplog) -> None:
    write_stage_inputs(tmp_path, {"epochs": 2})
    monkeypatch.chdir(tmp_path)
    kept: list[bool] = []  # the process-wide malloc setting is the stage's to make, on CPU, once
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: kept.append(True) or True)
    stage = load_stage_module()
    caplog.set_level(logging.INFO)
    assert stage.main() == 0
    assert kept == [True]

    summary = json.loads(Path("metrics/train.json").read_text())
    assert summary["epochs_completed"] == 2 and summary["stopped_early"] is False
    assert summary["device"].startswith("cpu: ")  # as the run's device tag says it
    assert summary["precision"] == "fp32" and summary["cpu.flags"] == runtime.cpu_summary()["cpu.flags"]
    assert f"flags {summary['cpu.flags']})" in caplog.text  # the CPU, in the stage's log too
    assert 0 <= summary["best_val_accuracy"] <= 1 and summary["images_per_sec"] > 0
    rows = Path("plots/train/history.csv").read_text().splitlines()
    assert rows[0] == ",".join(HISTORY_FIELDS) and len(rows) == 3
    assert load_checkpoint("models/best.pt")["epoch"] == summary["best_epoch"]

    # One MLflow run, in the embedded store beside the repo, with the per-epoch curves.
    run_info = json.loads(Path("models/run.json").read_text())
    assert run_info["tracking_uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    extra = load_checkpoint("models/last.pt")["extra"]
    assert extra["run_id"] == run_info["run_id"] and len(extra["code"]) == 16
    client = mlflow.tracking.MlflowClient(run_info["tracking_uri"])
    assert [m.step for m in client.get_metric_history(run_info["run_id"], "epoch/train_loss")] == [1, 2]
    data = client.get_run(run_info["run_id"]).data
    assert data.metrics["best_val_accuracy"] == summary["best_val_accuracy"]
    assert data.tags["device"] == summary["device"]
    assert {k: data.tags[k] for k in ("precision", "cpu.flags")} == {k: summary[k] for k in ("precision", "cpu.flags")}
    assert data.params["train.precision"] == "fp32"  # what was asked for; the precision tag, what it resolved to

    # Run again (dvc repro -f, or a kill after training before DVC recorded it): nothing is trained
    # again, the outputs are the same and the MLflow run is the same one, FINISHED.
    before = {p: Path(p).read_bytes() for p in ("models/best.pt", "models/last.pt", "metrics/train.json")}
    caplog.clear()
    assert stage.main() == 0
    assert "holds the finished training of this recipe, data and code (epoch 2/2): not training again" in caplog.text
    assert "epoch 1/2" not in caplog.text
    assert {p: Path(p).read_bytes() for p in before} == before
    assert json.loads(Path("models/run.json").read_text())["run_id"] == run_info["run_id"]
    assert client.get_run(run_info["run_id"]).info.status == "FINISHED"

    # The same checkpoint from other code (the package changed since): trained afresh.
    ckpt = load_checkpoint("models/last.pt")
    ckpt["extra"]["code"] = "0" * 16
    save_checkpoint("models/last.pt", ckpt)
    caplog.clear()
    assert stage.main() == 0
    assert "finished run (epoch 2/2): starting fresh" in caplog.text


@pytest.mark.parametrize("bad,key", [({"lr": -1}, "train.lr"), ({"optimiser": "sgd"}, "optimiser")])
def test_stage_exits_1_naming_the_bad_key(tmp_path, monkeypatch, caplog, bad: dict, key: str) -> None:
    write_stage_inputs(tmp_path, bad)
    monkeypatch.chdir(tmp_path)
    stage = load_stage_module()
    assert stage.main() == 1
    assert key in caplog.text and "ERROR" in caplog.text


def test_stage_exits_1_when_the_prepared_data_is_missing(tmp_path, monkeypatch, caplog) -> None:
    write_stage_inputs(tmp_path, {})
    (tmp_path / "data" / "prepared" / "val.npz").unlink()
    monkeypatch.chdir(tmp_path)
    stage = load_stage_module()
    assert stage.main() == 1
    assert "val.npz not found" in caplog.text


def test_stage_reports_a_corrupt_last_pt(tmp_path, monkeypatch, caplog) -> None:
    write_stage_inputs(tmp_path, {"epochs": 2})
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "last.pt").write_bytes(b"PK\x03\x04 not really a zip")
    monkeypatch.chdir(tmp_path)
    stage = load_stage_module()
    assert stage.main() == 1
    assert "models/last.pt" in caplog.text and "delete it" in caplog.text


# ----------------------------------------------------------------------------- CPU speed


GLIBC_HEAP_PER_STEP = """
import ctypes, json, sys, torch
from resnet.runtime import keep_freed_memory

class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory()
steps = []
for _ in range(20):
    before = libc.mallinfo2()
    # An activation-sized block, above the largest glibc would ever keep by itself (32 MiB).
    x = torch.empty(64 * 2**20 // 4).fill_(1.0)
    alive = libc.mallinfo2()
    del x
    after = libc.mallinfo2()
    steps.append({"mmapped": alive.hblkhd - before.hblkhd, "heap_growth": alive.arena - before.arena,
                  "heap_returned_on_free": alive.arena - after.arena})
# Past the heap's top (larger than anything freed above): by default glibc trims it off on free.
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
top = libc.malloc(256 * 2**20)
before = libc.mallinfo2()
libc.free(top)
trimmed = before.arena - libc.mallinfo2().arena
print(json.dumps({"steps": steps, "trimmed_at_top": trimmed}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_activation_blocks_stay_in_a_bounded_heap_for_reuse_once_memory_is_kept() -> None:
    # glibc's own accounting (mallinfo2), not page-fault counts: those depend on the heap's
    # layout after `import torch`, which differs between machines (a few more warm-up steps
    # grow the heap on some), while where the block lives and that the heap stops growing do not.
    def heap_steps(mode: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", GLIBC_HEAP_PER_STEP, mode], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.splitlines()[-1])

    block = 64 * 2**20
    default = heap_steps("default")["steps"]
    if all(s["mmapped"] < block and s["heap_growth"] < block for s in default):
        pytest.skip(f"allocations do not go through glibc's malloc here (LD_PRELOAD={os.environ.get('LD_PRELOAD')!r})")
    # By default glibc maps the block on allocation and unmaps it on free, every step.
    assert all(s["mmapped"] >= block for s in default), default

    report = heap_steps("keep")
    kept = report["steps"]
    assert report["trimmed_at_top"] == 0, report  # not even memory at the heap's top goes back
    assert all(s["mmapped"] == 0 for s in kept), kept  # served from the heap
    assert kept[0]["heap_growth"] >= block * 0.9, kept  # (less what was free at the heap's top)
    assert all(s["heap_returned_on_free"] == 0 for s in kept), kept  # freed, but kept for reuse
    # The heap grows for a few warm-up steps (a block freed between live small chunks is
    # too small for the next aligned request) and then serves every step from freed memory.
    # How many varies from run to run (2 to 8 seen here, with the heap's layout after the
    # imports), so the bound is loose; what matters is that the growth stops.
    growing = [i for i, s in enumerate(kept) if s["heap_growth"] > 0]
    assert len(growing) <= 10 and not any(i >= 15 for i in growing), kept
