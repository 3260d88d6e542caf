"""The Model Registry: a version per pipeline run, and one champion, the best version.

The champion is the registered version with the highest ``register.metric`` (the
earliest on a tie: a model must be better, not equal, to take the alias), among the
versions not tagged ``exclude_from_champion=true``. Each registration recomputes it
from all versions and moves the alias until the registry agrees, so registrations at
the same moment (``dvc queue start -j N``, several machines) end with the same
champion as the same registrations one after another. A new version that is not the
champion gets the alias ``challenger``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from resnet.tracking.model import log_model
from resnet.tracking.runs import PipelineRun
from resnet.tracking.store import TrackingError, store_lock

__all__ = ["CHAMPION", "CHALLENGER", "check_registrable", "check_above_chance", "register_model", "register_checkpoint"]

log = logging.getLogger("resnet.tracking")

CHAMPION = "champion"
CHALLENGER = "challenger"
EXCLUDED_TAG = "exclude_from_champion"  # "true": never made champion (a retired or suspect version)
CHECKPOINT_TAG = "checkpoint.sha256"
# One-sided binomial test at p < 0.01 for "better than always answering the commonest class".
CHANCE_Z = 2.326


def check_registrable(metrics: dict[str, Any], metric: str, source: str = "the test metrics") -> None:
    """Refuse a diverged model: any non-finite metric, ``metric`` (the one register compares) included."""
    fix = (
        "the model diverged; fix the training (e.g. lower train.lr or set train.grad_clip) and rerun (dvc repro train)"
    )
    bad = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isfinite(v))
    if bad:
        raise TrackingError(f"{source} has non-finite {', '.join(bad)}: not registered; {fix}")


def check_above_chance(accuracy: float, chance: float, num_images: int, source: str = "the test metrics") -> None:
    """Refuse a model that is not significantly better than always answering the commonest test class.

    ``chance`` is that class's share of the test images. The bar is ``chance + 2.326 *
    sqrt(chance * (1 - chance) / num_images)`` (one-sided binomial test, p < 0.01): 10.7%
    for CIFAR-10's 10,000 test images.
    """
    bar = chance + CHANCE_Z * math.sqrt(chance * (1.0 - chance) / max(num_images, 1))
    if not accuracy > bar:
        raise TrackingError(
            f"{source}: test accuracy {accuracy:.4f} is at chance level (the commonest class is {chance:.4f} of "
            f"{num_images} images; a model that learned must beat {bar:.4f}): not registered; the model did not "
            "learn: fix the recipe (train.lr, train.epochs) and rerun, or set register.refuse_at_chance: false"
        )


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists; any other failure (auth, connection) is an error."""
    try:
        client.create_registered_model(name, description="ResNets trained by the resnet-pipeline DVC pipeline")
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            return
        raise TrackingError(
            f"cannot create registered model {name!r} in {mlflow.get_registry_uri()}: {str(e).splitlines()[0]} "
            f"({e.error_code}); check the registry's address and credentials (MLFLOW_TRACKING_URI, tracking.uri)"
        ) from e


def _versions(client: MlflowClient, name: str) -> list[Any]:
    found, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found


def _version_metric(client: MlflowClient, version: Any, metric: str) -> float | None:
    if metric in version.tags:
        with contextlib.suppress(ValueError):
            return float(version.tags[metric])
    if version.run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(version.run_id).data.metrics.get(metric)
    return None


def _candidates(client: MlflowClient, name: str, metric: str) -> dict[int, float]:
    """Version -> metric for every version that may be champion."""
    out = {}
    for v in _versions(client, name):
        value = _version_metric(client, v, metric)
        if value is not None and math.isfinite(value) and v.tags.get(EXCLUDED_TAG, "").lower() != "true":
            out[int(v.version)] = value
    return out


def _alias(client: MlflowClient, name: str, alias: str) -> int | None:
    version = client.get_registered_model(name).aliases.get(alias)
    return int(version) if version is not None else None


def _set_alias(client: MlflowClient, name: str, alias: str, version: int) -> None:
    """Set an alias, retrying the database conflicts of registrations at the same moment."""
    for attempt in range(8):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as e:
            transient = any(s in str(e) for s in ("IntegrityError", "database is locked", "UniqueViolation"))
            if not transient or attempt == 7:
                raise
            time.sleep(0.05 * 2**attempt * (1 + random.random()))


