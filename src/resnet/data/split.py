"""The split stage: the raw archive -> stratified, seeded train/val/test splits and their files.

:func:`prepare` reads the images straight out of the archive (no 60,000 extracted
files for DVC to hash), brings them to the model's input pixels (:mod:`resnet.preprocess`),
carves a stratified, seeded validation split from train and writes
``data/prepared/{train,val,test}.npz`` and ``meta.json`` (docs/architecture.md).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet import preprocess
from resnet.config import DataParams
from resnet.data.datasets import OFFICIAL_ARCHIVES, read_cifar, read_imagefolder
from resnet.data.errors import DataError
from resnet.data.sources import sha256_file
from resnet.data.store import save_npz
from resnet.utils import PipelineError, atomic_dir, read_handover_json, write_json

__all__ = ["stratified_split", "cap_per_class", "channel_stats", "prepare"]

log = logging.getLogger(__name__)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    """One independent stream per purpose, so e.g. max_per_class does not shift the val split's draw."""
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, *, purpose: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, take): per class, round(n * fraction) images taken at random.

    Every class with at least 2 images keeps at least one and gives at least one; a
    class with a single image keeps it. Both index arrays are sorted (original order).
    """
    rng = _rng(seed, purpose)
    keep, take = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_take = _round_half_up(len(idx) * fraction)
        n_take = min(max(n_take, 1), len(idx) - 1) if len(idx) >= 2 else 0
        perm = rng.permutation(idx)
        take.append(perm[:n_take])
        keep.append(perm[n_take:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(take))


def cap_per_class(labels: np.ndarray, caps: dict[int, int], seed: int, *, purpose: int) -> np.ndarray:
    """Sorted indices of a random subset with at most ``caps[c]`` images of each class c."""
    rng = _rng(seed, purpose)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = caps.get(int(c), len(idx))
        chosen.append(idx if len(idx) <= k else rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale, from a 256-bin histogram per channel."""
    import torch  # its bincount is 2-3x faster than numpy's on a strided channel

    values = np.arange(256, dtype=np.float64) / 255.0
    flat = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1, images.shape[-1])
    means, stds = [], []
    for ch in range(flat.shape[1]):
        hist = torch.bincount(flat[:, ch].contiguous(), minlength=256).numpy().astype(np.float64)
        n = hist.sum()
        mean = float((hist * values).sum() / n)
        var = float((hist * (values - mean) ** 2).sum() / n)
        means.append(mean)
        stds.append(var**0.5)
    return means, stds


@dataclass
class _Pool:
    """The train pool (train + val to be) and the test split, with class names."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    test_origin: str


def prepare(raw_dir: str | Path, out_dir: str | Path, params: DataParams) -> dict[str, Any]:
    """The split stage: data/raw -> {train,val,test}.npz + meta.json in out_dir; returns meta.

    Order of operations (all seeded by data.seed, each with its own random stream):
    1. test: the archive's test split, or (image folder without one) a stratified
       data.test_fraction of train;
    2. max_per_class caps each class of the train pool (train+val) at that many
       images; the test split is cut by the same per-class fraction (at least one
       image per class), so it stays proportional to training;
    3. val: a stratified data.val_fraction of the (capped) train pool.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    source = _verified_source(raw_dir, params)
    t0 = time.monotonic()
    pool = _read_pool(raw_dir / source["path"], params)
    if len(pool.classes) < 2:
        raise DataError(
            f"{raw_dir / source['path']}: {len(pool.classes)} class(es) {pool.classes}; a classifier needs at "
            f"least 2: add a folder of images per class (train/<class>/<image>)"
        )
    log.info(
        "read %d train-pool and %d test images of %d classes in %.1f s",
        len(pool.train_y),
        len(pool.test_y),
        len(pool.classes),
        time.monotonic() - t0,
    )
    if params.max_per_class is not None:
        pool = _cap_pool(pool, params.max_per_class, params.seed)
    keep, take = stratified_split(pool.train_y, params.val_fraction, params.seed, purpose=1)
    parts = {
        "train": (pool.train_x[keep], pool.train_y[keep]),
        "val": (pool.train_x[take], pool.train_y[take]),
        "test": (pool.test_x, pool.test_y),
    }
    empty = [s for s, (_, y) in parts.items() if len(y) == 0]
    if empty:
        raise DataError(
            f"the {' and '.join(empty)} split(s) would be empty ({len(pool.train_y)} train-pool images "
            f"of {len(pool.classes)} classes); every class needs at least 2 training images: raise "
            f"data.max_per_class or data.val_fraction, or add images"
        )
    meta = _meta(parts, pool, source, params)
    with atomic_dir(out_dir) as tmp:
        for s, (x, y) in parts.items():
            save_npz(tmp / f"{s}.npz", images=x, labels=y)
        write_json(tmp / "meta.json", meta)
    log.info(
        "wrote %s: train %d, val %d, test %d images (%dx%dx%d), mean %s, std %s",
        out_dir,
        *meta["sizes"].values(),
        *meta["image_size"],
        meta["channels"],
        [round(m, 4) for m in meta["mean"]],
        [round(s, 4) for s in meta["std"]],
    )
    return meta


#: The fields of source.json that the split stage reads, and the kinds the download stage writes.
_SOURCE_FIELDS = ("source", "dataset", "path", "sha256", "kind")
_SOURCE_KINDS = ("archive", "directory")


