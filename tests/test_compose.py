"""deploy/compose/: the team's PostgreSQL + MLflow server for Docker Compose, checked without a Docker engine.

* Syntax: compose.yaml validates against the Compose Specification's JSON schema
  (vendor/compose-spec/, compose-spec/compose-spec), before and after variable interpolation;
  broken copies are rejected.
* Variables: every ${VAR} is documented in .env.example and has a default or a required-error
  form; a missing password stops compose with a message; .env.example ships no secret.
* Meaning: the mlflow service's command, as the installed ``mlflow server`` parses it in the
  environment entrypoint.py gives it, runs basic auth on a PostgreSQL store with proxied
  artifacts on 0.0.0.0, on the port published and health-checked; it waits for a healthy
  postgres whose init script creates the databases the URIs name.
* The Dockerfile installs the MLflow version the project's clients run.
* entrypoint.py writes an auth config that MLflow's own reader parses back, credentials intact.
* End to end (slow, where PostgreSQL's server programs are installed): the init script, the
  entrypoint and the compose command run against a real PostgreSQL; the README's user creation
  and client settings work.
"""

from __future__ import annotations

import base64
import configparser
import contextlib
import copy
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from resnet.teamserver import stop_process

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
ENTRYPOINT = COMPOSE_DIR / "entrypoint.py"
SCHEMA_DIR = REPO / "vendor" / "compose-spec"

# What a team writes into .env: the example's settings, the three secrets filled in (the database
# password with characters that a URI and configparser would otherwise take for syntax).
SECRETS = {
    "POSTGRES_PASSWORD": "p@ss:w/rd%41?&=x",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-Secret-123",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-secret-key-0123456789",
}


# --- Compose's variable syntax ------------------------------------------------------------------

_REF = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.DOTALL)


class InterpolationError(Exception):
    """Compose would refuse the file: a ${VAR:?message} variable is missing, or a reference is malformed."""


@dataclass(frozen=True)
class Ref:
    name: str
    op: str | None  # None (plain), ":-" / "-" (default), ":?" / "?" (required), ":+" / "+" (alternative)
    arg: str


def _parse_braced(body: str) -> Ref:
    m = _BRACED.fullmatch(body)
    if not m:
        raise InterpolationError(f"invalid interpolation format: ${{{body}}}")
    return Ref(m["name"], m["op"], m["arg"] or "")


def references(text: str) -> list[Ref]:
    """The ${VAR...} and $VAR references in ``text``; ``$$`` is a literal dollar."""
    refs = []
    for m in _REF.finditer(text):
        if m["braced"] is not None:
            refs.append(_parse_braced(m["braced"]))
        elif m["named"]:
            refs.append(Ref(m["named"], None, ""))
    if "$" in _REF.sub("", text):
        raise InterpolationError(f"a lone '$' or an unclosed '${{' in {text!r} (write $$ for a literal dollar)")
    return refs


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute as Docker Compose does: ${V}, ${V:-d}, ${V-d}, ${V:?err}, ${V?err}, ${V:+a}, ${V+a}, $$."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        ref = _parse_braced(m["braced"]) if m["braced"] is not None else Ref(m["named"], None, "")
        is_set = ref.name in env
        value = env.get(ref.name, "")
        if ref.op in (":-", "-"):
            use_default = not value if ref.op == ":-" else not is_set
            return interpolate(ref.arg, env) if use_default else value
        if ref.op in (":?", "?"):
            if not value if ref.op == ":?" else not is_set:
                raise InterpolationError(f"required variable {ref.name} is missing a value: {ref.arg}")
            return value
        if ref.op in (":+", "+"):
            use_alt = bool(value) if ref.op == ":+" else is_set
            return interpolate(ref.arg, env) if use_alt else ""
        return value

    references(text)  # rejects malformed references
    return _REF.sub(sub, text)


def interpolate_tree(node: object, env: dict[str, str]) -> object:
    """Interpolate every string value of a loaded compose file (keys are left alone, as compose does)."""
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(v, env) for v in node]
    if isinstance(node, str):
        return interpolate(node, env)
    return node


def parse_dotenv(text: str) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped (the subset of compose's .env syntax .env.example uses)."""
    env = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"line {n}: not KEY=VALUE: {line!r}")
        env[key.strip()] = value.strip()
    return env


