"""train.ema: the moving average of the weights (resnet.ema), by hand and through training, resuming and registering."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from test_training import (  # one_thread: test_training's autouse fixture, one CPU thread here too
    count_host_reads,
    interrupt_after,
    load_stage_module,
    make_loaders,
    make_meta,
    make_params,
    one_thread,  # noqa: F401
    quadrant_task,
    write_stage_inputs,
)
from torch import nn

from resnet import paths, resume, tracking
from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import ConfigError, Params, load_params, override
from resnet.ema import WeightAverage, checkpoint_weights, describe_weights, load_checkpoint_weights
from resnet.epoch import train_one_epoch
from resnet.evaluation import evaluate
from resnet.loader import DeviceLoader
from resnet.optim import build_optimizer, build_scheduler
from resnet.parts import create_model
from resnet.resume import find_resume_checkpoint, fingerprint
from resnet.training import fit


def recipe(**train: object) -> Params:
    """The tests' tiny recipe (tests/test_training.py), with no warm-up and a validation every epoch."""
    return make_params(**{"warmup_epochs": 0, "eval_every": 1, **train})


def ema_params(**ema: object) -> Params:
    """:func:`recipe` with train.ema on."""
    return recipe(ema={"decay": 0.9, "every": 1, "warmup": False, "lookahead": False, **ema})


# ----------------------------------------------------------------------------- the average by hand


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def floats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def train_step(model: nn.Module, seed: int) -> None:
    """A stand-in optimizer step: every weight and BatchNorm statistic moves, the batch counter counts."""
    gen = torch.Generator().manual_seed(seed)
    for v in model.state_dict().values():
        if v.is_floating_point():
            v.add_(torch.randn(v.shape, generator=gen))
        else:
            v.add_(1)


def test_two_updates_make_the_average_of_the_formula() -> None:
    model = tiny_net()
    ema = WeightAverage(model, decay=0.9)
    a0 = floats(model)
    train_step(model, 1)
    ema.step()
    w1 = floats(model)
    train_step(model, 2)
    ema.step()
    w2 = floats(model)
    got = ema.module.state_dict()
    for k in a0:  # parameters and BatchNorm's running mean and variance alike
        expected = 0.9 * (0.9 * a0[k] + 0.1 * w1[k]) + 0.1 * w2[k]
        torch.testing.assert_close(got[k], expected, msg=k)
        assert not torch.equal(got[k], w2[k]), k
    assert int(got["1.num_batches_tracked"]) == int(model.state_dict()["1.num_batches_tracked"]) == 2  # copied
    assert (ema.steps, ema.updates) == (2, 2)
    assert all(torch.equal(model.state_dict()[k], w2[k]) for k in w2)  # the training weights are left alone


def test_warmup_ramps_the_decay_so_the_first_average_is_mostly_the_trained_weights() -> None:
    model = tiny_net()
    ema = WeightAverage(model, decay=0.8, warmup=True)
    a0 = floats(model)
    decays = []
    for i in range(40):
        decays.append(ema.current_decay())
        train_step(model, i)
        ema.step()
        if i == 0:
            w1, got = floats(model), ema.module.state_dict()
            for k in a0:
                torch.testing.assert_close(got[k], 0.1 * a0[k] + 0.9 * w1[k], msg=k)
    assert decays[:3] == pytest.approx([1 / 10, 2 / 11, 3 / 12])
    # (1 + n) / (10 + n) rises until it reaches decay, at n = 35 for 0.8; then decay holds.
    assert all(a < b for a, b in zip(decays[:35], decays[1:36], strict=True))
    assert decays[34] < 0.8 and decays[35:] == [0.8] * 5
    assert WeightAverage(tiny_net(), decay=0.05, warmup=True).current_decay() == 0.05  # the lower of the two
    assert WeightAverage(tiny_net(), decay=0.8).current_decay() == 0.8  # no ramp without warmup


def test_every_updates_at_multiples_of_the_step_count_only() -> None:
    model = tiny_net()
    ema = WeightAverage(model, decay=0.5, every=3)
    a0 = floats(model)
    for i in range(2):
        train_step(model, i)
        ema.step()
        assert all(torch.equal(ema.module.state_dict()[k], a0[k]) for k in a0)  # steps 1, 2: no update
    train_step(model, 2)
    ema.step()
    w3 = floats(model)
    for k in a0:
        torch.testing.assert_close(ema.module.state_dict()[k], 0.5 * a0[k] + 0.5 * w3[k], msg=k)
    assert (ema.steps, ema.updates) == (3, 1)