def _read_source_record(src_file: Path) -> dict[str, Any]:
    """source.json as the download stage wrote it: a JSON object with the fields split needs."""
    try:
        source = read_handover_json(src_file, "download")
    except PipelineError as e:
        raise DataError(str(e)) from e
    bad = [k for k in _SOURCE_FIELDS if not isinstance(source.get(k), str) or not source[k]]
    if not bad and source["kind"] not in _SOURCE_KINDS:
        bad = ["kind"]
    # "path" names the copy inside data/raw: one plain name, never a way out of it.
    if not bad and (source["path"] in (".", "..") or "/" in source["path"] or "\\" in source["path"]):
        bad = ["path"]
    if bad:
        raise DataError(
            f"{src_file}: field(s) {bad} missing or invalid (it needs strings {list(_SOURCE_FIELDS)}, "
            f"kind one of {list(_SOURCE_KINDS)}): the download stage writes it; rerun it (dvc repro -f download)"
        )
    return source


def _verified_source(raw_dir: Path, params: DataParams) -> dict[str, Any]:
    """source.json of the download stage, checked against data.dataset and the copy's sha256."""
    src_file = raw_dir / "source.json"
    source = _read_source_record(src_file)
    if source["dataset"] != params.dataset:
        raise DataError(
            f"{raw_dir} holds dataset {source['dataset']!r} but data.dataset is {params.dataset!r}; "
            f"run the download stage again (`dvc repro download`)"
        )
    path = raw_dir / source["path"]
    is_there = path.is_file() if source["kind"] == "archive" else path.is_dir()
    if not is_there:
        raise DataError(
            f"{path} ({source['kind']}) not found, but {src_file} names it; the download stage writes it: "
            f"rerun it (dvc repro -f download)"
        )
    if source["kind"] == "archive":
        got = sha256_file(path)
        if got != source["sha256"]:
            raise DataError(
                f"{path} has sha256 {got}, but source.json records {source['sha256']}; the copy was "
                f"modified: run `dvc repro -f download`"
            )
    return source


def _read_pool(path: Path, params: DataParams) -> _Pool:
    """Step 1 of :func:`prepare`: the train pool and the test split at the model's input pixels."""
    if params.dataset in OFFICIAL_ARCHIVES:
        train_x, train_y, test_x, test_y, classes = read_cifar(path, params.dataset)
        return _Pool(
            preprocess.batch_pixels(train_x, params.image_size, params.channels),
            train_y,
            preprocess.batch_pixels(test_x, params.image_size, params.channels),
            test_y,
            classes,
            "archive",
        )
    splits, classes = read_imagefolder(path, channels=params.channels, image_size=params.image_size)
    train_x, train_y = splits["train"]
    if "test" in splits:
        return _Pool(train_x, train_y, *splits["test"], classes, "archive")
    keep, take = stratified_split(train_y, params.test_fraction, params.seed, purpose=2)
    log.info("no test/ folder: %d test images carved from train, stratified", len(take))
    return _Pool(
        train_x[keep],
        train_y[keep],
        train_x[take],
        train_y[take],
        classes,
        f"carved from train (data.test_fraction={params.test_fraction})",
    )


def _cap_pool(pool: _Pool, max_per_class: int, seed: int) -> _Pool:
    """Step 2 of :func:`prepare`: at most max_per_class per class in the pool, test cut in proportion."""
    n_classes = len(pool.classes)
    pool_counts = np.bincount(pool.train_y, minlength=n_classes)
    test_counts = np.bincount(pool.test_y, minlength=n_classes)
    fractions = {c: min(1.0, max_per_class / n) for c, n in enumerate(pool_counts) if n}
    sel = cap_per_class(pool.train_y, {c: max_per_class for c in range(n_classes)}, seed, purpose=3)
    test_caps = {c: max(1, _round_half_up(test_counts[c] * fractions.get(c, 1.0))) for c in range(n_classes)}
    test_sel = cap_per_class(pool.test_y, test_caps, seed, purpose=4)
    log.info("max_per_class=%d: %d train-pool and %d test images kept", max_per_class, len(sel), len(test_sel))
    return _Pool(
        pool.train_x[sel],
        pool.train_y[sel],
        pool.test_x[test_sel],
        pool.test_y[test_sel],
        pool.classes,
        pool.test_origin,
    )


def _content_sha256(parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """The digest of the prepared splits' contents (names, shapes, pixels, labels): what identifies the data.

    Not of the .npz files, whose bytes depend on the zip writer; the same images and
    labels in the same order give the same digest.
    """
    h = hashlib.sha256()
    for name, (x, y) in parts.items():
        for arr in (x, y):
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}\n".encode())
            h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


def _meta(
    parts: dict[str, tuple[np.ndarray, np.ndarray]], pool: _Pool, source: dict[str, Any], params: DataParams
) -> dict[str, Any]:
    """meta.json: classes, image size, channels, train-split mean/std, counts and provenance."""
    classes = pool.classes
    mean, std = channel_stats(parts["train"][0])
    h, w, c = parts["train"][0].shape[1:]
    return {
        "dataset": params.dataset,
        "classes": classes,
        "num_classes": len(classes),
        "image_size": [int(h), int(w)],
        "channels": int(c),
        "mean": mean,
        "std": std,
        "sizes": {s: int(len(y)) for s, (_, y) in parts.items()},
        "counts": {
            s: {classes[k]: int(n) for k, n in enumerate(np.bincount(y, minlength=len(classes)))}
            for s, (_, y) in parts.items()
        },
        "content_sha256": _content_sha256(parts),
        "source": source["source"],
        "source_sha256": source["sha256"],
        "test_split": pool.test_origin,
        "seed": params.seed,
        "val_fraction": params.val_fraction,
        "max_per_class": params.max_per_class,
    }
