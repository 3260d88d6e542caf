"""The team's DVC remote (docs/team-remote.md), with real dvc and git and a directory remote.

The project's pipeline (dvc.yaml, stages/, src/, .gitignore, Makefile) is copied into a
temporary git repository with test_experiments' tiny params (3 classes of 16x16 images,
resnet20 at width 1/4) for one epoch, run by ``dvc repro`` and committed. ``make remote
URL=<dir>`` (the documented command) sets the remote and ``dvc push --run-cache`` sends
everything. Then:

* the remote holds every DVC-cached output of dvc.lock (data, checkpoints, run.json, the
  ONNX export) and the run-cache entries;
* a fresh ``git clone`` elsewhere, after ``dvc pull``, is up to date: ``dvc repro`` runs
  no stage, and the files are the originals byte for byte (no ``--run-cache`` needed);
* the same pull from a remote that lacks an object fails, and the pipeline is then stale;
* a split a teammate pushed for other params comes back with ``dvc repro --pull`` instead
  of running again; ``dvc pull --run-cache`` fetches the run-cache entry but not that split.

The MLflow store stays in the temporary repository (no MLFLOW_* variable reaches dvc).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from archives import sha256_of
from test_experiments import (
    BIN,
    DVC,
    ROOT,
    STAGES,
    WORKFLOW,
    commit_all,
    load_workflow,
    new_pipeline_repo,
    sh,
    tiny_params,
    tool_env,
)

VENV = BIN.parent
STAMP = VENV / ".installed"  # the Makefile's install stamp: `make -o` keeps make from reinstalling
REMOTE_NAME = "team"
# The outputs a push must carry: everything the stages write that git does not track.
CACHED_OUTS = ["data/raw", "data/prepared", "models/best.pt", "models/last.pt", "models/run.json", "models/model.onnx"]

needs_tools = pytest.mark.skipif(
    shutil.which("git") is None or shutil.which("make") is None or not Path(DVC).exists(),
    reason="needs git, make and dvc",
)


def env() -> dict[str, str]:
    """test_experiments' tool environment (venv first on PATH) without any MLFLOW_* variable."""
    return {k: v for k, v in tool_env().items() if not k.startswith("MLFLOW_")}


