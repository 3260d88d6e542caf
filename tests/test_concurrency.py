"""Processes that meet at the same store at the same moment, as ``dvc queue start -j N`` makes them.

* Four processes opening a new SQLite store at once all succeed (MLflow creates the
  schema without a lock of its own: 3 of 4 failed in ``ALTER TABLE``).
* Four registrations at once, round after round, lose no version and end with exactly
  one champion, the best version; with the machine-local lock switched off too (what a
  tracking server's clients on several machines get), the champion still settles on the
  best version.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from paramsets import repo_params

from resnet import tracking

WORKERS = 4
MODEL = "race"

# Each worker imports everything, says "ready", waits for the go file, then acts at once.
WORKER = r"""
import contextlib, json, sys, time
from pathlib import Path
args = json.loads(sys.argv[1])
from resnet.config import TrackingParams
from resnet.tracking import registry, store
if args.get("no_lock"):
    # As clients of a tracking server on several machines: no shared lock, and answers that
    # arrive late (up to 0.3 s), so every read of the aliases may be stale by then.
    import random
    from mlflow.tracking import MlflowClient
    registry.store_lock = lambda uri, what: contextlib.nullcontext()
    _get = MlflowClient.get_registered_model
    def _late(self, name):
        answer = _get(self, name)
        time.sleep(random.uniform(0.0, 0.3))
        return answer
    MlflowClient.get_registered_model = _late
print("ready", flush=True)
go = Path(args["go"])
while not go.exists():
    time.sleep(0.001)
if args["action"] == "setup":
    tp = TrackingParams(uri=args["uri"], experiment="race", system_metrics=False, system_metrics_interval=10)
    print(json.dumps({"experiment_id": store.setup(tp)}))
else:
    store.point_mlflow_at(args["uri"])
    run = registry.PipelineRun(args["run_id"], "0", args["uri"])
    metrics = {"test_accuracy": args["acc"]}
    result = registry.register_model(run, args["model_uri"], args["model"], "test_accuracy", metrics)
    print(json.dumps(result))
"""


def _at_once(tmp: Path, jobs: list[dict]) -> list[dict]:
    """Run one worker per job, release them together; each job's JSON answer (all must exit 0)."""
    go = tmp / f"go-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, json.dumps({**job, "go": str(go)})],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for job in jobs
    ]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    go.touch()
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        answers.append(json.loads(out.strip().splitlines()[-1]))
    return answers


def test_four_processes_creating_a_new_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    answers = _at_once(tmp_path, [{"action": "setup", "uri": uri}] * WORKERS)
    assert len({a["experiment_id"] for a in answers}) == 1
    assert MlflowClient(uri).get_experiment_by_name("race") is not None


@pytest.fixture()
def logged_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A pipeline run with a logged pyfunc model in a SQLite store under tmp_path."""
    from test_tracking import META, _checkpoint

    monkeypatch.chdir(tmp_path)
    subprocess.run(["git", "init", "-q"], check=True)
    params = repo_params()
    _checkpoint(Path("models/best.pt"))
    with tracking.start_run(params, META, "cpu", "models/run.json") as run:
        images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
        model_uri = tracking.log_model(run, "models/best.pt", images)
    return {"uri": tracking.resolve_tracking_uri(params.tracking), "run_id": run.run_id, "model_uri": model_uri}


@pytest.mark.parametrize("no_lock", [False, True], ids=["sqlite-lock", "no-lock"])
def test_four_registrations_at_once_keep_every_version_and_end_with_the_best_champion(
    tmp_path: Path, logged_model: dict, no_lock: bool
) -> None:
    rng = np.random.default_rng(0)
    # Each round's four values all beat the champion so far (a real contest every round), in an order
    # shuffled so that the round's best is a different worker each time.
    values = np.array([rng.permutation(row) for row in np.linspace(0.30, 0.95, 3 * WORKERS).round(4).reshape(3, -1)])
    client = MlflowClient(logged_model["uri"])
    seen: list[float] = []
    for round_values in values:
        jobs = [
            {**logged_model, "action": "register", "model": MODEL, "acc": float(v), "no_lock": no_lock}
            for v in round_values
        ]
        answers = _at_once(tmp_path, jobs)
        seen += [float(v) for v in round_values]
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert sorted(int(v.version) for v in versions) == list(range(1, len(seen) + 1))
        by_value = {float(v.tags["test_accuracy"]): int(v.version) for v in versions}
        champion = int(client.get_registered_model(MODEL).aliases["champion"])
        assert champion == by_value[max(seen)], (seen, champion)
        # The worker with the round's best value reports champion exactly when it beat the earlier rounds
        # (the others may report champion too: one that registered first in the round held it for a while).
        best = max(answers, key=lambda a: a["value"])
        assert (best["alias"] == "champion") == (best["value"] == max(seen))
