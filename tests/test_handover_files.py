"""Diverged models and corrupt hand-over files stop validate, evaluate and register.

* Non-finite weights or metrics are refused
  (one line, exit 1) before anything is written or registered.
* A garbage or missing run.json, meta.json or test.json, a 0-byte or text checkpoint,
  or a checkpoint of another run: one line naming the file and the fix, no traceback,
  no metrics or plots.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_evaluation import REPO, _checkpoint_state, _output_files, _stage, workspace_run_id
from test_evaluation import workspace as workspace  # noqa: F401  (the fixture)

from resnet import paths
from resnet.checkpoint import save_checkpoint

CLASSES = ["plane", "car", "bird", "cat", "deer", "dog"]


def _one_line_error(caplog: pytest.LogCaptureFixture, *needles: str) -> None:
    errors = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert len(errors) == 1, caplog.text
    message = errors[0].getMessage()
    assert "\n" not in message and errors[0].exc_info is None, message
    for needle in needles:
        assert needle in message, message
    assert "Traceback" not in caplog.text


def _nan_weights_state() -> dict:
    state = _checkpoint_state(CLASSES, 0, 3, workspace_run_id())
    state["model"]["fc.weight"][0, 0] = float("nan")
    return state


@pytest.mark.parametrize("stage", ["validate", "evaluate"])
def test_non_finite_weights_are_refused_before_anything_is_written(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stage: str,
) -> None:
    save_checkpoint(paths.BEST_CHECKPOINT, _nan_weights_state())
    assert _stage(stage, monkeypatch).main() == 1
    _one_line_error(caplog, "models/best.pt", "non-finite weights", "dvc repro")
    assert _output_files(workspace) == []


def _test_json(**metrics: float) -> None:
    values = {
        "test_loss": 0.5,
        "test_accuracy": 0.9,
        "test_top5_accuracy": 1.0,
        "test_checkpoint": "models/best.pt",
        "test_checkpoint_epoch": 3,
        "test_num_images": 23,
        "test_num_classes": len(CLASSES),
        "test_chance_accuracy": 4 / 23,
    }
    values.update(metrics)
    paths.TEST_METRICS.parent.mkdir(parents=True, exist_ok=True)
    paths.TEST_METRICS.write_text(json.dumps(values))  # NaN and Infinity as Python's json writes them


@pytest.mark.parametrize(
    ("metrics", "needle"),
    [
        ({"test_loss": float("nan")}, "non-finite test_loss"),
        ({"test_accuracy": float("inf")}, "non-finite test_accuracy"),
    ],
)
def test_register_refuses_diverged_models(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    metrics: dict,
    needle: str,
) -> None:
    _test_json(**metrics)
    assert _stage("register", monkeypatch).main() == 1
    _one_line_error(caplog, needle)
    assert not paths.REGISTER_RESULT.exists()


def _spoil(path: Path, content: str | None) -> None:
    if content is None:
        path.unlink()
    else:
        path.write_text(content)


GARBAGE = {"empty": "", "garbage": "{not json", "list": "[1, 2]", "missing": None}


@pytest.mark.parametrize("stage", ["validate", "evaluate"])
@pytest.mark.parametrize("what", ["run.json", "meta.json"])
@pytest.mark.parametrize("kind", list(GARBAGE))
def test_corrupt_run_or_meta_json_is_one_line_and_writes_nothing(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    what: str,
    kind: str,
) -> None:
    path = paths.RUN_FILE if what == "run.json" else paths.META
    _spoil(path, GARBAGE[kind])
    assert _stage(stage, monkeypatch).main() == 1
    _one_line_error(caplog, str(path), "dvc repro")
    assert _output_files(workspace) == []


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_corrupt_test_json_is_one_line_for_register(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    paths.TEST_METRICS.parent.mkdir(parents=True, exist_ok=True)
    paths.TEST_METRICS.write_text("{}")
    _spoil(paths.TEST_METRICS, GARBAGE[kind])
    assert _stage("register", monkeypatch).main() == 1
    _one_line_error(caplog, str(paths.TEST_METRICS), "dvc repro")
    assert not paths.REGISTER_RESULT.exists()


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint\n"])
def test_empty_or_text_checkpoint_is_one_line(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    content: bytes,
) -> None:
    paths.BEST_CHECKPOINT.write_bytes(content)
    assert _stage("evaluate", monkeypatch).main() == 1
    _one_line_error(caplog, "models/best.pt", "dvc repro train")
    assert _output_files(workspace) == []


@pytest.mark.parametrize("stage", ["validate", "evaluate", "register"])
@pytest.mark.parametrize(("owner", "needle"), [("0" * 32, "0" * 32), (None, "records no MLflow run")])
def test_checkpoint_of_another_run_or_of_none_is_refused(
    workspace: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    stage: str,
    owner: str | None,
    needle: str,
) -> None:
    """A checkpoint another run wrote, or one that names no run (not the train stage's), is not evaluated
    or registered into run.json's run."""
    save_checkpoint(paths.BEST_CHECKPOINT, _checkpoint_state(CLASSES, 0, 3, owner))
    if stage == "register":
        _test_json()
    before = _output_files(workspace)
    assert _stage(stage, monkeypatch).main() == 1
    _one_line_error(caplog, "models/best.pt", needle, "dvc repro -f train")
    assert _output_files(workspace) == before


def test_own_run_checkpoint_is_evaluated(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    state = _checkpoint_state(CLASSES, seed=0, epoch=3)
    state["extra"] = {"run_id": json.loads(paths.RUN_FILE.read_text())["run_id"]}
    save_checkpoint(paths.BEST_CHECKPOINT, state)
    assert _stage("validate", monkeypatch).main() == 0
    assert paths.VAL_METRICS.is_file()


def test_garbage_run_json_from_the_command_line(workspace: Path) -> None:  # noqa: F811
    paths.RUN_FILE.write_text("{garbage")
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "validate.py")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr
    assert "models/run.json is not readable JSON" in proc.stderr
    assert "dvc repro -f train" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _output_files(workspace) == []
