"""The Model Registry: a version per pipeline run, and one champion, the best version.

The champion is the registered version with the highest ``register.metric`` (the
earliest on a tie: a model must be better, not equal, to take the alias), among the
versions not tagged ``exclude_from_champion=true``. Each registration recomputes it
from all versions and moves the alias until the registry agrees, so registrations at
the same moment (``dvc queue start -j N``, several machines) end with the same
champion as the same registrations one after another.

``challenger`` is the newest version while it is newer than the champion (it lost to
it and waits, say, for an A/B test); a version that becomes champion leaves no
challenger, so the alias never names a version older than the champion. The aliases
are the registry's only record of who holds what: runs carry ``registered_model``
(name/version, a fact that cannot go stale), not the alias of the moment.
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

from resnet.checkpoint import load_checkpoint
from resnet.ema import describe_weights
from resnet.tracking.lineage import link_model_figures
from resnet.tracking.model import log_model
from resnet.tracking.runs import PipelineRun
from resnet.tracking.store import TrackingError, store_lock
from resnet.tta import checkpoint_tta

__all__ = ["CHAMPION", "CHALLENGER", "check_registrable", "check_above_chance", "register_model", "register_checkpoint"]

log = logging.getLogger("resnet.tracking")

CHAMPION = "champion"
CHALLENGER = "challenger"
EXCLUDED_TAG = "exclude_from_champion"  # "true": never made champion (a retired or suspect version)
CHECKPOINT_TAG = "checkpoint.sha256"
TTA_TAG = "tta"  # the checkpoint's test-time augmentation (model.tta): how the version predicts
WEIGHTS_TAG = "weights"  # raw, or the moving average (train.ema) the checkpoint's weights are
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
    # The version's own tag first: a run that registered twice (another checkpoint) holds its latest value only.
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


def _settle_challenger(client: MlflowClient, name: str, metric: str, champion: int) -> int | None:
    """``challenger`` on the newest candidate when it is newer than ``champion``, else removed."""
    for _ in range(50):
        newest = max(_candidates(client, name, metric))
        want = newest if newest > champion else None
        current = _alias(client, name, CHALLENGER)
        if current == want:
            return want
        if want is None:
            with contextlib.suppress(MlflowException):  # removed by a registration at the same moment
                client.delete_registered_model_alias(name, CHALLENGER)
        else:
            _set_alias(client, name, CHALLENGER, want)
    raise TrackingError(f"the challenger of {name!r} kept moving under other registrations; rerun register")


def _logged_model_id(model_uri: str) -> str | None:
    """``m-...`` of MLflow 3's ``models:/m-...`` URI of a logged model; None for any other URI."""
    return model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None


def _tag_value(value: Any) -> str:
    """A version tag people read: 0.34, not 0.33999999999999997.

    Ten significant digits: still exact enough to rank versions on (test accuracies differ
    by 1/num_images), as the champion is chosen from these tags.
    """
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def _description(run: PipelineRun, metric: str, metrics: dict[str, float]) -> str:
    """The version's description: recipe, data, test figures and the run it came from."""
    found = MlflowClient().get_run(run.run_id)
    p, t = found.data.params, found.data.tags
    batch = t.get("train.global_batch", p.get("train.batch_size"))
    recipe = (
        f"{t.get('model', p.get('model.name'))} trained {p.get('train.epochs')} epochs: {p.get('train.optimizer')} lr "
        f"{p.get('train.lr')}, {p.get('train.schedule')} schedule, batch {batch}, {p.get('train.precision')}, "
        f"test-time augmentation {p.get('model.tta', 'none')}"
    )
    source = t.get("dataset.source", "unknown")
    data = (
        f"{p.get('data.dataset')} from {source} (sha256 {t.get('dataset.sha256', 'unknown')[:12]}), "
        f"val_fraction {p.get('data.val_fraction')}, max_per_class {p.get('data.max_per_class')}"
    )
    shown = [metric, *sorted(k for k in metrics if k != metric and k.endswith(("accuracy", "loss")))]
    figures = ", ".join(f"{k} {_tag_value(float(metrics[k]))}" for k in shown if k in metrics)
    return f"Recipe: {recipe}.\nData: {data}.\nTest: {figures}.\nSource run: {found.info.run_name} ({run.run_id})."


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
        version_tags = {**{k: _tag_value(v) for k, v in metrics.items()}, **(tags or {})}
        # The client's call, not mlflow.register_model, which prints that the model "already exists"
        # (_ensure_registered_model has just made sure it does).
        version = client.create_model_version(
            name,
            model_uri,
            run_id=run.run_id,
            tags={**version_tags, "mlflow.run_id": run.run_id},
            description=_description(run, metric, metrics),
            model_id=_logged_model_id(model_uri),
        )
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
    challenger = _settle_challenger(client, name, metric, champion)
    alias = CHAMPION if champion == version else CHALLENGER if challenger == version else None
    if alias == CHAMPION and before == version:  # a rerun of the same registered checkpoint
        reason = f"already the champion ({metric} {value:.4f})"
    elif alias == CHAMPION:
        better = before is not None and before_value is not None
        reason = f"{metric} {value:.4f} > champion v{before}'s {before_value:.4f}" if better else "no champion yet"
    else:
        reason = f"{metric} {value:.4f} does not beat champion v{champion}'s {champion_value:.4f}"
        if alias is None:  # registrations at the same moment: a newer version holds the aliases
            reason += f"; no alias: v{challenger or champion} is newer"
    if champion not in (version, before):
        log.warning("champion of %r moved from v%s to v%s, the best registered version", name, before, champion)
    log.info("registered %s version %s as %s (%s)", name, version, f"@{alias}" if alias else "no alias", reason)
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
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Log ``checkpoint`` as the run's pyfunc model and register it, once.

    A rerun for the same run and checkpoint (register killed after registering, or
    register.metric changed) reuses that version and only decides the aliases again.
    ``tags``: more version tags (the register stage's ONNX check); the version is also tagged
    with the checkpoint's digest, its test-time augmentation (``tta``) and what its weights are
    (``weights``: ``raw``, or ``ema(decay=..., every=..., ...)`` from resnet.ema.describe_weights).
    ``meta``: the prepared data's meta.json; the logged model's figures (the run's ``metrics``)
    are linked to it.
    """
    check_registrable(metrics, metric)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    client = MlflowClient()
    _ensure_registered_model(client, name)
    existing = _registered_before(client, name, run.run_id, digest)
    if existing is None:
        model_uri = log_model(run, checkpoint, example)
        model_id = _logged_model_id(model_uri)
        if meta is not None and model_id is not None:
            link_model_figures(run.run_id, model_id, list(metrics), meta)
        ckpt = load_checkpoint(checkpoint, map_location="cpu")
        weights = {TTA_TAG: checkpoint_tta(ckpt), WEIGHTS_TAG: describe_weights(ckpt)}
        version_tags = {**(tags or {}), CHECKPOINT_TAG: digest, **weights}
        return register_model(run, model_uri, name, metric, metrics, version_tags)
    log.info("run %s registered this checkpoint as %s v%s already: not again", run.run_id, name, existing.version)
    return _register(client, run, name, metric, float(metrics[metric]), lambda: int(existing.version))
