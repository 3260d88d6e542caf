"""The team's tracking server: ``mlflow server`` on PostgreSQL, artifacts proxied, basic auth on.

``make server`` (``python -m resnet.teamserver``) keeps everything under one folder
(``team-server/`` by default, git-ignored)::

    team-server/postgres/     a PostgreSQL cluster of its own (unless --database-uri names one)
    team-server/artifacts/    what the server stores for its clients (or --artifacts-destination s3://...)
    team-server/secrets.json  generated once: the admin's and PostgreSQL's passwords, the Flask key
    team-server/basic_auth.ini  MLflow's auth config: users in the second database, mlflow_auth

Clients reach artifacts only through the server (``mlflow-artifacts:/`` URIs over HTTP), so
a laptop or CI runner needs the URL and a user, nothing else. ``add-user`` creates a
user through MLflow's REST API. The server runs in the foreground; Ctrl-C or SIGTERM
stops it and the PostgreSQL it started.

This module starts processes and speaks HTTP; it does not import mlflow (only
``resnet.tracking`` does).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from resnet.utils import PipelineError, setup_logging

__all__ = [
    "ServerError",
    "Postgres",
    "find_pg_bin",
    "auth_ini",
    "mlflow_server_command",
    "create_user",
    "stop_process",
    "main",
]

log = logging.getLogger("resnet.teamserver")

DB_USER = "mlflow"
TRACKING_DB, AUTH_DB = "mlflow", "mlflow_auth"
ADMIN = "admin"
# Team members log into the shared experiment and register models; only their owner
# (MANAGE) or the admin deletes. MLflow's own default, READ, would refuse a second
# member's runs in the experiment the first one created.
DEFAULT_PERMISSION = "EDIT"
AUTH_CACHE_SECONDS = 60


class ServerError(PipelineError):
    """The team server cannot be started or asked: the message says why and what to do."""


# --------------------------------------------------------------------------- PostgreSQL


def find_pg_bin() -> Path:
    """The folder of PostgreSQL's server programs (initdb, pg_ctl): PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if debian:
        return debian[-1].parent
    raise ServerError(
        "PostgreSQL's server programs (initdb, pg_ctl) are not installed: apt-get install postgresql "
        "(or brew install postgresql), or name an existing database with --database-uri"
    )


class Postgres:
    """A PostgreSQL cluster in ``datadir``, listening on loopback only, owned by this module.

    PostgreSQL refuses to run as root: as root, its programs run as the ``postgres``
    system user (Debian's package creates it), which must be able to reach ``datadir``.
    """

    def __init__(self, datadir: Path, port: int, password: str) -> None:
        self.datadir, self.port, self.password = datadir.resolve(), port, password
        self.bin = find_pg_bin()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def uri(self, database: str) -> str:
        password = urllib.parse.quote(self.password, safe="")
        return f"postgresql+psycopg://{DB_USER}:{password}@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        if check and out.returncode != 0:
            raise ServerError(f"{Path(cmd[0]).name} failed: {(out.stderr or out.stdout).strip()[-600:]}")
        return out

    def _prepare_owner(self) -> None:
        if not self.as_user:
            return
        self.datadir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.datadir, "postgres", "postgres")
        self.datadir.chmod(0o700)
        if self._run("test", "-w", str(self.datadir), check=False).returncode != 0:
            raise ServerError(
                f"PostgreSQL runs as the postgres user, which cannot reach {self.datadir} (a folder above it "
                "is private to root): choose a --dir the postgres user can enter (chmod o+x its parents)"
            )

    def init(self) -> None:
        """Create the cluster (once): user ``mlflow`` with a password, scram-sha-256 on every connection."""
        if (self.datadir / "PG_VERSION").exists():
            return
        self._prepare_owner()
        # Beside the data folder: initdb wants that folder empty.
        pwfile = self.datadir.with_name(".pg-pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres", "postgres")
        try:
            self._run(
                str(self.bin / "initdb"), "-D", str(self.datadir), "-U", DB_USER, f"--pwfile={pwfile}",
                "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        log.info("created a PostgreSQL cluster in %s", self.datadir)

    def start(self) -> None:
        """Start the cluster on 127.0.0.1:<port> (its socket in the data folder) and create the two databases."""
        self._prepare_owner()
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.datadir}"
        out = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.datadir / "server.log"),
            "-o", opts, "-w", "-t", "60", "start", check=False,
        )  # fmt: skip
        if out.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = " ".join((self.datadir / "server.log").read_text().splitlines()[-3:])
            raise ServerError(f"PostgreSQL did not start on port {self.port}: {tail or out.stderr.strip()[-400:]}")
        log.info("PostgreSQL on 127.0.0.1:%d", self.port)
        for db in (TRACKING_DB, AUTH_DB):
            create_database(self.uri("postgres"), db)

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", "fast", "-w", "stop", check=False)
        log.info("PostgreSQL stopped")

    def running(self) -> bool:
        return self._run(str(self.bin / "pg_ctl"), "-D", str(self.datadir), "status", check=False).returncode == 0