def all_strings(node: object) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in all_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in all_strings(v)]
    return [node] if isinstance(node, str) else []


def variable_problems(compose: dict, documented: dict[str, str]) -> list[str]:
    """Variables a team could not set from .env.example, or that would silently come out empty."""
    problems = []
    for text in all_strings(compose):
        for ref in references(text):
            if ref.name not in documented:
                problems.append(f"{ref.name} (in {text!r}) is not in .env.example")
            elif ref.op is None and not documented[ref.name]:
                problems.append(f"{ref.name} has no default, no required-error form and no value in .env.example")
    return problems


# --- The files ---------------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _example_env() -> dict[str, str]:
    return parse_dotenv(ENV_EXAMPLE.read_text())


def _team_env() -> dict[str, str]:
    return {**_example_env(), **SECRETS}


def _interpolated(env: dict[str, str] | None = None) -> dict:
    return interpolate_tree(_compose(), _team_env() if env is None else env)


def _schema() -> dict:
    return json.loads((SCHEMA_DIR / "compose-spec.json").read_text())


def schema_errors(compose: object) -> list[str]:
    validator = jsonschema.Draft7Validator(_schema())
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]


def pinned_mlflow(dockerfile: str) -> tuple[str, set[str]] | None:
    """Version and extras of the Dockerfile's ``pip install ... mlflow[extras]==X`` (None when unpinned or absent)."""
    m = re.search(r"""pip install\b[^\n]*?(?<![\w-])mlflow(?:\[([\w,\s-]*)\])?==([0-9][0-9A-Za-z.+-]*)""", dockerfile)
    if not m:
        return None
    return m[2], {e.strip() for e in (m[1] or "").split(",") if e.strip()}


def dockerignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore's patterns keep ``path`` out of the build context (the last match decides)."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        if fnmatch.fnmatch(path, pattern.lstrip("!")):
            ignored = not negate
    return ignored


