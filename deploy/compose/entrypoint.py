#!/usr/bin/env python3
"""Entrypoint of the MLflow server container (deploy/compose/compose.yaml): configure, then exec.

From the environment compose passes it, before it execs its arguments (``mlflow server ...``):

* exports ``MLFLOW_BACKEND_STORE_URI`` (the variable behind ``mlflow server --backend-store-uri``),
  ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/POSTGRES_DB`` with user and password URL-quoted, so a
  password may hold any character and never appears in the process list;
* writes MLflow's basic-auth config to ``MLFLOW_AUTH_CONFIG_PATH`` (mode 0600): the users live in
  the second database, ``MLFLOW_AUTH_DB``; MLflow reads that file with configparser, which has no
  environment interpolation, so the URI is written into it here (``%`` doubled for configparser);
* drops the optional variables compose passed empty (compose cannot leave a variable out when
  ``.env`` does not set it), so that boto3 and MLflow see them unset rather than empty.

The admin's name and password (``MLFLOW_AUTH_ADMIN_USERNAME``, ``MLFLOW_AUTH_ADMIN_PASSWORD``)
and ``MLFLOW_FLASK_SERVER_SECRET_KEY`` are MLflow's own variables and pass through unchanged.
A missing setting ends the container with one line naming it (exit 2).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import quote

# MLflow's permission names (mlflow.server.auth.permissions.ALL_PERMISSIONS): a misspelt
# default_permission would only fail later, on requests.
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS", "DENY")
# Optional settings that mean "not set" when empty.
OPTIONAL = (
    "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "MLFLOW_S3_ENDPOINT_URL",
)
DEFAULT_AUTH_CONFIG = "/tmp/mlflow/basic_auth.ini"


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it."""


def _required(env: dict[str, str], name: str) -> str:
    value = env.get(name, "")
    if not value:
        raise ConfigError(f"{name} is not set (set it in deploy/compose/.env, see .env.example)")
    return value


def postgres_uri(env: dict[str, str], database: str) -> str:
    """The URI of ``database`` on the server POSTGRES_* name, credentials quoted.

    ``+psycopg``: SQLAlchemy with psycopg 3 (the image's driver), whatever SQLAlchemy's default.
    """
    user = quote(_required(env, "POSTGRES_USER"), safe="")
    password = quote(_required(env, "POSTGRES_PASSWORD"), safe="")
    host = env.get("POSTGRES_HOST") or "postgres"
    port = env.get("POSTGRES_PORT") or "5432"
    if not port.isdigit():
        raise ConfigError(f"POSTGRES_PORT must be a port number, not {port!r}")
    return f"postgresql+psycopg://{user}:{password}@{host}:{port}/{database}"


def auth_ini(database_uri: str, default_permission: str) -> str:
    """MLflow's basic-auth config: users in ``database_uri``; the admin comes from the environment."""
    if default_permission not in PERMISSIONS:
        raise ConfigError(
            f"MLFLOW_DEFAULT_PERMISSION must be one of {', '.join(PERMISSIONS)}, not {default_permission!r}"
        )
    return (
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def configure(env: dict[str, str]) -> dict[str, str]:
    """Write the auth config; return the environment to exec ``mlflow server`` with."""
    env = {k: v for k, v in env.items() if v or k not in OPTIONAL}
    backend_uri = postgres_uri(env, _required(env, "POSTGRES_DB"))
    auth_uri = postgres_uri(env, _required(env, "MLFLOW_AUTH_DB"))
    ini_text = auth_ini(auth_uri, env.get("MLFLOW_DEFAULT_PERMISSION") or "EDIT")
    ini = Path(env.get("MLFLOW_AUTH_CONFIG_PATH") or DEFAULT_AUTH_CONFIG)
    ini.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ini_text)
    ini.chmod(0o600)  # also when the file was already there
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    env["MLFLOW_BACKEND_STORE_URI"] = backend_uri
    return env


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: entrypoint.py COMMAND [ARG...]  (e.g. mlflow server ...)", file=sys.stderr)
        return 2
    try:
        env = configure(dict(os.environ))
    except ConfigError as e:
        print(f"mlflow entrypoint: {e}", file=sys.stderr)
        return 2
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"mlflow entrypoint: cannot run {argv[0]}: {e.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