def _settle_champion(client: MlflowClient, name: str, metric: str) -> tuple[int, float]:
    """Move ``champion`` to the best version until a fresh read agrees; return it and its value."""
    for _ in range(50):
        values = _candidates(client, name, metric)
        best = max(values, key=lambda v: (values[v], -v))
        if _alias(client, name, CHAMPION) == best:
            return best, values[best]
        _set_alias(client, name, CHAMPION, best)
    raise TrackingError(f"the champion of {name!r} kept moving under other registrations; rerun register")


def register_model(
    run: PipelineRun, model_uri: str, name: str, metric: str, metrics: dict[str, float], tags: dict | None = None
) -> dict[str, Any]:
    """Register a version of ``model_uri``; make the best version ``champion``, the new one else ``challenger``.

    Returns what metrics/register.json records: version, alias, reason, the champion before.
    """
    check_registrable(metrics, metric)
    client = MlflowClient()
    _ensure_registered_model(client, name)

    def create() -> int:
        version_tags = {**{k: str(v) for k, v in metrics.items()}, **(tags or {})}
        version = mlflow.register_model(model_uri, name, tags=version_tags)
        client.set_model_version_tag(name, version.version, "mlflow.run_id", run.run_id)
        return int(version.version)

    return _register(client, run, name, metric, float(metrics[metric]), create)


def _register(
    client: MlflowClient, run: PipelineRun, name: str, metric: str, value: float, version: Callable[[], int]
) -> dict[str, Any]:
    """Get the version (``version()`` registers it) and decide the aliases, one process of this machine at a time."""
    with store_lock(mlflow.get_registry_uri(), "registering a model version"):
        before = _alias(client, name, CHAMPION)
        before_value = _version_metric(client, client.get_model_version(name, str(before)), metric) if before else None
        return _decide(client, run, name, version(), metric, value, before, before_value)


def _decide(
    client: MlflowClient,
    run: PipelineRun,
    name: str,
    version: int,
    metric: str,
    value: float,
    before: int | None,
    before_value: float | None,
) -> dict[str, Any]:
    champion, champion_value = _settle_champion(client, name, metric)
    alias = CHAMPION if champion == version else CHALLENGER
    if alias == CHALLENGER:
        _set_alias(client, name, CHALLENGER, version)
        reason = f"{metric} {value:.4f} does not beat champion v{champion}'s {champion_value:.4f}"
    elif before is None or before_value is None:
        reason = "no champion yet"
    else:
        reason = f"{metric} {value:.4f} > champion v{before}'s {before_value:.4f}"
    if champion not in (version, before):
        log.warning("champion of %r moved from v%s to v%s, the best registered version", name, before, champion)
    log.info("registered %s version %s as @%s (%s)", name, version, alias, reason)
    return {
        "model_name": name,
        "version": version,
        "alias": alias,
        "reason": reason,
        "metric": metric,
        "value": value,
        "previous_champion_version": before,
        "previous_champion_value": before_value,
        "model_uri": f"models:/{name}/{version}",
        "run_id": run.run_id,
    }


def _registered_before(client: MlflowClient, name: str, run_id: str, digest: str) -> Any | None:
    """The version this run already registered from this checkpoint (a rerun after a kill), if any."""
    for v in _versions(client, name):
        if v.tags.get(CHECKPOINT_TAG) == digest and run_id in (v.run_id, v.tags.get("mlflow.run_id")):
            return v
    return None


def register_checkpoint(
    run: PipelineRun,
    checkpoint: str | Path,
    example: np.ndarray,
    name: str,
    metric: str,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log ``checkpoint`` as the run's pyfunc model and register it, once.

    A rerun for the same run and checkpoint (register killed after registering, or
    register.metric changed) reuses that version and only decides the aliases again.
    ``tags``: more version tags (the register stage's ONNX check).
    """
    check_registrable(metrics, metric)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    client = MlflowClient()
    _ensure_registered_model(client, name)
    existing = _registered_before(client, name, run.run_id, digest)
    if existing is None:
        model_uri = log_model(run, checkpoint, example)
        return register_model(run, model_uri, name, metric, metrics, {**(tags or {}), CHECKPOINT_TAG: digest})
    log.info("run %s registered this checkpoint as %s v%s already: not again", run.run_id, name, existing.version)
    return _register(client, run, name, metric, float(metrics[metric]), lambda: int(existing.version))
