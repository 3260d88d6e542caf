"""Shared fixtures: tiny dataset archives and a prepared split (see tests/archives.py)."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from archives import make_tar, write_imagefolder
from paramsets import data_params

from resnet.data.sources import download
from resnet.data.split import prepare


@pytest.fixture(scope="session")
def tiny_imagefolder_tgz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .tar.gz laid out as tiny/train/<class>/NNNN.png (3 classes x 10) and tiny/test/ (x 4), 8x8 RGB."""
    root = tmp_path_factory.mktemp("tiny_folder")
    write_imagefolder(root / "src", wrapper="tiny")
    return make_tar(root / "src", root / "tiny.tar.gz")


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/prepared/ as the split stage writes it: 3 classes of 32x32 RGB, train 30 / val 6 / test 12."""
    root = tmp_path_factory.mktemp("tiny_prepared")
    write_imagefolder(root / "src", per_class={"train": 12, "test": 4}, size=32)
    params = data_params(dataset="imagefolder", source=str(root / "src"), val_fraction=1 / 6)
    download(params, root / "raw")
    prepare(root / "raw", root / "prepared", params)
    return root / "prepared"


@pytest.fixture(autouse=True)
def _isolated_tracking() -> None:
    """No test inherits or leaks an MLflow store or a DVC experiment's variables.

    mlflow.set_tracking_uri() and set_registry_uri() also export MLFLOW_TRACKING_URI and
    MLFLOW_REGISTRY_URI, and the subprocesses a later test starts (dvc, stage scripts)
    would inherit them: each test starts and ends without these variables.
    """
    saved = {v: os.environ.pop(v) for v in _ISOLATED_VARS if v in os.environ}
    yield
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for v in _ISOLATED_VARS:
        os.environ.pop(v, None)
    os.environ.update(saved)


_ISOLATED_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV")