def _patterns(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


# --- (a) syntax: the Compose Specification schema --------------------------------------------------


def test_vendored_schema_is_the_recorded_official_copy() -> None:
    schema = _schema()
    assert schema["title"] == "Compose Specification"
    assert schema["$schema"].startswith("https://json-schema.org/draft-07/")
    jsonschema.Draft7Validator.check_schema(schema)
    readme = (SCHEMA_DIR / "README.md").read_text()
    recorded = re.search(r"sha256 `([0-9a-f]{64})`", readme)
    assert recorded, "vendor/compose-spec/README.md must record the schema's sha256"
    assert hashlib.sha256((SCHEMA_DIR / "compose-spec.json").read_bytes()).hexdigest() == recorded[1]
    assert "compose-spec/compose-spec" in readme and re.search(r"\b[0-9a-f]{40}\b", readme)
    assert "Apache License" in (SCHEMA_DIR / "LICENSE").read_text()
    assert "Compose Specification Authors" in (SCHEMA_DIR / "NOTICE").read_text()


def test_compose_file_is_valid_compose_specification() -> None:
    compose = _compose()
    assert "version" not in compose, "the top-level version key is obsolete in the Compose Specification"
    assert schema_errors(compose) == []  # as written
    assert schema_errors(_interpolated()) == []  # as compose validates it, variables substituted


def _break(mutate) -> dict:
    compose = copy.deepcopy(_compose())
    mutate(compose)
    return compose


BROKEN = {
    "misspelt healthcheck key": lambda c: c["services"]["postgres"]["healthcheck"].update(intervall="5s"),
    "unknown depends_on condition": lambda c: c["services"]["mlflow"]["depends_on"]["postgres"].update(
        condition="service_ready"
    ),
    "unknown service key": lambda c: c["services"]["mlflow"].update(volume=["x:/y"]),
    "command as a mapping": lambda c: c["services"]["mlflow"].update(command={"mlflow": "server"}),
    "services as a list": lambda c: c.update(services=[c["services"]["mlflow"]]),
    "misspelt volume key": lambda c: c["volumes"].update({"postgres-data": {"drivr": "local"}}),
    "port mapping with an unknown key": lambda c: c["services"]["mlflow"].update(
        ports=[{"target": 5000, "publishd": 1}]
    ),
}


@pytest.mark.parametrize("how", BROKEN)
def test_schema_rejects_broken_compose_files(how: str) -> None:
    assert schema_errors(_break(BROKEN[how])), f"a compose file with a {how} passed the schema"


# --- (b) interpolation: .env.example and the variables compose.yaml uses ---------------------------


def test_every_variable_is_documented_and_has_a_default_or_a_required_error() -> None:
    compose, documented = _compose(), _example_env()
    assert variable_problems(compose, documented) == []
    used = {ref.name for text in all_strings(compose) for ref in references(text)}
    assert set(SECRETS) <= used
    # Documented settings that compose.yaml does not use would mislead a team.
    assert set(documented) - used == set()


def test_the_variable_check_catches_an_unknown_or_bare_variable() -> None:
    compose, documented = _compose(), _example_env()
    compose["services"]["mlflow"]["environment"]["EXTRA"] = "${NOT_IN_ENV_EXAMPLE:-x}"
    compose["services"]["mlflow"]["environment"]["BARE"] = "${AWS_DEFAULT_REGION}"  # empty in .env.example
    problems = variable_problems(compose, documented)
    assert len(problems) == 2 and "NOT_IN_ENV_EXAMPLE" in problems[0] and "AWS_DEFAULT_REGION" in problems[1]
    for malformed in ("costs $ 5", "${UNCLOSED", "$1"):
        with pytest.raises(InterpolationError, match="lone"):
            references(malformed)


def test_secrets_are_required_and_never_shipped() -> None:
    example = _example_env()
    for name in SECRETS:
        assert example[name] == "", f".env.example must not ship a value for {name}"
    for name, value in example.items():
        if re.search(r"PASSWORD|SECRET", name):
            assert value == "", f".env.example ships a value for {name}"
        assert not re.search(r"""[$#"'\s]""", value), f"{name}: keep $, #, quotes and spaces out of .env values"
    # Each secret is required where it is used: ${VAR:?message}, not a default.
    for text in all_strings(_compose()):
        for ref in references(text):
            if ref.name in SECRETS:
                assert ref.op == ":?" and ".env" in ref.arg, text
    assert (COMPOSE_DIR / ".gitignore").read_text().split("\n").count(".env") == 1


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_a_missing_secret_stops_compose_with_a_message(missing: str) -> None:
    env = _team_env()
    env[missing] = ""  # as in an unedited copy of .env.example
    with pytest.raises(InterpolationError, match=rf"{missing} is missing a value: set {missing} in \.env"):
        _interpolated(env)
    del env[missing]
    with pytest.raises(InterpolationError, match=missing):
        _interpolated(env)


def test_interpolation_follows_compose_rules() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} $SET $$SET", env) == "v d  d v $SET"
    assert interpolate("${SET:+alt}|${EMPTY:+alt}|${EMPTY+alt}", env) == "alt||alt"
    with pytest.raises(InterpolationError, match="EMPTY is missing a value: say so"):
        interpolate("${EMPTY:?say so}", env)
    assert interpolate("${EMPTY?fine}", env) == ""
    with pytest.raises(InterpolationError, match="invalid"):
        interpolate("${1BAD}", env)


# --- (c) meaning ------------------------------------------------------------------------------------


def _service(name: str, env: dict[str, str] | None = None) -> dict:
    return _interpolated(env)["services"][name]


def run_entrypoint(env: dict[str, str], tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, str]]:
    """Run entrypoint.py with ``env`` and, as the command it execs, a Python that dumps its environment."""
    dump = tmp_path / "exec-env.json"
    cmd = [
        sys.executable,
        str(ENTRYPOINT),
        sys.executable,
        "-c",
        f"import json, os; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    return out, (json.loads(dump.read_text()) if dump.exists() else {})


def _container_env(tmp_path: Path, team_env: dict[str, str] | None = None) -> dict[str, str]:
    """The mlflow container's environment: compose.yaml's, interpolated, the auth config path moved to tmp_path."""
    environment = _service("mlflow", team_env)["environment"]
    assert isinstance(environment, dict)
    env = {k: str(v) for k, v in environment.items()}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "run" / "basic_auth.ini")
    env["PATH"] = os.environ["PATH"]
    return env


