"""The prepared files: ``data/prepared/{train,val,test}.npz`` and ``meta.json``, written and read.

Split files (uncompressed ``.npz``): ``images`` uint8 ``(N, H, W, C)``, ``labels``
int64 ``(N,)``; ``meta.json``: classes, mean, std, image_size, channels, counts,
source (docs/architecture.md).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from resnet.data.errors import DataError
from resnet.utils import PipelineError, naming_write_errors, read_handover_json

__all__ = ["SPLITS", "save_npz", "load_split", "load_meta"]

SPLITS = ("train", "val", "test")


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez, uncompressed, but byte-reproducible: fixed zip timestamps (numpy stamps the clock).

    A full disk is an OSError naming ``path`` (zipfile's writes name no file).
    """
    with naming_write_errors(path), zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``<prepared_dir>/<split>.npz``: uint8 images (N, H, W, C) and int64 labels (N,)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found; run the split stage first (`dvc repro split`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is unreadable or incomplete ({e}); run `dvc repro -f split`") from None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.dtype != np.int64 or len(labels) != len(images):
        raise DataError(
            f"{path}: expected uint8 images (N, H, W, C) and int64 labels (N,), got {images.dtype} "
            f"{images.shape} and {labels.dtype} {labels.shape}; run `dvc repro -f split`"
        )
    return images, labels


def load_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """Read ``<prepared_dir>/meta.json`` (classes, mean, std, image_size, channels, counts, source...)."""
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run the split stage first (`dvc repro split`)")
    try:
        return read_handover_json(path, "split")
    except PipelineError as e:
        raise DataError(str(e)) from e
