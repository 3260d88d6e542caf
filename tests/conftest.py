"""Shared fixtures: tiny dataset archives and a prepared split (see tests/archives.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from archives import make_tar, write_imagefolder

from resnet.config import DataParams
from resnet.data import download, prepare


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
    params = DataParams(dataset="imagefolder", source=str(root / "src"), val_fraction=1 / 6)
    download(params, root / "raw")
    prepare(root / "raw", root / "prepared", params)
    return root / "prepared"