def _server_params(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """``command`` (mlflow server ...) as the installed MLflow's CLI parses it in ``env``."""
    from mlflow.cli import server

    assert command[:2] == ["mlflow", "server"]
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return server.make_context("server", list(command[2:])).params


def test_mlflow_command_runs_basic_auth_on_postgres_with_proxied_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = _interpolated()
    mlflow_svc = compose["services"]["mlflow"]
    out, env = run_entrypoint(_container_env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stderr
    params = _server_params(mlflow_svc["command"], env, monkeypatch)

    backend = urlsplit(params["backend_store_uri"])
    assert backend.scheme == "postgresql+psycopg" and backend.hostname == "postgres" and backend.port == 5432
    assert params["serve_artifacts"] is True and params["artifacts_only"] is False
    assert params["app_name"] == "basic-auth"
    assert params["host"] == "0.0.0.0"
    assert "--backend-store-uri" not in mlflow_svc["command"], "the password would show in the process list"

    # The port MLflow listens on is the one published and the one health-checked.
    port = params["port"]
    assert [p.split(":")[-1] for p in mlflow_svc["ports"]] == [str(port)]
    assert mlflow_svc["ports"] == [f"5000:{port}"]
    health = mlflow_svc["healthcheck"]["test"]
    url = re.search(r"https?://[^'\" ]+", " ".join(health))[0]
    assert urlsplit(url).port == port and urlsplit(url).path == "/health"
    compile(health[-1], "healthcheck", "exec")  # CMD python -c "...": the code compiles
    assert health[:3] == ["CMD", "python", "-c"]

    # Artifacts: by default in the named volume mounted where the server writes them.
    assert params["artifacts_destination"] == "/mlartifacts"
    assert "mlflow-artifacts:/mlartifacts" in mlflow_svc["volumes"]
    assert "mlflow-artifacts" in compose["volumes"] and "postgres-data" in compose["volumes"]
    assert mlflow_svc["restart"] == compose["services"]["postgres"]["restart"] == "unless-stopped"


def test_an_s3_destination_switches_the_artifact_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    team = {**_team_env(), "MLFLOW_ARTIFACTS_DESTINATION": "s3://team-bucket/mlflow", "AWS_ACCESS_KEY_ID": "AKIDX"}
    out, env = run_entrypoint(_container_env(tmp_path, team), tmp_path)
    assert out.returncode == 0, out.stderr
    params = _server_params(_service("mlflow", team)["command"], env, monkeypatch)
    assert params["artifacts_destination"] == "s3://team-bucket/mlflow"
    assert env["AWS_ACCESS_KEY_ID"] == "AKIDX"
    # Unset in .env: not passed on empty (boto3 would take an empty key or endpoint for a setting).
    assert "AWS_SECRET_ACCESS_KEY" not in env and "MLFLOW_S3_ENDPOINT_URL" not in env
    assert "MLFLOW_SERVER_ALLOWED_HOSTS" not in env


def test_mlflow_waits_for_a_healthy_postgres() -> None:
    compose = _interpolated()
    assert compose["services"]["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    pg = compose["services"]["postgres"]
    assert re.fullmatch(r"postgres:1[56](\.\d+)*", pg["image"])
    assert "postgres-data:/var/lib/postgresql/data" in pg["volumes"]
    test = pg["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("pg_isready ")
    assert "-h 127.0.0.1" in test[1], "over TCP, so init scripts have finished before it reports healthy"
    # "$${POSTGRES_USER}" in the file reaches the container's shell as ${POSTGRES_USER}: its variable.
    assert '"${POSTGRES_USER}"' in test[1] and "POSTGRES_USER" in pg["environment"]
    assert subprocess.run(["sh", "-n", "-c", test[1]], capture_output=True).returncode == 0
    # Both services log in as the same PostgreSQL user with the same password.
    mlflow_env = compose["services"]["mlflow"]["environment"]
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD"):
        assert pg["environment"][name] == mlflow_env[name] != ""
    assert mlflow_env["POSTGRES_HOST"] == "postgres" and mlflow_env["POSTGRES_PORT"] == "5432"


def _init_scripts(pg: dict) -> list[Path]:
    mounts = [v for v in pg["volumes"] if v.split(":")[1] == "/docker-entrypoint-initdb.d"]
    assert len(mounts) == 1, pg["volumes"]
    folder = (COMPOSE_DIR / mounts[0].split(":")[0]).resolve()
    scripts = sorted(folder.iterdir())
    assert scripts and all(s.suffix in (".sql", ".sh") for s in scripts)
    return scripts


def test_the_init_script_creates_the_databases_the_uris_name(tmp_path: Path) -> None:
    pg = _service("postgres")
    created = {pg["environment"]["POSTGRES_DB"]}  # the image creates POSTGRES_DB itself
    for script in _init_scripts(pg):
        created |= set(re.findall(r"CREATE\s+DATABASE\s+\"?(\w+)", script.read_text(), re.IGNORECASE))
    out, env = run_entrypoint(_container_env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stderr
    ini = configparser.ConfigParser()
    ini.read(env["MLFLOW_AUTH_CONFIG_PATH"])
    named = {urlsplit(uri).path.lstrip("/") for uri in (env["MLFLOW_BACKEND_STORE_URI"], ini["mlflow"]["database_uri"])}
    assert named == {"mlflow", "mlflow_auth"}
    assert named <= created, f"the URIs name {named}, PostgreSQL gets {created}"


# --- (d) the image's MLflow is the clients' ------------------------------------------------------------


def test_dockerfile_pins_the_mlflow_the_clients_run() -> None:
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    installed = importlib.metadata.version("mlflow")
    pinned = pinned_mlflow(dockerfile)
    assert pinned and pinned[0] == installed, f"the server image must run mlflow=={installed}, as the clients"
    # --app-name basic-auth needs the auth extra's packages (Flask-WTF), which plain mlflow lacks.
    assert "auth" in pinned[1], "install mlflow[auth]: the basic-auth app needs its extra"
    assert any('extra == "auth"' in r for r in importlib.metadata.requires("mlflow") or [])
    assert _compose()["services"]["mlflow"]["image"].endswith(f":{installed}")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    install = next(ln for ln in dockerfile.splitlines() if ln.startswith("RUN pip install"))
    assert "psycopg[binary]" in install and "boto3" in install
    assert "COPY entrypoint.py " in dockerfile and "mlflow-entrypoint.py" in dockerfile.split("ENTRYPOINT")[1]
    mlflow_svc = _compose()["services"]["mlflow"]
    assert mlflow_svc["build"]["context"] == "." and (COMPOSE_DIR / mlflow_svc["build"]["dockerfile"]).is_file()
    # The build context holds entrypoint.py; the team's .env stays out of it.
    ignore = _patterns((COMPOSE_DIR / ".dockerignore").read_text())
    assert dockerignored(ignore, ".env") and not dockerignored(ignore, "entrypoint.py")


def test_the_version_check_notices_a_different_or_missing_pin() -> None:
    assert pinned_mlflow('RUN pip install "mlflow==3.1.0" boto3') == ("3.1.0", set())
    assert pinned_mlflow('RUN pip install "mlflow[auth,extras]==3.17.2"') == ("3.17.2", {"auth", "extras"})
    assert pinned_mlflow("RUN pip install mlflow psycopg[binary]") is None
    assert pinned_mlflow("RUN pip install mlflow-skinny==3.17.2") is None
    assert pinned_mlflow("RUN pip install my-mlflow==3.17.2") is None
    assert pinned_mlflow('RUN pip install "mlflow>=3.17.2"') is None
    assert dockerignored(["*", "!entrypoint.py"], ".env") and not dockerignored([".git"], ".env")


# --- (e) entrypoint.py: the auth config it renders ----------------------------------------------------


def test_entrypoint_renders_an_auth_config_mlflow_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.auth.config import read_auth_config
    from sqlalchemy.engine import make_url

    out, env = run_entrypoint(_container_env(tmp_path), tmp_path)
    assert out.returncode == 0, out.stderr
    ini = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert ini.stat().st_mode & 0o777 == 0o600

    parser = configparser.ConfigParser()  # as MLflow reads it: with configparser's % interpolation
    parser.read(ini)
    assert parser["mlflow"]["default_permission"] == "EDIT"
    assert parser["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", env["MLFLOW_AUTH_ADMIN_USERNAME"])
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", env["MLFLOW_AUTH_ADMIN_PASSWORD"])
    config = read_auth_config()
    assert config.default_permission == "EDIT"
    assert config.admin_username == "admin" and config.admin_password == SECRETS["MLFLOW_AUTH_ADMIN_PASSWORD"]
    for uri, database in ((config.database_uri, "mlflow_auth"), (env["MLFLOW_BACKEND_STORE_URI"], "mlflow")):
        url = make_url(uri)
        assert (url.drivername, url.host, url.port, url.database) == ("postgresql+psycopg", "postgres", 5432, database)
        assert (url.username, url.password) == ("mlflow", SECRETS["POSTGRES_PASSWORD"])  # quoted, then unquoted
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == SECRETS["MLFLOW_FLASK_SERVER_SECRET_KEY"]


def test_entrypoint_permissions_are_mlflows() -> None:
    from mlflow.server.auth.permissions import ALL_PERMISSIONS

    source = ENTRYPOINT.read_text()
    listed = re.search(r"^PERMISSIONS = \(([^)]*)\)", source, re.MULTILINE)[1]
    assert [p.strip().strip('"') for p in listed.split(",") if p.strip()] == list(ALL_PERMISSIONS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"POSTGRES_PASSWORD": ""}, "POSTGRES_PASSWORD is not set"),
        ({"POSTGRES_USER": None}, "POSTGRES_USER is not set"),
        ({"MLFLOW_AUTH_DB": None}, "MLFLOW_AUTH_DB is not set"),
        ({"POSTGRES_PORT": "54x2"}, "POSTGRES_PORT must be a port number"),
        ({"MLFLOW_DEFAULT_PERMISSION": "WRITE"}, "MLFLOW_DEFAULT_PERMISSION must be one of READ, USE, EDIT"),
    ],
)
def test_entrypoint_refuses_a_bad_setting_in_one_line(tmp_path: Path, change: dict, message: str) -> None:
    env = _container_env(tmp_path)
    for name, value in change.items():
        if value is None:
            env.pop(name)
        else:
            env[name] = value
    out, exec_env = run_entrypoint(env, tmp_path)
    assert out.returncode == 2 and exec_env == {}, "the server must not start"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mlflow entrypoint: {message}"), out.stderr
    assert not Path(env["MLFLOW_AUTH_CONFIG_PATH"]).exists(), "nothing is written before every setting is checked"


def test_entrypoint_reports_a_command_it_cannot_run(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ENTRYPOINT), "no-such-program-here"],
        env=_container_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 127 and "cannot run no-such-program-here" in out.stderr and "Traceback" not in out.stderr


# --- End to end: a real PostgreSQL, the compose command, the README's steps ---------------------------------


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(found).resolve().parent
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return debian[-1].parent if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _postgres(user: str, password: str, database: str):
    """A throwaway PostgreSQL on 127.0.0.1 with ``database``, as the postgres image makes it; yields its port."""
    bin_dir = _pg_bin()
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        as_user = ["runuser", "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="compose-pg-"))  # not under pytest's tmp: the postgres user must reach it
    data, port = root / "data", _free_port()
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        for p in (root, pwfile):
            shutil.chown(p, "postgres", "postgres")

    def run(*cmd: str) -> None:
        out = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{cmd[0]}: {out.stderr or out.stdout}"

    try:
        run(str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256")
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
        run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-o", opts, "-w", "start")
        try:
            _psql(port, user, password, "postgres", "-c", f"CREATE DATABASE {database}")
            yield port
        finally:
            subprocess.run(
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], timeout=120
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _psql(port: int, user: str, password: str, database: str, *args: str) -> str:
    out = subprocess.run(
        ["psql", "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", database]
        + list(args),
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _request(
    url: str,
    auth: tuple[str, str] | None = None,
    body: dict | None = None,
    host: str | None = None,
    method: str | None = None,
) -> tuple[int, str]:
    req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    if host:
        req.add_header("Host", host)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
@pytest.mark.skipif(
    (_pg_bin() is None or shutil.which("psql") is None) and os.environ.get("CI") != "true",
    reason="PostgreSQL's server programs are not installed (apt-get install postgresql; CI installs them)",
)
def test_the_compose_setup_runs_against_a_real_postgres(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    team = {
        **_team_env(),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        # README: list the name clients use, with its port, plus localhost's for the admin's calls.
        "MLFLOW_SERVER_ALLOWED_HOSTS": "mlflow.team.example:*,127.0.0.1:*,localhost:*",
    }
    compose = _interpolated(team)
    pg_env = compose["services"]["postgres"]["environment"]
    user, password = pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"]
    with _postgres(user, password, pg_env["POSTGRES_DB"]) as pg_port:
        # What the postgres image does with /docker-entrypoint-initdb.d/*.sql on first start.
        for script in _init_scripts(compose["services"]["postgres"]):
            _psql(pg_port, user, password, pg_env["POSTGRES_DB"], "-f", str(script))
        databases = _psql(pg_port, user, password, "postgres", "-Atc", "SELECT datname FROM pg_database")
        assert {"mlflow", "mlflow_auth"} <= set(databases.split())

        # The container: entrypoint.py, then compose's command; the database at 127.0.0.1, a free port.
        env = {**_container_env(tmp_path, team), "POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": str(pg_port)}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
        command = list(compose["services"]["mlflow"]["command"])
        port = _free_port()
        command[command.index("--port") + 1] = str(port)
        command[command.index("--host") + 1] = "127.0.0.1"
        command += ["--workers", "1"]
        log = (tmp_path / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, str(ENTRYPOINT), *command],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                with contextlib.suppress(OSError):
                    if _request(f"{base}/health")[0] == 200:
                        break
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(1)
            assert password not in " ".join(server.args), "the database password is not on the command line"

            admin = (team["MLFLOW_AUTH_ADMIN_USERNAME"], team["MLFLOW_AUTH_ADMIN_PASSWORD"])
            search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
            assert _request(search)[0] == 401  # basic auth is on
            assert _request(search, auth=admin)[0] == 200
            assert _request(search, auth=admin, host="mlflow.team.example:5000")[0] == 200
            assert _request(search, auth=admin, host="evil.example.com")[0] == 403  # host-header check

            # README, "Users": the admin adds, lists, re-passwords and removes users.
            users = f"{base}/api/2.0/mlflow/users"
            for name in ("alice", "bob"):
                status, body = _request(
                    f"{users}/create", auth=admin, body={"username": name, "password": f"{name}-password-1"}
                )
                assert status == 200 and json.loads(body)["user"]["username"] == name, body
            eve = {"username": "eve", "password": "eve-password-1"}
            assert _request(f"{users}/create", body=eve)[0] == 401
            assert _request(f"{users}/create", auth=("bob", "bob-password-1"), body=eve)[0] == 403
            assert _request(f"{users}/create", auth=admin, body={"username": "eve", "password": "short"})[0] == 400
            listed = json.loads(_request(f"{users}/list", auth=admin)[1])
            assert {"admin", "alice", "bob"} <= {u["username"] for u in listed["users"]}, listed
            new_pw = {"username": "alice", "password": "alice-password-2"}
            assert _request(f"{users}/update-password", auth=admin, body=new_pw, method="PATCH")[0] == 200
            assert _request(f"{users}/delete", auth=admin, body={"username": "bob"}, method="DELETE")[0] == 200
            assert _request(search, auth=("bob", "bob-password-1"))[0] == 401
            assert _request(search, auth=("alice", "alice-password-1"))[0] == 401

            # README, "Clients": MLFLOW_TRACKING_USERNAME / _PASSWORD; the run's artifact goes through the server.
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "alice-password-2")
            client = MlflowClient(tracking_uri=base)
            run = client.create_run(client.create_experiment("compose-check"))
            client.log_metric(run.info.run_id, "accuracy", 0.9)
            (tmp_path / "note.txt").write_text("hello")
            client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
            assert client.get_run(run.info.run_id).data.metrics == {"accuracy": 0.9}
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server
            stored = list((tmp_path / "artifacts").rglob("note.txt"))
            assert [p.read_text() for p in stored] == ["hello"]
        finally:
            stop_process(server)
            log.close()