def test_lookahead_copies_the_average_back_into_the_training_weights() -> None:
    model = tiny_net()
    ema = WeightAverage(model, decay=0.8, lookahead=True)
    a0 = floats(model)
    train_step(model, 1)
    w1 = floats(model)
    ema.step()
    live, avg = model.state_dict(), ema.module.state_dict()
    for k in a0:
        torch.testing.assert_close(avg[k], 0.8 * a0[k] + 0.2 * w1[k], msg=k)
        assert torch.equal(live[k], avg[k]), k  # training goes on from the average
    # The parameters stay the module's own tensors (the optimizer's), changed in place.
    assert model[0].weight.data_ptr() == live["0.weight"].data_ptr()


def test_checkpoint_holds_the_average_as_model_and_restores_both(tmp_path: Path) -> None:
    model = tiny_net()
    ema = WeightAverage(model, decay=0.9, every=2, warmup=True)
    for i in range(5):
        train_step(model, i)
        ema.step()
    torch.save(checkpoint_weights(model, ema), tmp_path / "w.pt")
    ckpt = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in ema.module.state_dict().items())
    assert all(torch.equal(ckpt["ema"]["training_model"][k], v) for k, v in model.state_dict().items())
    assert describe_weights(ckpt) == "ema(decay=0.9, every=2, warmup=true, updates=2)"

    model2 = tiny_net()
    ema2 = WeightAverage(model2, decay=0.9, every=2, warmup=True)
    load_checkpoint_weights(model2, ema2, ckpt)
    assert (ema2.steps, ema2.updates) == (5, 2)
    for a, b in ((model, model2), (ema.module, ema2.module)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())

    # A checkpoint without ema (training weights in model, as before train.ema) loads as before.
    plain = checkpoint_weights(model, None)
    assert set(plain) == {"model"} and describe_weights(plain) == "raw"
    model3 = tiny_net()
    load_checkpoint_weights(model3, None, plain)
    assert all(torch.equal(v, model3.state_dict()[k]) for k, v in model.state_dict().items())


def test_the_epoch_loop_updates_the_average_without_reading_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    params, meta = ema_params(every=2), make_meta(size=8)
    loader = DeviceLoader(*quadrant_task(240, 8), 4, mean=meta["mean"], std=meta["std"], train=True)
    model = create_model(params, meta)
    model.train()
    ema = WeightAverage(model, decay=0.9, every=2, warmup=True)
    opt = build_optimizer(model, params.train)
    sched = build_scheduler(opt, params.train, len(loader))
    reads = count_host_reads(monkeypatch)
    train_one_epoch(
        model, loader, opt, sched, torch.amp.GradScaler("cpu", enabled=False), nn.CrossEntropyLoss(), ema=ema
    )
    monkeypatch.undo()
    assert (ema.steps, ema.updates) == (60, 30)
    assert reads["n"] <= 6, f"{reads['n']} host reads in 60 steps"


# ----------------------------------------------------------------------------- params


