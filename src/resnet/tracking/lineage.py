"""Where a run's data came from, and which data a logged model's figures were measured on.

The dataset MLflow records is the prepared data (data/prepared), identified by the
digest of its contents (``meta["content_sha256"]``, written by the split stage): runs
on 100 and on 500 images per class of one archive are two datasets, as they should be.
Its source is the archive's absolute location, and the input's tags give the archive's
full sha256 and the split params that cut it. The registered model's test figures are
logged against that dataset too, so its page in the UI lists the data it was measured on.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

__all__ = ["dataset", "log_dataset", "link_model_figures"]

# MLflow keeps at most 36 characters of a dataset digest.
_DIGEST_CHARS = 32


def _source(meta: dict[str, Any]) -> Any:
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    uri = str(meta.get("source", "unknown"))
    if "://" not in uri:
        # A local path, relative to the repository root where stages run: recorded absolute.
        uri = Path(uri).resolve().as_uri()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "can be interpreted in multiple ways"
        return resolve_dataset_source(uri)


def dataset(meta: dict[str, Any]) -> Any:
    """The prepared data as an MLflow dataset: name, content digest and source."""
    from mlflow.data.meta_dataset import MetaDataset

    sizes = meta.get("sizes", {})
    archive = Path(str(meta.get("source", "dataset")).rstrip("/")).name
    counts = "/".join(str(sizes.get(s, "?")) for s in ("train", "val", "test"))
    # Prepared data from before content digests: the archive's checksum is what identifies it.
    digest = str(meta.get("content_sha256") or meta.get("source_sha256") or "unknown")[:_DIGEST_CHARS]
    name = f"{meta.get('dataset', 'images')} from {archive} (train/val/test {counts})"
    return MetaDataset(source=_source(meta), name=name, digest=digest)


def _tags(meta: dict[str, Any]) -> dict[str, str]:
    keys = ("content_sha256", "source_sha256", "val_fraction", "max_per_class", "seed", "test_split")
    return {k: str(meta.get(k)) for k in keys}


def log_dataset(meta: dict[str, Any]) -> None:
    """Record the prepared data as the run's input, its provenance in the input's tags.

    One input: MLflow keeps a dataset once per run whatever the context, and the
    train/val/test splits are all parts of it.
    """
    mlflow.log_input(dataset(meta), context="training", tags=_tags(meta))


def link_model_figures(run_id: str, model_id: str, keys: list[str], meta: dict[str, Any]) -> None:
    """Log the run's current values of ``keys`` against ``model_id`` and the dataset of ``meta``.

    The same points as the run's (key, value, step and timestamp): MLflow keeps one row
    for the run and adds the model's, so nothing is logged twice at a step. A point MLflow
    already copied to the model (those at the step the model was logged at) stays as it is.
    """
    client = MlflowClient()
    data = dataset(meta)
    held = {(m.key, m.step, m.timestamp) for m in client.get_logged_model(model_id).metrics or []}
    points = []
    for key in keys:
        history = client.get_metric_history(run_id, key)
        if history:
            last = max(history, key=lambda m: (m.step, m.timestamp))
            if (key, last.step, last.timestamp) not in held:
                points.append(Metric(key, last.value, last.timestamp, last.step, model_id, data.name, data.digest))
    if points:
        client.log_batch(run_id, metrics=points)