def run(cwd: Path, *cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return sh(cwd, *cmd, check=check, timeout=timeout, env=env())


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(cwd, DVC, *args, check=check)


def stages_run(output: str) -> list[str]:
    """The stages ``dvc repro`` ran, from its log lines ``Running stage 'x':``."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def file_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file under the cached outputs, by path relative to the repository."""
    out = {}
    for name in CACHED_OUTS:
        path = repo / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out |= {p.relative_to(repo).as_posix(): sha256_of(p) for p in files if p.exists()}
    return out


def object_path(store: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object in a cache or remote: files/md5/<2 chars>/<rest>."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


def lock_outs(repo: Path) -> dict[str, str]:
    """dvc.lock's DVC-cached outputs: path -> md5 (``.dir`` for a directory)."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text())
    uncached = {
        path
        for spec in pipeline["stages"].values()
        for kind in ("outs", "metrics", "plots")
        for entry in spec.get(kind, [])
        if isinstance(entry, dict)
        for path, opts in entry.items()
        if opts.get("cache") is False
    }
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return {o["path"]: o["md5"] for st in lock.values() for o in st.get("outs", []) if o["path"] not in uncached}


def run_entries(store: Path) -> set[str]:
    """The run-cache entries (``runs/<key prefix>/<key>/<value>``) of a cache or remote."""
    runs = store / "runs"
    return {p.relative_to(runs).as_posix() for p in runs.rglob("*") if p.is_file()} if runs.is_dir() else set()


def clone(origin: Path, where: Path) -> Path:
    """``git clone`` into a folder where the data source (``../data-src``) does not exist:
    a download stage that ran there would fail."""
    where.mkdir(parents=True)
    run(where, "git", "clone", "-q", str(origin), "clone")
    return where / "clone"


def set_param(repo: Path, section: str, key: str, value: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@dataclass
class Pushed:
    tmp: Path
    repo: Path
    remote: Path
    hashes: dict[str, str]  # sha256 of the outputs as the pipeline wrote them
    make_output: str


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """The pipeline run once with tiny params, committed, its remote set by ``make remote`` and pushed."""
    if shutil.which("git") is None or shutil.which("make") is None or not Path(DVC).exists():
        pytest.skip("needs git, make and dvc")
    tmp = tmp_path_factory.mktemp("dvc_remote")
    params = tiny_params()
    params["train"]["epochs"] = 1
    repo = new_pipeline_repo(tmp, params)  # data source at tmp/data-src, outside any clone's reach
    shutil.copy(ROOT / "Makefile", repo / "Makefile")  # for `make remote`
    commit_all(repo, "pipeline with tiny params, never run")

    r = dvc(repo, "repro")
    assert stages_run(r.stdout) == STAGES, r.stdout
    commit_all(repo, "results: dvc.lock, metrics and plots")
    # Everything the stages wrote is either committed or git-ignored (and then DVC-cached).
    assert run(repo, "git", "status", "--porcelain").stdout == ""

    remote = tmp / "remote"
    made = run(repo, "make", "-o", str(STAMP), "remote", f"URL={remote}", f"VENV={VENV}")
    commit_all(repo, "the team's DVC remote")
    dvc(repo, "push", "--run-cache")
    return Pushed(tmp, repo, remote, file_hashes(repo), made.stdout)


# --------------------------------------------------------------------------- the command


def test_make_remote_without_url_says_how_to_use_it() -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    r = subprocess.run(
        ["make", "-o", str(STAMP), "remote", f"VENV={VENV}"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0 and "usage: make remote URL=" in r.stderr


def test_make_remote_runs_dvc_remote_add_default_and_local_when_asked() -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    for extra, flags in (([], "--default --force"), (["LOCAL=1"], "--local --default --force")):
        r = subprocess.run(
            ["make", "-n", "remote", "URL=/mnt/shared/resnet-dvc", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        assert f".venv/bin/dvc remote add {flags} team '/mnt/shared/resnet-dvc'" in r.stdout


@needs_tools
@pytest.mark.slow
def test_make_remote_sets_the_default_remote_in_the_committed_config(pushed: Pushed) -> None:
    assert "dvc remote add --default --force team" in pushed.make_output
    listed = [ln.split() for ln in pushed.make_output.splitlines()]  # dvc remote list
    assert [REMOTE_NAME, str(pushed.remote), "(default)"] in listed, pushed.make_output
    config = run(pushed.repo, "git", "show", "HEAD:.dvc/config").stdout
    assert f"remote = {REMOTE_NAME}" in config and f"url = {pushed.remote}" in config
    assert not (pushed.repo / ".dvc" / "config.local").exists()
    # config.local, where credentials go, is git-ignored by DVC itself.
    assert run(pushed.repo, "git", "check-ignore", ".dvc/config.local").returncode == 0


# --------------------------------------------------------------------------- push


@needs_tools
@pytest.mark.slow
def test_every_data_and_model_output_is_dvc_cached_and_pushed_with_the_run_cache(pushed: Pushed) -> None:
    outs = lock_outs(pushed.repo)
    assert sorted(outs) == sorted(CACHED_OUTS)  # models/run.json too: /models/ is git-ignored
    for path, md5 in outs.items():
        assert object_path(pushed.remote, md5).is_file(), f"{path} ({md5}) not on the remote"
        if md5.endswith(".dir"):  # a directory: its manifest and every file in it
            for entry in json.loads(object_path(pushed.remote, md5).read_text()):
                assert object_path(pushed.remote, entry["md5"]).is_file(), f"{path}/{entry['relpath']} not pushed"
    # The run-cache: download and split (the persist stages keep none, see dvc.yaml).
    local_runs = run_entries(pushed.repo / ".dvc" / "cache")
    assert len(local_runs) == 2 and local_runs <= run_entries(pushed.remote)


# --------------------------------------------------------------------------- pull


@needs_tools
@pytest.mark.slow
def test_fresh_clone_after_dvc_pull_reproduces_nothing(pushed: Pushed) -> None:
    repo = clone(pushed.repo, pushed.tmp / "elsewhere")
    before = dvc(repo, "status", "--json")
    assert set(json.loads(before.stdout)) >= {"download", "split", "train"}  # nothing there yet: all stale
    dvc(repo, "pull")  # plain pull: dvc.lock and the outputs are enough, no --run-cache
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
    r = dvc(repo, "repro")
    assert stages_run(r.stdout) == [], r.stdout
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change, skipping" in r.stdout
    assert file_hashes(repo) == pushed.hashes and len(pushed.hashes) >= len(CACHED_OUTS)
    assert run(repo, "git", "status", "--porcelain").stdout == ""
    assert not (repo / "mlflow.db").exists()  # no stage ran, so none touched MLflow


@needs_tools
@pytest.mark.slow
def test_pull_from_a_remote_missing_an_object_fails_and_leaves_the_pipeline_stale(pushed: Pushed) -> None:
    broken = pushed.tmp / "broken-remote"
    shutil.copytree(pushed.remote, broken)
    outs = lock_outs(pushed.repo)
    best = outs["models/best.pt"]
    object_path(broken, best).unlink()  # after one epoch last.pt is the same file: gone too
    repo = clone(pushed.repo, pushed.tmp / "broken")
    # The credentials' place, used here to point this clone at the broken copy.
    dvc(repo, "remote", "modify", "--local", REMOTE_NAME, "url", str(broken))
    r = dvc(repo, "pull", check=False)
    assert r.returncode != 0, r.stdout + r.stderr
    assert "failed to pull" in r.stderr and "models/best.pt" in r.stderr, r.stderr
    missing = {path for path, md5 in outs.items() if md5 == best}
    assert "models/best.pt" in missing
    for path in outs:
        assert (repo / path).exists() == (path not in missing), path
    stale = json.loads(dvc(repo, "status", "--json").stdout)
    assert "train" in stale and "download" not in stale, stale


@needs_tools
@pytest.mark.slow
def test_a_teammates_pushed_split_comes_back_with_repro_pull_not_with_pull_run_cache(pushed: Pushed) -> None:
    teammate = clone(pushed.repo, pushed.tmp / "teammate")
    dvc(teammate, "pull")
    set_param(teammate, "data", "val_fraction", 0.5)
    assert stages_run(dvc(teammate, "repro", "split").stdout) == ["split"]
    dvc(teammate, "push", "--run-cache")  # not committed: only the remote knows this split
    theirs = file_hashes(teammate)

    their_split = lock_outs(teammate)["data/prepared"]
    assert their_split != lock_outs(pushed.repo)["data/prepared"]

    me = clone(pushed.repo, pushed.tmp / "me")
    dvc(me, "pull", "--run-cache")
    cache = me / ".dvc" / "cache"
    # The run-cache entries came, the split the new one names did not: dvc pull fetches the
    # outputs of the checked-out dvc.lock only, so a plain dvc repro would run split again.
    assert run_entries(pushed.remote) <= run_entries(cache) and len(run_entries(cache)) == 3
    assert not object_path(cache, their_split).exists()
    set_param(me, "data", "val_fraction", 0.5)
    r = dvc(me, "repro", "--pull", "split")
    assert "Stage 'split' is cached - skipping run, checking out outputs" in r.stdout, r.stdout
    assert stages_run(r.stdout) == []
    mine = file_hashes(me)
    assert {k: v for k, v in mine.items() if k.startswith("data/")} == {
        k: v for k, v in theirs.items() if k.startswith("data/")
    }
    assert mine["data/prepared/train.npz"] != pushed.hashes["data/prepared/train.npz"]  # really the other split
    assert lock_outs(me)["data/prepared"] == their_split


# --------------------------------------------------------------------------- the workflow


def workflow_steps() -> list[dict]:
    (job,) = load_workflow()["jobs"].values()
    return job["steps"]


def step(steps: list[dict], text: str) -> dict:
    (found,) = [s for s in steps if text in s.get("run", "")]
    return found


def test_workflow_pulls_before_retraining_and_pushes_after_only_with_a_remote() -> None:
    steps = workflow_steps()
    setup = step(steps, "make remote")
    pull, push, retrain = step(steps, "dvc pull"), step(steps, "dvc push"), step(steps, "-m resnet.retrain")
    assert steps.index(setup) < steps.index(pull) < steps.index(retrain) < steps.index(push)
    assert setup["id"] == "remote" and "if" not in setup  # always runs; says whether a remote is set
    assert setup["env"]["DVC_REMOTE_URL"] == "${{ secrets.DVC_REMOTE_URL || vars.DVC_REMOTE_URL }}"
    assert 'make remote URL="$DVC_REMOTE_URL" LOCAL=1' in setup["run"]  # the documented command, --local
    # Credentials only in the step that writes them to .dvc/config.local, never in the others' env.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DVC_SSH_KEY"):
        assert setup["env"][key] == f"${{{{ secrets.{key} }}}}"
        assert all(key not in s.get("env", {}) for s in steps if s is not setup)
    assert "dvc remote modify --local team access_key_id" in setup["run"]
    assert "dvc remote modify --local team keyfile" in setup["run"]
    for s, command in ((pull, "dvc pull --run-cache"), (push, "dvc push --run-cache")):
        assert s["if"] == "steps.remote.outputs.configured == 'true'"  # implies success(): not after a failure
        assert command in s["run"]
    header = WORKFLOW.read_text().split("\nname:", 1)[0]
    for documented in (
        "DVC_REMOTE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "DVC_SSH_KEY",
        "DVC_SSH_KNOWN_HOSTS",
    ):
        assert documented in header, f"the workflow's header does not document {documented}"


def ci_checkout(pushed: Pushed, name: str, *, with_outputs: bool) -> Path:
    """A runner's checkout of the pushed commit: a git clone (nothing DVC-tracked), or a copy of the
    repository as the pipeline left it; the project's venv as ``.venv`` (the workflow's ``make install``)."""
    if with_outputs:
        repo = pushed.tmp / "ci" / name
        shutil.copytree(pushed.repo, repo, symlinks=True)
    else:
        repo = clone(pushed.repo, pushed.tmp / "ci" / name)
    (repo / ".venv").symlink_to(VENV, target_is_directory=True)
    for file in ("pyproject.toml", "constraints.txt"):  # older than the venv's stamp: make keeps it
        shutil.copy(ROOT / file, repo / file)
        os.utime(repo / file, (0, 0))
    return repo


def run_step(repo: Path, script: str, **variables: str) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """A workflow step's script as GitHub runs it (bash -eo pipefail), and what it wrote to $GITHUB_OUTPUT."""
    outputs = repo.parent / f"{repo.name}.github_output"
    outputs.write_text("")
    variables = {"GITHUB_OUTPUT": str(outputs), "HOME": str(repo.parent), **variables}
    r = subprocess.run(
        ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script],
        cwd=repo,
        env=env() | variables,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return r, dict(line.split("=", 1) for line in outputs.read_text().splitlines() if "=" in line)


@needs_tools
@pytest.mark.slow
def test_workflow_steps_push_and_pull_through_a_directory_remote(pushed: Pushed) -> None:
    steps = workflow_steps()
    setup, pull, push = (
        step(steps, "make remote")["run"],
        step(steps, "dvc pull")["run"],
        step(steps, "dvc push")["run"],
    )
    ci_remote = pushed.tmp / "ci-remote"

    # No DVC_REMOTE_URL (a fork's pull request): nothing configured, so no pull or push.
    bare = ci_checkout(pushed, "bare", with_outputs=False)
    r, outputs = run_step(bare, setup, DVC_REMOTE_URL="")
    assert r.returncode == 0 and outputs == {"configured": "false"}, r.stderr
    assert not (bare / ".dvc" / "config.local").exists()

    # A fresh runner and an empty remote: the pull warns, and the job goes on to retrain everything.
    fresh = ci_checkout(pushed, "fresh", with_outputs=False)
    r, outputs = run_step(fresh, setup, DVC_REMOTE_URL=str(ci_remote))
    assert r.returncode == 0 and outputs == {"configured": "true"}, r.stdout + r.stderr
    assert f"url = {ci_remote}" in (fresh / ".dvc" / "config.local").read_text()
    assert run(fresh, "git", "status", "--porcelain", ".dvc").stdout == ""  # .dvc/config as committed
    r, _ = run_step(fresh, pull)
    assert r.returncode == 0 and "::warning title=dvc pull::" in r.stdout, r.stdout + r.stderr
    assert not (fresh / "models" / "best.pt").exists()

    # After a retraining (here: the repository the pipeline ran in) the push sends it all.
    trained = ci_checkout(pushed, "trained", with_outputs=True)
    assert run_step(trained, setup, DVC_REMOTE_URL=str(ci_remote))[1] == {"configured": "true"}
    r, _ = run_step(trained, push)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(object_path(ci_remote, md5).is_file() for md5 in lock_outs(pushed.repo).values())
    assert run_entries(pushed.repo / ".dvc" / "cache") <= run_entries(ci_remote)

    # The next job pulls it: up to date, no stage would run.
    r, _ = run_step(fresh, pull)
    assert r.returncode == 0 and "::warning" not in r.stdout, r.stdout + r.stderr
    assert json.loads(dvc(fresh, "status", "--json").stdout) == {}
    assert file_hashes(fresh) == pushed.hashes
