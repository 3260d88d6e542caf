"""The team's tracking server, for real: PostgreSQL, ``mlflow server`` with basic auth, HTTP only.

One server for the module, started as the README says (``python -m resnet.teamserver``,
which starts a PostgreSQL cluster of its own) on loopback ports, with a user created
through its REST API. The pipeline runs against it with that user's login and no path
to the server's artifact folder; the model registered there is loaded by another
process through the server. Failures: a server that is down or silent, a wrong
password, a server lost in the middle of training. Four registrations at once, and a
queue of two experiments at once. Every process started here is stopped here.

PostgreSQL's server programs are needed (Debian: apt-get install postgresql; .ci/run
installs them): elsewhere the module skips with that reason, but under CI=true it fails.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from paramsets import repo_params
from test_concurrency import MODEL, WORKERS, _at_once
from test_experiments import (
    DVC,
    MODEL_NAME,
    _wait_for_queue,
    commit_all,
    new_pipeline_repo,
    sh,
    tiny_params,
    tool_env,
)
from test_mlflow_ui import _free_port

from resnet import paths, teamserver

USER, PASSWORD = "alice", "alice-password-1"  # MLflow asks for 12 characters at least


def _postgres_missing() -> str | None:
    try:
        teamserver.find_pg_bin()
    except teamserver.ServerError as e:
        return str(e)
    if os.geteuid() == 0 and (shutil.which("runuser") is None or "postgres" not in {u.pw_name for u in pwd.getpwall()}):
        return "as root PostgreSQL runs as the postgres user (Debian's package creates it): not found"
    return None


@dataclass
class Server:
    url: str
    folder: Path
    pg_port: int
    admin: tuple[str, str]

    def client_env(self, user: str = USER, password: str = PASSWORD) -> dict[str, str]:
        """A pipeline's environment as a team member's: the server's URL and a login, nothing else of it."""
        env = tool_env()
        env.update(MLFLOW_TRACKING_URI=self.url, MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
        return env

    def client(self, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        return MlflowClient(self.url, self.url)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    missing = _postgres_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but PostgreSQL is unusable: {missing}")
        pytest.skip(f"needs PostgreSQL: {missing}")
    # Not under pytest's tmp folder: as root, PostgreSQL runs as the postgres user, which must enter it.
    folder = Path(tempfile.mkdtemp(prefix="team-server-"))
    folder.chmod(0o755)
    port, pg_port = _free_port(), _free_port()
    log = (folder / "launcher.log").open("w")
    cmd = [sys.executable, "-m", "resnet.teamserver", "--dir", str(folder), "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--pg-port", str(pg_port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while "team server ready" not in (folder / "launcher.log").read_text():
            assert proc.poll() is None, (folder / "launcher.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the team server did not start in 240 s"
            time.sleep(0.5)
        admin = ("admin", json.loads((folder / "secrets.json").read_text())["admin_password"])
        teamserver.create_user(url, admin, USER, PASSWORD)
        yield Server(url, folder, pg_port, admin)
    finally:
        # As Ctrl-C or a service manager stops it: the launcher stops mlflow server and PostgreSQL.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        text = (folder / "launcher.log").read_text()
        pg = teamserver.Postgres(folder / "postgres", pg_port, "")
        alive = pg.running()
        if alive:
            pg.stop()
        shutil.rmtree(folder, ignore_errors=True)
        assert proc.returncode == 0 and "PostgreSQL stopped" in text and not alive, text[-3000:]
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, "mlflow server outlived its launcher"


def _request(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --------------------------------------------------------------------------- the server


def test_requests_without_a_valid_login_are_refused_and_the_runs_live_in_postgresql(server: Server) -> None:
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert _request(search) == 401
    assert _request(search, (USER, "not-the-password")) == 401
    assert _request(search, (USER, PASSWORD)) == 200
    assert _request(f"{server.url}/health") == 200  # for load balancers and the pipeline's first check
    import psycopg

    password = json.loads((server.folder / "secrets.json").read_text())["postgres_password"]
    pg = teamserver.Postgres(server.folder / "postgres", server.pg_port, password)
    with psycopg.connect(teamserver.libpq_uri(pg.uri("mlflow_auth"))) as conn:
        users = {row[0] for row in conn.execute("SELECT username FROM users")}
    assert {"admin", USER} <= users
    with psycopg.connect(teamserver.libpq_uri(pg.uri("mlflow"))) as conn:
        tables = {row[0] for row in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"experiments", "runs", "metrics", "registered_models"} <= tables
    # The database's password is in no process's command line (which every user of the machine can read).
    cmdlines = []
    for c in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):  # a process that ended meanwhile
            cmdlines.append(c.read_bytes())
    assert any(b"mlflow" in c and b"server" in c for c in cmdlines)
    assert not any(password.encode() in c for c in cmdlines)


def test_a_user_with_a_short_password_or_no_admin_login_is_not_created(server: Server) -> None:
    with pytest.raises(teamserver.ServerError, match="at least 12 characters"):
        teamserver.create_user(server.url, server.admin, "bob", "short")
    with pytest.raises(teamserver.ServerError, match=r"HTTP 40[13]"):
        teamserver.create_user(server.url, (USER, PASSWORD), "bob", "bob-password-12")


def test_the_launcher_refuses_a_database_it_cannot_reach_in_one_line(tmp_path: Path) -> None:
    dead = f"postgresql://mlflow:pw@127.0.0.1:{_free_port()}/mlflow"
    out = subprocess.run(
        [sys.executable, "-m", "resnet.teamserver", "--dir", str(tmp_path), "--database-uri", dead],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "cannot connect to PostgreSQL at postgresql://mlflow:***@127.0.0.1" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and ":pw@" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- failures


def _setup_in_subprocess(uri: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    """What every stage does first (resolve and open the store), in a stage's process; its output and seconds."""
    code = (
        "import sys\nfrom resnet.config import TrackingParams\nfrom resnet.tracking import store\n"
        "from resnet.stage import run_stage\n"
        f"tp = TrackingParams(uri={uri!r}, experiment='e', system_metrics=False, system_metrics_interval=10)\n"
        "sys.exit(run_stage(lambda params: store.setup(tp), params_path=sys.argv[1]))\n"
    )
    params = Path(__file__).parents[1] / "params.yaml"
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code, str(params)], env=env, capture_output=True, text=True, timeout=120
    )
    return out, time.monotonic() - t0


def test_a_server_that_is_down_fails_the_stage_within_30_s_naming_it() -> None:
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    out, seconds = _setup_in_subprocess(uri, tool_env())
    assert out.returncode == 1 and seconds < 30, (seconds, out.stderr)
    assert f"MLflow server {uri} is not answering" in out.stderr and "make server" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_a_server_that_never_answers_fails_the_stage_within_30_s() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        out, seconds = _setup_in_subprocess(uri, tool_env())
    assert out.returncode == 1 and seconds < 30, (seconds, out.stderr)
    assert f"MLflow server {uri} is not answering (timed out)" in out.stderr, out.stderr


def test_a_wrong_password_or_no_login_is_one_line(server: Server) -> None:
    wrong, seconds = _setup_in_subprocess(server.url, server.client_env(password="wrong-password-123"))
    assert wrong.returncode == 1 and seconds < 30, wrong.stderr
    lines = [ln for ln in wrong.stderr.splitlines() if "ERROR" in ln]
    assert lines == [
        f"{lines[0].split(' ERROR ')[0]} ERROR resnet.stage: MLflow server {server.url} refused the password of "
        f"user '{USER}' (401): check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    ], wrong.stderr
    assert "Traceback" not in wrong.stderr
    env = {k: v for k, v in server.client_env().items() if not k.startswith("MLFLOW_TRACKING_")}
    anonymous, _ = _setup_in_subprocess(server.url, env)
    assert anonymous.returncode == 1 and "needs a login: set MLFLOW_TRACKING_USERNAME" in anonymous.stderr


# --------------------------------------------------------------------------- the pipeline


def _server_params(url: str, **train: object) -> dict:
    params = tiny_params()
    params["tracking"].update(uri=url, system_metrics=True, system_metrics_interval=1)
    params["train"].update(train)
    return params


def _dvc(repo: Path, env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sh(repo, DVC, *args, check=check, timeout=900, env=env)


LOAD_AND_PREDICT = r"""
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.load(sys.argv[2])
print(json.dumps([int(p) for p in model.predict(images)["class_index"]]))
"""


@pytest.mark.slow
def test_the_main_job_against_the_server_registers_a_champion_other_processes_load_over_http(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 epochs, seconds of training even on a fast CPU (40 took a 1.3 s training loop on a 2-core AVX-512
    # one): MLflow's monitor publishes a sample only once a whole sampling interval (1 s here) has passed,
    # and the tiny recipe's 6 epochs ended sooner there (the test failed).
    repo = new_pipeline_repo(tmp_path, _server_params(server.url, epochs=100))
    commit_all(repo, "pipeline logging to the team server")
    env = server.client_env()
    _dvc(repo, env, "repro")
    # Nothing of the tracking store on this side: runs, models and artifacts all went over HTTP.
    assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    client = server.client(monkeypatch)
    run_id = json.loads((repo / paths.RUN_FILE).read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    assert (server.folder / "artifacts").is_dir() and any((server.folder / "artifacts").rglob("MLmodel"))
    assert run.data.tags["mlflow.user"] == USER
    # System metrics while training (the param is on by default; sampled every second here).
    trained = json.loads((repo / paths.TRAIN_METRICS).read_text())["train_seconds"]
    assert "system/cpu_utilization_percentage" in run.data.metrics, (f"trained {trained} s", sorted(run.data.metrics))
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    test_json = json.loads((repo / paths.TEST_METRICS).read_text())
    assert run.data.metrics["test_accuracy"] == pytest.approx(test_json["test_accuracy"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == "1" and champion.run_id == run_id

    # Another process, in another folder, with the URL and the login only: the champion over HTTP.
    from resnet.data.store import load_split

    images, labels = load_split(repo / paths.PREPARED, "test")
    np.save(tmp_path / "images.npy", images)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def elsewhere_run(*args: str) -> str:
        out = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    champion_uri = f"models:/{MODEL_NAME}@champion"
    out = elsewhere_run("-c", LOAD_AND_PREDICT, champion_uri, str(tmp_path / "images.npy"))
    predicted = np.array(json.loads(out.strip().splitlines()[-1]))
    assert (predicted == labels).mean() == pytest.approx(test_json["test_accuracy"], abs=1e-6)
    # resnet.predict, as a user runs it, through the same server.
    csv = elsewhere_run("-m", "resnet.predict", "--model", champion_uri, str(tmp_path / "images"))
    assert len(csv.strip().splitlines()) == 1 + 3 * 16  # header + every image of the tiny archive


class Proxy:
    """A TCP relay to the server that the test can cut (the server gone) and restore, on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, _free_port()
        self.conns: list[socket.socket] = []
        self.listener: socket.socket | None = None
        self.lock = threading.Lock()
        self.restore()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self.lock:
            self.listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        assert self.listener is not None
        with self.lock:
            listener, self.listener = self.listener, None
            conns, self.conns = self.conns, []
        # close() alone does not wake a thread blocked in accept() or recv() on Linux: the listener
        # would still take the next connection, and an open one would keep relaying (the client's
        # keep-alive session reaching the server after the "cut"). shutdown() ends both at once.
        for sock in (listener, *conns):
            with_suppressed(lambda sock=sock: sock.shutdown(socket.SHUT_RDWR))
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self.lock:
                if self.listener is not listener:  # cut while this connection was being accepted
                    client.close()
                    return
                upstream = socket.create_connection(self.target)
                self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with_suppressed(b.close)


def with_suppressed(f: Callable[[], object]) -> None:
    with contextlib.suppress(OSError):
        f()


@pytest.mark.slow
def test_the_server_lost_mid_training_keeps_the_checkpoints_and_a_rerun_resumes_into_the_same_run(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    proxy = Proxy(("127.0.0.1", port))
    url = f"http://127.0.0.1:{proxy.port}"
    epochs = 40  # long enough to lose the server in the middle, however late the output shows epoch 3
    repo = new_pipeline_repo(tmp_path, _server_params(url, epochs=epochs, lr=0.1))
    commit_all(repo, "pipeline logging through a relay")
    env = server.client_env()
    env["MLFLOW_TRACKING_URI"] = url
    dvc = subprocess.Popen(
        [DVC, "repro"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(dvc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 600
    while len(re.findall(r"epoch (\d+)/\d+ train_loss", "".join(lines))) < 3:
        assert dvc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
        time.sleep(0.05)
    proxy.cut()
    t_cut = time.monotonic()
    dvc.wait(timeout=300)
    reader.join(10)
    first = "".join(lines)
    assert dvc.returncode != 0, first[-4000:]
    assert time.monotonic() - t_cut < 120, "the stage took minutes to give up on the lost server"
    assert re.search(rf"MLflow store {re.escape(url)} failed while logging epoch \d+", first), first[-4000:]
    assert "checkpoints in models/" in first and "Traceback" not in first, first[-4000:]
    assert (repo / paths.LAST_CHECKPOINT).is_file()
    run_id = json.loads((repo / paths.RUN_FILE).read_text())["run_id"]
    trained_before = [int(e) for e in re.findall(r"epoch (\d+)/\d+ train_loss", first)]

    proxy.restore()
    again = _dvc(repo, env, "repro")
    second = again.stdout + again.stderr
    assert "resuming from models/last.pt" in second, second[-4000:]
    resumed = [int(e) for e in re.findall(r"epoch (\d+)/\d+ train_loss", second)]
    assert resumed and resumed[0] > 1 and resumed[0] <= trained_before[-1] + 1 and resumed[-1] == epochs
    assert json.loads((repo / paths.RUN_FILE).read_text())["run_id"] == run_id
    client = server.client(monkeypatch)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED", run.data.tags
    steps = [m.step for m in client.get_metric_history(run_id, "epoch/val_accuracy")]
    assert sorted(steps) == list(range(1, epochs + 1)), steps  # every epoch once, none lost, none twice
    proxy.cut()


# --------------------------------------------------------------------------- many at once


def test_four_registrations_at_once_on_the_server_keep_every_version_and_the_best_champion(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_tracking import META, _checkpoint

    from resnet import tracking

    monkeypatch.chdir(tmp_path)
    client = server.client(monkeypatch)  # the login, for this process and the workers it starts
    subprocess.run(["git", "init", "-q"], check=True)
    params = repo_params({"tracking.uri": server.url, "tracking.experiment": "race", "tracking.system_metrics": False})
    _checkpoint(Path("models/best.pt"))
    with tracking.start_run(params, META, "cpu", "models/run.json") as run:
        model_uri = tracking.log_model(run, "models/best.pt", np.zeros((2, 16, 16, 3), dtype=np.uint8))
    logged = {"uri": server.url, "run_id": run.run_id, "model_uri": model_uri}
    rng = np.random.default_rng(1)
    values = rng.permutation(np.linspace(0.30, 0.95, WORKERS).round(4))
    answers = _at_once(tmp_path, [{**logged, "action": "register", "model": MODEL, "acc": float(v)} for v in values])
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, WORKERS + 1))
    by_value = {float(v.tags["test_accuracy"]): v.version for v in versions}
    assert client.get_registered_model(MODEL).aliases["champion"] == by_value[max(values)]
    assert sum(a["alias"] == "champion" and a["value"] == max(values) for a in answers) == 1


@pytest.mark.slow
def test_a_queue_of_two_experiments_runs_at_once_against_the_server(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _server_params(server.url, epochs=2)
    params["register"]["model_name"] = "team-queue"
    repo = new_pipeline_repo(tmp_path, params)
    commit_all(repo, "pipeline logging to the team server")
    env = server.client_env()
    sweep = {"team-lr-0.1": "0.1", "team-lr-0.0001": "0.0001"}
    for name, lr in sweep.items():
        _dvc(repo, env, "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}")
    try:
        _dvc(repo, env, "queue", "start", "-j", "2")
        status = _wait_for_queue(repo, sweep, timeout=900)
    finally:
        _dvc(repo, env, "queue", "stop", check=False)
    for name in sweep:
        assert any(name in ln and "Success" in ln for ln in status.splitlines()), (
            status + _dvc(repo, env, "queue", "logs", name, check=False).stdout[-4000:]
        )
        logs = _dvc(repo, env, "queue", "logs", name).stdout
        assert "locked" not in logs and "Traceback" not in logs, logs[-3000:]
    client = server.client(monkeypatch)
    exp = client.get_experiment_by_name("resnet-pipeline")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    for name, lr in sweep.items():
        assert runs[name].info.status == "FINISHED" and runs[name].data.params["train.lr"] == lr
        steps = [m.step for m in client.get_metric_history(runs[name].info.run_id, "epoch/val_accuracy")]
        assert sorted(steps) == list(range(1, 3))
    registered = {v.run_id for v in client.search_model_versions("name='team-queue'")}
    assert {runs[n].info.run_id for n in sweep} <= registered
