"""The split stage: the raw archive -> stratified, seeded train/val/test splits and their files.

:func:`prepare` reads the images straight out of the archive (no 60,000 extracted
files for DVC to hash), brings them to the model's input pixels (:mod:`resnet.preprocess`),
carves a stratified, seeded validation split from train and writes
``data/prepared/{train,val,test}.npz`` and ``meta.json`` (docs/architecture.md),
a chunk of images at a time: a split may be larger than memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet import preprocess
from resnet.config import DataParams
from resnet.data.datasets import OFFICIAL_ARCHIVES, ImageFolder, index_imagefolder, read_cifar
from resnet.data.errors import DataError
from resnet.data.sources import sha256_file
from resnet.data.store import SplitWriter
from resnet.utils import PipelineError, atomic_dir, progress_enabled, read_handover_json, write_json

__all__ = ["stratified_split", "cap_per_class", "channel_histogram", "stats_from_histogram", "channel_stats", "prepare"]

#: Bytes of images converted and written at a time: what the split stage holds of a split.
_CHUNK_BYTES = 64 << 20

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


def channel_histogram(images: np.ndarray) -> np.ndarray:
    """Counts of each of the 256 values per channel: int64 (C, 256); histograms of chunks add up."""
    import torch  # its bincount is 2-3x faster than numpy's on a strided channel

    flat = torch.from_numpy(np.ascontiguousarray(images)).reshape(-1, images.shape[-1])
    return np.stack([torch.bincount(flat[:, ch].contiguous(), minlength=256).numpy() for ch in range(flat.shape[1])])


def stats_from_histogram(hist: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale from :func:`channel_histogram` counts."""
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for counts in hist.astype(np.float64):
        n = counts.sum()
        mean = float((counts * values).sum() / n)
        means.append(mean)
        stds.append(float((counts * (values - mean) ** 2).sum() / n) ** 0.5)
    return means, stds


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std on the 0..1 scale, from a 256-bin histogram per channel."""
    return stats_from_histogram(channel_histogram(images))


@dataclass
class _Pool:
    """The train pool (train + val to be) and the test split, with class names.

    Images stay as they were read: CIFAR's small 32x32 arrays, or an image folder's
    encoded files, on disk; a split is an index into them, so selecting copies no pixels, and
    each is brought to the model's pixels (:func:`_pixels`) only as it is written.
    """

    train_x: _Images
    train_idx: np.ndarray
    train_y: np.ndarray
    test_x: _Images
    test_idx: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    test_origin: str

    def select(self, train_sel: np.ndarray, test_sel: np.ndarray) -> _Pool:
        return dataclasses.replace(
            self,
            train_idx=self.train_idx[train_sel],
            train_y=self.train_y[train_sel],
            test_idx=self.test_idx[test_sel],
            test_y=self.test_y[test_sel],
        )


@dataclass
class _Part:
    """One split to write: images ``x[idx]`` (converted to the model's pixels as they are written) and labels."""

    x: _Images
    idx: np.ndarray
    y: np.ndarray


#: Images as read: a uint8 array (CIFAR), or an image folder's split, decoded on demand.
_Images = np.ndarray | tuple[ImageFolder, str]


def _pixels(x: _Images, idx: np.ndarray, params: DataParams) -> np.ndarray:
    """Images ``idx`` of ``x`` at the model's pixels (data.image_size, data.channels)."""
    if isinstance(x, np.ndarray):
        return preprocess.batch_pixels(x[idx], params.image_size, params.channels)
    folder, split = x
    return folder.decode(split, idx, image_size=params.image_size, channels=params.channels, progress=False)


def prepare(raw_dir: str | Path, out_dir: str | Path, params: DataParams) -> dict[str, Any]:
    """The split stage: data/raw -> {train,val,test}.npz + meta.json in out_dir; returns meta.

    Order of operations (all seeded by data.seed, each with its own random stream):
    1. test: the archive's test split, or (image folder without one) a stratified
       data.test_fraction of train;
    2. max_per_class caps each class of the train pool (train+val) at that many
       images; the test split is cut by the same per-class fraction (at least one
       image per class), so it stays proportional to training;
    3. val: a stratified data.val_fraction of the (capped) train pool.

    No split is ever whole in memory: the files are written a chunk of images at a time.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    source = _verified_source(raw_dir, params)
    t0 = time.monotonic()
    pool = _read_pool(raw_dir / source["path"], params)
    if len(pool.classes) < 2:
        raise DataError(
            f"{raw_dir / source['path']}: {len(pool.classes)} class(es) {pool.classes}; a classifier needs "
            f"at least 2: add a folder of images per class (train/<class>/<image>)"
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
        "train": _Part(pool.train_x, pool.train_idx[keep], pool.train_y[keep]),
        "val": _Part(pool.train_x, pool.train_idx[take], pool.train_y[take]),
        "test": _Part(pool.test_x, pool.test_idx, pool.test_y),
    }
    empty = [s for s, part in parts.items() if len(part.y) == 0]
    if empty:
        raise DataError(
            f"the {' and '.join(empty)} split(s) would be empty ({len(pool.train_y)} train-pool images "
            f"of {len(pool.classes)} classes); every class needs at least 2 training images: raise "
            f"data.max_per_class or data.val_fraction, or add images"
        )
    with atomic_dir(out_dir) as tmp:
        written = _write_parts(tmp, parts, params)
        meta = _meta(parts, written, pool, source, params)
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


@dataclass
class _Written:
    """What writing the splits measured on the way: pixel shape, train histogram, content digest."""

    shape: tuple[int, ...]
    train_histogram: np.ndarray
    content_sha256: str


def _write_parts(out: Path, parts: dict[str, _Part], params: DataParams) -> _Written:
    """Write each split's file, ``_CHUNK_BYTES`` of images at a time, hashing and counting as it goes.

    The digest is of the splits' contents (names, shapes, pixels, labels), not of the
    files, whose bytes depend on the zip writer: the same images and labels in the same
    order give the same digest however they were written.
    """
    from tqdm import tqdm

    digest = hashlib.sha256()
    shape = _pixels(parts["train"].x, parts["train"].idx[:1], params).shape[1:]
    hist = np.zeros((shape[-1], 256), dtype=np.int64)
    per_chunk = max(1, _CHUNK_BYTES // int(np.prod(shape)))
    total = sum(len(p.idx) for p in parts.values())
    with tqdm(total=total, desc="writing splits", unit="img", disable=not progress_enabled()) as bar:
        for name, part in parts.items():
            n = len(part.idx)
            digest.update(f"{name}:|u1:{(n, *shape)}\n".encode())
            with SplitWriter(out / f"{name}.npz", n, shape) as writer:
                for lo in range(0, n, per_chunk):
                    pixels = _pixels(part.x, part.idx[lo : lo + per_chunk], params)
                    if pixels.shape[1:] != shape:  # image folders at their own size (data.image_size null)
                        raise DataError(_odd_size(part, lo, pixels, parts["train"], shape))
                    writer.write(pixels)
                    digest.update(np.ascontiguousarray(pixels).data)
                    if name == "train":
                        hist += channel_histogram(pixels)
                    bar.update(len(pixels))
                labels = np.ascontiguousarray(part.y, dtype=np.int64)
                writer.finish(labels)
            digest.update(f"{name}:{labels.dtype.str}:{labels.shape}\n".encode())
            digest.update(labels.data)
    return _Written(tuple(int(v) for v in shape), hist, digest.hexdigest())


def _odd_size(part: _Part, lo: int, pixels: np.ndarray, first: _Part, shape: tuple[int, ...]) -> str:
    """The error for images of another size than the first train image's (only image folders can differ)."""
    (folder, split), (_, first_split) = part.x, first.x
    odd, ref = folder.names[split][part.idx[lo]], folder.names[first_split][first.idx[0]]
    (h, w), (rh, rw) = pixels.shape[1:3], shape[:2]
    return (
        f"{folder.path}: images differ in size ({odd} is {w}x{h}, {ref} is {rw}x{rh}); "
        "set data.image_size to resize them all"
    )


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
    """Step 1 of :func:`prepare`: the train pool and the test split, as read (see :class:`_Pool`)."""
    if params.dataset in OFFICIAL_ARCHIVES:
        train_x, train_y, test_x, test_y, classes = read_cifar(path, params.dataset)
        return _Pool(train_x, _all(train_y), train_y, test_x, _all(test_y), test_y, classes, "archive")
    folder = index_imagefolder(path)
    train_y = folder.labels["train"]
    if "test" in folder.labels:
        test_y = folder.labels["test"]
        return _Pool(
            (folder, "train"), _all(train_y), train_y, (folder, "test"), _all(test_y), test_y, folder.classes, "archive"
        )
    keep, take = stratified_split(train_y, params.test_fraction, params.seed, purpose=2)
    log.info("no test/ folder: %d test images carved from train, stratified", len(take))
    return _Pool(
        (folder, "train"),
        keep,
        train_y[keep],
        (folder, "train"),
        take,
        train_y[take],
        folder.classes,
        f"carved from train (data.test_fraction={params.test_fraction})",
    )


def _all(labels: np.ndarray) -> np.ndarray:
    return np.arange(len(labels), dtype=np.int64)


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
    return pool.select(sel, test_sel)


def _meta(
    parts: dict[str, _Part], written: _Written, pool: _Pool, source: dict[str, Any], params: DataParams
) -> dict[str, Any]:
    """meta.json: classes, image size, channels, train-split mean/std, counts and provenance."""
    classes = pool.classes
    mean, std = stats_from_histogram(written.train_histogram)
    h, w, c = written.shape
    return {
        "dataset": params.dataset,
        "classes": classes,
        "num_classes": len(classes),
        "image_size": [h, w],
        "channels": c,
        "mean": mean,
        "std": std,
        "sizes": {s: int(len(p.y)) for s, p in parts.items()},
        "counts": {
            s: {classes[k]: int(n) for k, n in enumerate(np.bincount(p.y, minlength=len(classes)))}
            for s, p in parts.items()
        },
        "content_sha256": written.content_sha256,
        "source": source["source"],
        "source_sha256": source["sha256"],
        "test_split": pool.test_origin,
        "seed": params.seed,
        "val_fraction": params.val_fraction,
        "max_per_class": params.max_per_class,
    }
