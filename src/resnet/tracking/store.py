"""Where the runs live: the tracking URI, the store's creation, and its failures.

``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` from params.yaml, else an
embedded SQLite store ``mlflow.db`` with artifacts in ``mlartifacts/`` at the
repository root. ``dvc exp run --temp`` and queued experiments run in a temporary
copy under ``.dvc/tmp/exps/``; the store is resolved to the real repository above
it, so those runs land beside the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import sqlalchemy.exc
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

from resnet.config import TrackingParams
from resnet.lock import waiting_lock
from resnet.utils import PipelineError, workspace_root

__all__ = [
    "TrackingError",
    "store_root",
    "resolve_tracking_uri",
    "setup",
    "point_mlflow_at",
    "store_lock",
    "quiet",
    "check_server",
    "logging_failure",
]

log = logging.getLogger(__name__)


class TrackingError(PipelineError):
    """The MLflow store, run or model a stage needs is unusable or missing."""


def store_root() -> Path:
    """The repository whose mlflow.db holds the runs, seen through DVC's temporary copies."""
    return workspace_root()


# mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI /
# MLFLOW_REGISTRY_URI, to this process and every subprocess it starts. What we exported
# must not be mistaken for the user's setting the next time round.
_exported: dict[str, str] = {}


def user_env(name: str) -> str | None:
    """The user's value of an MLflow variable, ignoring one this module exported itself."""
    value = os.environ.get(name)
    return None if value is None or value == _exported.get(name) else value


def point_mlflow_at(uri: str) -> None:
    """Tracking and (unless the user chose another) registry in the store at ``uri``."""
    mlflow.set_tracking_uri(uri)
    _exported["MLFLOW_TRACKING_URI"] = uri
    registry = user_env("MLFLOW_REGISTRY_URI") or uri
    mlflow.set_registry_uri(registry)
    _exported["MLFLOW_REGISTRY_URI"] = registry


def resolve_tracking_uri(params: TrackingParams) -> str:
    """MLFLOW_TRACKING_URI, else tracking.uri, else sqlite:///<repo>/mlflow.db."""
    uri = user_env("MLFLOW_TRACKING_URI") or params.uri
    if uri:
        return uri
    return f"sqlite:///{store_root() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI; None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :].split("?", 1)[0])


@contextlib.contextmanager
def store_lock(uri: str, what: str) -> Iterator[None]:
    """Serialise ``what`` among the processes of this machine that use the SQLite store ``uri``.

    SQLite has one writer at a time, and MLflow creates or upgrades its schema on first
    use without a lock of its own: four processes starting against a new file fail in
    ``ALTER TABLE`` (3 of 4 seen). A server store (HTTP) serialises on its own database.
    """
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with waiting_lock(db.with_name(db.name + ".lock"), what):
        yield


@contextlib.contextmanager
def quiet(logger: str, level: int = logging.ERROR) -> Iterator[None]:
    """Only ``level`` and above from an MLflow logger for the block (CRITICAL: a failure we report ourselves)."""
    lg = logging.getLogger(logger)
    before = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(before)


# A tracking server that is down or unreachable fails the stage within this many seconds.
HEALTH_TIMEOUT = 10


def is_server(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_server(uri: str) -> None:
    """A tracking server answers its /health (no login needed) within HEALTH_TIMEOUT seconds, or TrackingError.

    Before any MLflow call: MLflow's own client retries a refused connection for minutes
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES) and waits for a silent one for two (…_TIMEOUT).
    """
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT):
            return
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} from /health"
    except OSError as e:  # refused, unreachable, no such host, timed out
        reason = str(getattr(e, "reason", None) or e) or type(e).__name__
    raise TrackingError(
        f"MLflow server {uri} is not answering ({reason}): start it (make server, docs/team.md) "
        "or fix tracking.uri / MLFLOW_TRACKING_URI"
    )


def _login_failure(uri: str, text: str) -> str | None:
    """The fix for a server that refused the login (401) or the action (403); None for other failures."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if "error code 401" in text or "UNAUTHENTICATED" in text:
        if not user:
            return f"MLflow server {uri} needs a login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return (
            f"MLflow server {uri} refused the password of user {user!r} (401): "
            "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
        )
    if "error code 403" in text or "PERMISSION_DENIED" in text:
        return f"MLflow server {uri} refused user {user!r} (403, no permission): ask the server's admin for EDIT"
    return None


def _store_failure(uri: str, e: BaseException) -> TrackingError:
    """One line for a store that cannot be opened: which store, what went wrong, what to do."""
    text = " ".join(str(e).split())
    if login := _login_failure(uri, text):
        return TrackingError(login)
    if "database is locked" in text:
        fix = "another program holds it locked (an open sqlite3 shell, a stuck process): close it and rerun"
    elif "not a database" in text or "malformed" in text:
        fix = "the file is not an intact MLflow store: move it aside and rerun, or set tracking.uri"
    elif "unable to open database" in text or isinstance(e, OSError):
        fix = "its folder is missing or not writable: fix the permissions or set tracking.uri / MLFLOW_TRACKING_URI"
    else:
        fix = "check the store's address and credentials (tracking.uri, MLFLOW_TRACKING_URI)"
    first = text.split("[SQL:")[0].strip()[:200]
    return TrackingError(f"MLflow store {uri} is unusable ({type(e).__name__}: {first}); {fix}")


def setup(params: TrackingParams) -> str:
    """Point mlflow at the store, create it if need be, and return the experiment id (created if missing)."""
    embedded = not (user_env("MLFLOW_TRACKING_URI") or params.uri)
    uri = resolve_tracking_uri(params)
    point_mlflow_at(uri)
    if is_server(uri):
        check_server(uri)
    db = sqlite_path(uri)
    try:
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        # MLflow logs a failing query with its traceback itself; the one line below says it all.
        with store_lock(uri, "creating the MLflow store"), quiet("mlflow.store.db.utils", logging.CRITICAL):
            exp = mlflow.get_experiment_by_name(params.experiment)
            if exp is not None:
                return exp.experiment_id
            # Artifacts beside the embedded store, not in whatever directory the stage ran from.
            location = (store_root() / "mlartifacts").as_uri() if embedded else None
            try:
                return mlflow.create_experiment(params.experiment, artifact_location=location)
            except MlflowException as e:
                # Another machine's pipeline created it in between (a server store has no lock here).
                if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                    raise
                return mlflow.get_experiment_by_name(params.experiment).experiment_id
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError, OSError) as e:
        raise _store_failure(uri, e) from e


def logging_failure(uri: str, what: str, e: BaseException) -> TrackingError:
    """One line for a write to the store that failed mid-stage (the server went away, say)."""
    text = " ".join(str(e).split())
    if login := _login_failure(uri, text):
        return TrackingError(f"{what}: {login}")
    first = text.split("[SQL:")[0].strip()[:300]
    return TrackingError(f"MLflow store {uri} failed while {what} ({type(e).__name__}: {first})")