def create_database(admin_uri: str, name: str) -> None:
    """``CREATE DATABASE name`` unless it exists, through a connection to ``admin_uri``."""
    import psycopg  # the server's dependency only: clients speak HTTP

    where = _redact(libpq_uri(admin_uri))
    try:
        # CREATE DATABASE runs outside a transaction; libpq knows postgresql:// without SQLAlchemy's "+psycopg".
        conn = psycopg.connect(libpq_uri(admin_uri), connect_timeout=10, autocommit=True)
    except psycopg.Error as e:
        raise ServerError(f"cannot connect to PostgreSQL at {where}: {_one_line(e)}") from e
    try:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
            conn.execute(f'CREATE DATABASE "{name}"')
            log.info("created database %s", name)
    except psycopg.Error as e:
        raise ServerError(f"cannot create database {name} at {where}: {_one_line(e)}") from e
    finally:
        conn.close()


def sqlalchemy_uri(uri: str) -> str:
    """``postgresql+psycopg://``: SQLAlchemy with psycopg 3 (installed), whatever its default driver."""
    scheme, rest = uri.split("://", 1)
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else uri


def libpq_uri(uri: str) -> str:
    scheme, rest = uri.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgresql+") else uri


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _redact(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _with_database(uri: str, database: str) -> str:
    return urllib.parse.urlunsplit(urllib.parse.urlsplit(uri)._replace(path=f"/{database}"))


# --------------------------------------------------------------------------- MLflow


def auth_ini(database_uri: str) -> str:
    """MLflow's basic-auth config: users in ``database_uri``; the admin comes from the environment."""
    # configparser reads % as interpolation: a password with % in the URI must be doubled.
    return (
        "[mlflow]\n"
        f"default_permission = {DEFAULT_PERMISSION}\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Checking a password (PBKDF2) takes 0.3-0.6 s of a 2-core server's CPU, on every request: a
        # training logs several per epoch. Cached per worker for a minute: a changed password or a
        # removed user may still pass on another worker for that long (MLflow's basic_auth.ini).
        f"auth_cache_ttl_seconds = {AUTH_CACHE_SECONDS}\n"
    )


def mlflow_server_command(artifacts: str, host: str, port: int, allowed_hosts: str | None = None) -> list[str]:
    """``mlflow server`` with artifacts proxied to ``artifacts`` and basic auth on.

    The store's URI (its password inside) goes in MLFLOW_BACKEND_STORE_URI, not on the command
    line, where every user of the machine could read it (ps).
    """
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server"]
    cmd += ["--serve-artifacts", "--artifacts-destination", artifacts, "--app-name", "basic-auth"]
    cmd += ["--host", host, "--port", str(port)]
    if allowed_hosts:  # MLflow 3 refuses Host headers other than localhost's unless listed
        cmd += ["--allowed-hosts", allowed_hosts]
    return cmd


def _secrets(folder: Path) -> dict[str, str]:
    """The server's generated secrets (created once, readable by this user only); the env's admin password wins."""
    path = folder / "secrets.json"
    if path.exists():
        saved = json.loads(path.read_text())
    else:
        saved = {k: secrets.token_urlsafe(24) for k in ("admin_password", "postgres_password", "flask_secret_key")}
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f, indent=2)
    if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        saved["admin_password"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    return saved


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerError(f"mlflow server exited with status {proc.returncode} before answering on {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            if r.status == 200:
                return
        if time.monotonic() > deadline:
            raise ServerError(f"mlflow server did not answer on {url}/health within {timeout:.0f} s")
        time.sleep(0.5)


@contextlib.contextmanager
def _terminated_on_signal() -> Iterator[None]:
    """SIGTERM and SIGINT end the server, so PostgreSQL is stopped either way.

    SIGINT too: a shell starts a background job (``make server &``) with SIGINT ignored, and
    Python then raises no KeyboardInterrupt for it.
    """

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve(args: argparse.Namespace) -> int:
    """Start PostgreSQL (unless --database-uri), then mlflow server; run until interrupted."""
    folder = Path(args.dir).resolve()
    keys = _secrets(folder)
    pg = None
    with _terminated_on_signal(), contextlib.ExitStack() as stack:
        try:
            if args.database_uri:
                backend = sqlalchemy_uri(args.database_uri)
                auth = _with_database(backend, AUTH_DB)
                create_database(backend, AUTH_DB)
            else:
                pg = Postgres(folder / "postgres", args.pg_port, keys["postgres_password"])
                pg.init()
                pg.start()
                stack.callback(pg.stop)
                backend, auth = pg.uri(TRACKING_DB), pg.uri(AUTH_DB)
            ini = folder / "basic_auth.ini"
            ini.write_text(auth_ini(auth))
            ini.chmod(0o600)
            artifacts = args.artifacts_destination or str(folder / "artifacts")
            env = {
                **os.environ,
                "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN,
                "MLFLOW_AUTH_ADMIN_PASSWORD": keys["admin_password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": keys["flask_secret_key"],
                "MLFLOW_BACKEND_STORE_URI": backend,
            }
            cmd = mlflow_server_command(artifacts, args.host, args.port, args.allowed_hosts)
            proc = subprocess.Popen(cmd, env=env, start_new_session=True)
            stack.callback(stop_process, proc)
            url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
            wait_until_healthy(url, proc)
            log.info("MLflow team server ready at %s (store %s, artifacts %s)", url, _redact(backend), artifacts)
            log.info("admin user %r; its password is in %s", ADMIN, folder / "secrets.json")
            log.info(
                "clients: export MLFLOW_TRACKING_URI=%s MLFLOW_TRACKING_USERNAME=... MLFLOW_TRACKING_PASSWORD=...", url
            )
            return proc.wait()
        except KeyboardInterrupt:
            log.info("stopping the team server")
            return 0
        except ServerError as e:
            log.error("%s", e)
            return 1


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group ``proc`` leads (started with start_new_session), SIGKILL after 30 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def create_user(url: str, admin: tuple[str, str], username: str, password: str) -> None:
    """Create a user through the server's basic-auth REST API, as the admin."""
    body = json.dumps({"username": username, "password": password}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/api/2.0/mlflow/users/create", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    token = base64.b64encode(f"{admin[0]}:{admin[1]}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30):
            return
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace").strip()[:300]
        raise ServerError(f"{url} refused to create user {username!r} (HTTP {e.code}: {detail})") from e
    except OSError as e:
        raise ServerError(f"cannot reach the MLflow server at {url}: {e}; is it running (make server)?") from e


def add_user(args: argparse.Namespace) -> int:
    """Create a team member: the password from RESNET_NEW_USER_PASSWORD, else asked for."""
    admin_password = os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD")
    if not admin_password:
        path = Path(args.dir) / "secrets.json"
        if not path.exists():
            log.error("no admin password: set MLFLOW_AUTH_ADMIN_PASSWORD or run this beside %s", path)
            return 1
        admin_password = json.loads(path.read_text())["admin_password"]
    password = os.environ.get("RESNET_NEW_USER_PASSWORD") or getpass.getpass(f"password for {args.username}: ")
    try:
        create_user(args.url, (ADMIN, admin_password), args.username, password)
    except ServerError as e:
        log.error("%s", e)
        return 1
    log.info("created user %r on %s", args.username, args.url)
    return 0


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m resnet.teamserver", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="start PostgreSQL and mlflow server (the default command)")
    run.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    run.add_argument("--port", type=int, default=5000)
    run.add_argument("--allowed-hosts", help="Host headers to accept besides localhost's, e.g. mlflow.example.com")
    run.add_argument("--pg-port", type=int, default=5433, help="port of the PostgreSQL this command starts")
    run.add_argument("--database-uri", help="an existing PostgreSQL database instead (postgresql://user:pw@host/db)")
    run.add_argument("--artifacts-destination", help="where artifacts go: a folder or s3://bucket/path")
    user = sub.add_parser("add-user", help="create a team member's login (password: RESNET_NEW_USER_PASSWORD or asked)")
    user.add_argument("username")
    user.add_argument("--url", default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"))
    for p in (run, user):
        p.add_argument("--dir", default="team-server", help="the server's folder (default: team-server)")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("serve", "add-user", "-h", "--help"):
        argv = ["serve", *argv]
    args = parser.parse_args(argv)
    return add_user(args) if args.command == "add-user" else serve(args)


if __name__ == "__main__":
    sys.exit(main())
