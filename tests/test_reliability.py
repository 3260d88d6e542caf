"""Failures that must not cost finished work, and one training per workspace.

* A params typo followed by its fix reruns nothing (real dvc in a temporary git
  repository, ``@pytest.mark.slow``): DVC 3 deletes every output of a stage that is not
  ``persist: true`` before running its command, even when the command then fails at
  once, so without persist the fix would rerun the training (or register a second model
  version) only because its uncached outputs were gone.
* A second ``python stages/train.py`` in the same workspace is refused with one line
  naming the lock and the pid holding it; the lock goes with its holder, even after
  SIGKILL.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_experiments import DVC, ROOT, commit_all, new_pipeline_repo, sh, tiny_params, tool_env

from resnet import paths
from resnet.lock import exclusive_lock

TRAIN_LOCK = paths.MODELS / ".train.lock"  # as stages/train.py names it
# The outputs a typo in a later section must leave as they were.
RESULTS = [p for stage in ("train", "validate", "evaluate", "register") for p in paths.STAGE_OUTPUTS[stage]]


def _snapshot(repo: Path) -> dict[str, tuple[int, str] | None]:
    """Each result's mtime and content hash, None where it is missing."""
    return {
        str(p): ((repo / p).stat().st_mtime_ns, hashlib.sha256((repo / p).read_bytes()).hexdigest())
        if (repo / p).is_file()
        else None
        for p in RESULTS
    }


def _rename_first_key(params_text: str, section: str) -> str:
    """params.yaml with a typo: the first key of ``section`` misspelled (an error for every stage)."""
    params = yaml.safe_load(params_text)
    key = next(iter(params[section]))
    params[section] = {(f"{key}x" if k == key else k): v for k, v in params[section].items()}
    return yaml.safe_dump(params, sort_keys=False)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not Path(DVC).exists(), reason="needs git and dvc")
def test_a_params_typo_and_its_fix_rerun_nothing_that_had_finished(tmp_path: Path) -> None:
    params = tiny_params()
    params["train"]["epochs"] = 1
    good = yaml.safe_dump(params, sort_keys=False)
    repo = new_pipeline_repo(tmp_path, params)
    sh(repo, DVC, "repro", timeout=900)
    commit_all(repo, "results")
    # The training's lock file is neither DVC's nor git's business.
    assert (repo / TRAIN_LOCK).is_file()
    assert "Data and pipelines are up to date" in sh(repo, DVC, "status").stdout
    assert not sh(repo, "git", "status", "--porcelain").stdout.strip()
    before = _snapshot(repo)

    for section in ("train", "validate", "evaluate", "register"):
        (repo / "params.yaml").write_text(_rename_first_key(good, section))
        failed = sh(repo, DVC, "repro", check=False, timeout=900)
        assert failed.returncode != 0 and f"Running stage '{section}'" in failed.stdout, (section, failed.stdout)
        # The failed stage did no work, and DVC deleted none of the results.
        assert _snapshot(repo) == before, section

        (repo / "params.yaml").write_text(good)
        fixed = sh(repo, DVC, "repro", timeout=900)
        assert "Running stage" not in fixed.stdout, (section, fixed.stdout)
        assert "Data and pipelines are up to date" in sh(repo, DVC, "status").stdout, section
        assert _snapshot(repo) == before, section
    assert not sh(repo, "git", "status", "--porcelain").stdout.strip()


def _hold_lock(cwd: Path) -> subprocess.Popen:
    """Another process holding the train stage's lock in ``cwd``, as a running training does."""
    code = (
        "import sys, time\n"
        "from resnet.lock import exclusive_lock\n"
        f"with exclusive_lock({str(TRAIN_LOCK)!r}, 'training'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=cwd, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_training_in_the_workspace_is_refused_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    holder = _hold_lock(tmp_path)
    try:
        second = subprocess.run(
            [sys.executable, str(ROOT / "stages" / "train.py")],
            cwd=tmp_path,
            env=tool_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = second.stderr.strip().splitlines()
        assert second.returncode == 1, second.stderr
        assert len(lines) == 1, second.stderr
        assert str(TRAIN_LOCK) in lines[0] and f"pid {holder.pid}" in lines[0], lines[0]
        # Refused before any work: nothing but the lock was written.
        assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["params.yaml", "models", ".train.lock"])
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
        holder.stdout.close()
    assert (tmp_path / TRAIN_LOCK).is_file()
    with exclusive_lock(tmp_path / TRAIN_LOCK, "training"):
        assert (tmp_path / TRAIN_LOCK).read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- kills at any point


def _repro_until(repo: Path, ready: Callable[[str], bool], timeout: float = 600) -> str:
    """Start ``dvc repro``; SIGKILL it with every stage process once ``ready(output so far)``; its output."""
    proc = subprocess.Popen(
        [DVC, "repro"],
        cwd=repo,
        env=tool_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: dvc and the stage it runs die together
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready("".join(lines)):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            reader.join(10)
            return "".join(lines)
        time.sleep(0.02)
    reader.join(10)
    out = "".join(lines)
    raise AssertionError(f"dvc repro ended (or timed out) before the kill point:\n{out[-4000:]}")


def _epochs_trained(output: str) -> list[int]:
    return [int(m) for m in re.findall(r"epoch (\d+)/\d+ train_loss", output)]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or not Path(DVC).exists(), reason="needs git and dvc")
def test_killed_anywhere_then_rerun_ends_with_one_finished_run_one_version_and_no_training_redone(
    tmp_path: Path,
) -> None:
    """SIGKILL (no clean-up at all) during training, right after it, and during registration; each time
    ``dvc repro`` again. The end: one MLflow run, FINISHED; one registered version; the training resumed
    where it was killed and, once finished, never trained again."""
    params = tiny_params()
    params["train"]["epochs"] = 40  # long enough to be killed in the middle
    repo = new_pipeline_repo(tmp_path, params)
    last, train_json = repo / paths.LAST_CHECKPOINT, repo / paths.TRAIN_METRICS

    # 1. During training, after at least one epoch was saved.
    first = _repro_until(repo, lambda out: len(_epochs_trained(out)) >= 2 and last.exists())
    assert "Running stage 'train'" in first and not train_json.exists()
    # 2. Right after training wrote its metrics: the rerun resumes (no epoch trained twice), then dies.
    second = _repro_until(repo, lambda out: train_json.exists())
    resumed = _epochs_trained(second)
    assert resumed and resumed[0] > 1 and resumed[-1] == 40, resumed
    trained = {p: p.read_bytes() for p in (last, repo / paths.BEST_CHECKPOINT)}
    # 3. During registration: the model logged, no version yet; then once the version exists
    #    (register.json may or may not be written by the time the kill lands).
    for point in ("logged model", "registered test-model version"):
        during = _repro_until(repo, lambda out, point=point: point in out)
        assert _epochs_trained(during) == [] and "Running stage 'register'" in during, point
    # 4. To the end.
    final = sh(repo, DVC, "repro", timeout=900).stdout
    assert _epochs_trained(final) == []
    assert {p: p.read_bytes() for p in trained} == trained
    assert "Data and pipelines are up to date" in sh(repo, DVC, "status").stdout

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("resnet-pipeline").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    tags = runs[0].data.tags
    assert {tags[f"pipeline.stage.{s}"] for s in ("train", "validate", "evaluate", "register")} == {"finished"}
    (version,) = client.search_model_versions("name='test-model'")
    assert version.run_id == runs[0].info.run_id
    assert json.loads((repo / paths.REGISTER_RESULT).read_text())["version"] == int(version.version) == 1
    assert json.loads(train_json.read_text())["epochs_completed"] == 40
