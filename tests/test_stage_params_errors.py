"""Bad params through the stage entry points: one line naming the key, exit 1, nothing touched.

Every case runs a stage's ``main()`` in a workspace of its own whose params.yaml has one
mistake, and whose earlier outputs (a previous run's models/, metrics/) are on disk. It
must end with exit status 1 and one log line naming the key, before any work: no
traceback, no file written or changed, no MLflow store created. All cases run in one
driver process (importing torch and mlflow once); one case per stage also runs as
``python stages/<stage>.py``, exactly as DVC runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml
from paramsets import PARAMS_FILE, REPO

STAGES = ("download", "split", "train", "validate", "evaluate", "register")
GOOD = yaml.safe_load(PARAMS_FILE.read_text())

# (key the message must name, change): change is {dotted key: value}, a key mapped to DELETE, or raw file text.
DELETE = object()
CASES: list[tuple[str, dict | str]] = [
    ("trian", {"trian": {"lr": 0.1}}),  # unknown keys at every level
    ("learning_rate", {"train.learning_rate": 0.1}),
    ("rotate", {"train.augment.rotate": 15}),
    ("shuffle", {"data.shuffle": True}),
    ("train.lr", {"train.lr": "fast"}),  # wrong types
    ("train.epochs", {"train.epochs": 2.5}),
    ("train.nesterov", {"train.nesterov": "yes"}),
    ("data.channels", {"data.channels": "3"}),
    ("model.width_multiplier", {"model.width_multiplier": [1.0]}),
    ("tracking", {"tracking": "sqlite:///x.db"}),
    ("train.lr", {"train.lr": -0.1}),  # out of range
    ("data.val_fraction", {"data.val_fraction": 1.0}),
    ("train.momentum", {"train.momentum": 1.0}),
    ("evaluate.misclassified_examples", {"evaluate.misclassified_examples": 1000}),
    ("train.augment.crop_padding", {"train.augment.crop_padding": -1}),
    ("train.optimizer", {"train.optimizer": "rmsprop"}),  # bad choices
    ("model.name", {"model.name": "resnet19"}),
    ("validate.checkpoint", {"validate.checkpoint": "middle"}),
    ("register.metric", {"register.metric": "loss"}),
    ("train.schedule", {"train.schedule": "linear"}),
    ("model.stem", {"model.stem": "imagenet"}),  # cross-field conflicts
    ("train.nesterov", {"train.momentum": 0.0}),
    ("train.milestones", {"train.schedule": "multistep", "train.milestones": []}),
    ("train.warmup_epochs", {"train.warmup_epochs": 100.0}),
    ("model.freeze_backbone", {"model.freeze_backbone": True}),
    ("model.pretrained", {"model.pretrained": "missing.pt"}),
    ("data.sha256", {"data.sha256": "abc"}),
    ("train.lr", {"train.lr": DELETE}),  # missing keys and sections
    ("tracking", {"tracking": DELETE}),
    ("params.yaml is empty", ""),  # broken files
    ("not valid YAML at line", "train: [unclosed\n"),
    ("expected a mapping", "- just\n- a list\n"),
]
if not torch.cuda.is_available():
    CASES += [
        ("train.device", {"train.device": "cuda"}),
        ("train.channels_last", {"model.name": "resnet20", "model.width_multiplier": 0.25}),
    ]

# Outputs of an earlier run, which a failing stage must leave exactly as they are.
EARLIER = {
    "models/run.json": '{"run_id": "abc"}\n',
    "metrics/train.json": '{"best_val_accuracy": 0.5}\n',
    "metrics/test.json": '{"test_accuracy": 0.5}\n',
    "data/prepared/meta.json": "{}\n",
}


def _params_text(change: dict | str) -> str:
    if isinstance(change, str):
        return change
    raw = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[leaf]
        else:
            node[leaf] = value
    return yaml.safe_dump(raw, sort_keys=False)


def _workspace(root: Path, change: dict | str) -> Path:
    root.mkdir(parents=True)
    (root / ".dvc").mkdir()  # the repository root: where the MLflow store would be created
    (root / "params.yaml").write_text(_params_text(change))
    for name, text in EARLIER.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# The driver: for each case, chdir into its workspace, send fd 2 to a file, call the stage's main().
DRIVER = r"""
import importlib.util, json, os, sys, traceback
cases = json.loads(sys.argv[1])
mains = {}
for stage in {c["stage"] for c in cases}:
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", os.path.join(sys.argv[2], f"{stage}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mains[stage] = module.main
results = []
saved = os.dup(2)
for c in cases:
    os.chdir(c["workspace"])
    with open("stderr.txt", "w") as err:
        sys.stderr.flush()
        os.dup2(err.fileno(), 2)
        try:
            rc = mains[c["stage"]]()
        except BaseException:
            rc = "exception"
            traceback.print_exc()
        sys.stderr.flush()
        os.dup2(saved, 2)
    results.append(rc)
print(json.dumps(results))
"""


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    return {**env, "RESNET_NO_PROGRESS": "1"}


def _check(root: Path, rc: object, stderr: str, needle: str, before: dict) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 1, f"exit status {rc!r}, stderr:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert " ERROR " in lines[0] and needle in lines[0], lines[0]
    after = {k: v for k, v in _snapshot(root).items() if k != "stderr.txt"}
    assert after == before, "a failing stage touched files"
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()


@pytest.mark.slow
def test_every_bad_params_case_stops_every_stage_before_any_work(tmp_path: Path) -> None:
    assert len(CASES) >= 25
    cases, snapshots = [], []
    for i, (needle, change) in enumerate(CASES):
        root = _workspace(tmp_path / f"case{i}", change)
        snapshots.append(_snapshot(root))
        cases.append({"stage": STAGES[i % len(STAGES)], "workspace": str(root), "needle": needle})
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(cases), str(REPO / "stages")],
        capture_output=True,
        text=True,
        env=_clean_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for case, rc, before in zip(cases, results, snapshots):
        root = Path(case["workspace"])
        _check(root, rc, (root / "stderr.txt").read_text(), case["needle"], before)


@pytest.mark.slow
def test_stage_scripts_exit_1_with_one_line_as_dvc_runs_them(tmp_path: Path) -> None:
    """`python stages/<stage>.py`, one per stage, each with another mistake."""

    def run(i: int) -> tuple[Path, subprocess.CompletedProcess, str, dict]:
        needle, change = CASES[i * 5 % len(CASES)]
        root = _workspace(tmp_path / STAGES[i], change)
        before = _snapshot(root)
        out = subprocess.run(
            [sys.executable, str(REPO / "stages" / f"{STAGES[i]}.py")],
            cwd=root,
            capture_output=True,
            text=True,
            env=_clean_env(),
            timeout=300,
        )
        return root, out, needle, before

    with ThreadPoolExecutor(2) as pool:
        for root, out, needle, before in pool.map(run, range(len(STAGES))):
            _check(root, out.returncode, out.stderr, needle, before)