@pytest.mark.parametrize(
    ("ema", "needle"),
    [
        ({"decay": 0.0, "lookahead": True}, r"train\.ema\.lookahead: true needs train\.ema\.decay > 0"),
        ({"decay": 1.0}, r"train\.ema\.decay: 1\.0 is out of range; it must be >= 0\.0 and < 1\.0"),
        ({"decay": -0.1}, r"train\.ema\.decay: -0\.1 is out of range"),
        ({"every": 0}, r"train\.ema\.every: 0 is out of range; it must be >= 1"),
        ({"warmup": "yes"}, r"train\.ema\.warmup: expected true or false"),
    ],
)
def test_bad_ema_params_are_refused_naming_the_key(ema: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        override(recipe(), {f"train.ema.{k}": v for k, v in ema.items()})


def test_ema_off_keeps_the_fingerprint_of_checkpoints_from_before_train_ema() -> None:
    """A last.pt written before train.ema existed still resumes: with the average off, the key is not hashed."""
    params, meta = recipe(), make_meta()
    assert params.train.ema.decay == 0
    train = dataclasses.asdict(params.train)
    old_train = {k: v for k, v in train.items() if k not in (*resume.RUNTIME_KEYS, "batch_size", "ema")}
    old = {"model": dataclasses.asdict(params.model), "train": old_train, "global_batch": params.global_batch}
    blob = {**old, "data": resume.data_identity(meta)}
    before = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint(params, meta) == before
    # On, every ema key is part of the recipe: another decay is another run.
    assert len({fingerprint(ema_params(decay=d), meta) for d in (0.9, 0.99)} | {before}) == 3


# ----------------------------------------------------------------------------- training


def test_training_validates_and_saves_the_average(tmp_path: Path) -> None:
    params, meta = ema_params(decay=0.8, every=1, warmup=True), make_meta()
    train, val = make_loaders(params, meta)
    result = fit(params, meta, train, val, tmp_path)
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    assert last["ema"]["updates"] == last["ema"]["steps"] == 2 * train.steps
    # The checkpoint's model is the average, not the training weights it also holds.
    raw = last["ema"]["training_model"]
    assert any(not torch.equal(v, raw[k]) for k, v in last["model"].items() if v.is_floating_point())
    assert all(torch.equal(v, result.model.state_dict()[k]) for k, v in last["model"].items())
    # What training recorded for best.pt is what evaluating best.pt gives (as the validate stage does).
    model = model_from_checkpoint(best)
    got = evaluate(model, val, len(meta["classes"]), tta=params.model.tta)
    recorded = result.history[best["best_epoch"] - 1]
    assert (got.loss, got.accuracy) == (recorded["val_loss"], recorded["val_accuracy"])
    # ... and not what the training weights give.
    model.load_state_dict(best["ema"]["training_model"])
    assert evaluate(model, val, len(meta["classes"]), tta=params.model.tta).loss != recorded["val_loss"]


@pytest.mark.parametrize(
    "ema",
    [
        {"decay": 0.9, "every": 3, "warmup": True},  # updates straddle the epoch boundary (4 steps an epoch)
        {"decay": 0.7, "every": 2, "lookahead": True},
    ],
)
def test_interrupted_then_resumed_run_with_ema_equals_uninterrupted_bitwise(tmp_path: Path, ema: dict) -> None:
    params = recipe(
        epochs=3,
        augment={"crop_padding": 2, "flip": True, "cutout": 4},
        ema={"decay": 0.9, "every": 1, "warmup": False, "lookahead": False, **ema},
    )
    meta = make_meta()
    fit(params, meta, *make_loaders(params, meta), tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        fit(params, meta, *make_loaders(params, meta), tmp_path / "b", on_epoch=interrupt_after(1))
    ckpt = find_resume_checkpoint(params, meta, tmp_path / "b")
    assert ckpt is not None and ckpt["epoch"] == 1 and ckpt["ema"]["steps"] == 4
    torch.manual_seed(1234)  # a new process starts with other RNG states
    fit(params, meta, *make_loaders(params, meta), tmp_path / "b", resume=ckpt)

    a, b = (load_checkpoint(tmp_path / d / "last.pt") for d in ("a", "b"))
    assert a["ema"]["updates"] == b["ema"]["updates"] == 12 // ema["every"]
    for key in ("model", "training_model"):
        x, y = (a[key], b[key]) if key == "model" else (a["ema"][key], b["ema"][key])
        for k in x:
            assert torch.equal(x[k], y[k]), f"{key} {k} differs after resuming"
    drop = ("images_per_sec", "epoch_seconds")
    assert [{k: v for k, v in h.items() if k not in drop} for h in a["history"]] == [
        {k: v for k, v in h.items() if k not in drop} for h in b["history"]
    ]


# ----------------------------------------------------------------------------- the stages and the registry


@pytest.mark.slow
def test_stages_with_ema_validate_and_register_the_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """train.json's validation of best.pt is the validate stage's; the version is tagged with the average."""
    ema = {"decay": 0.8, "every": 2, "warmup": True, "lookahead": False}
    write_stage_inputs(tmp_path, {"epochs": 2, "lr": 0.2, "warmup_epochs": 0, "ema": ema})
    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    assert load_stage_module("train").main() == 0
    train = json.loads(paths.TRAIN_METRICS.read_text())
    assert load_stage_module("validate").main() == 0
    val = json.loads(paths.VAL_METRICS.read_text())
    assert (val["val_loss"], val["val_accuracy"]) == (train["best_val_loss"], train["best_val_accuracy"])
    best = load_checkpoint(paths.CHECKPOINTS["best"])
    assert describe_weights(best) == f"ema(decay=0.8, every=2, warmup=true, updates={best['ema']['updates']})"

    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    params = load_params(paths.PARAMS)
    with tracking.continue_run(params, paths.RUN_FILE, "register") as run:
        result = tracking.register_checkpoint(
            run, paths.CHECKPOINTS["best"], images, "tiny", "test_accuracy", {"test_accuracy": 0.9}
        )
    client = mlflow.MlflowClient()
    version = client.get_model_version("tiny", str(result["version"]))
    assert version.tags["weights"] == describe_weights(best)
    logged = client.get_run(version.run_id).data.params  # params.yaml, flattened, as the run's params
    assert (logged["train.ema.decay"], logged["train.ema.every"], logged["train.ema.warmup"]) == ("0.8", "2", "true")
