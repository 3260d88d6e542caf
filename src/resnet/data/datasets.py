"""What a dataset archive holds: CIFAR "python version" batches, or an image folder.

* CIFAR-10/100 (:data:`OFFICIAL_ARCHIVES`): pickled batches, read by a restricted
  unpickler that lets through only what numpy arrays need, so a batch cannot run code.
* Image folders: ``<split>/<class>/<image>`` (train, optional test), possibly inside
  one top-level folder; classes are the sorted train folder names.
"""

from __future__ import annotations

import io
import logging
import pickle
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet.config import CIFAR10_URL, CIFAR100_URL
from resnet.data.archives import iter_archive
from resnet.data.decode import decode_images
from resnet.data.encoded import EncodedFiles
from resnet.data.errors import DataError

__all__ = [
    "OFFICIAL_ARCHIVES",
    "IMAGE_EXTENSIONS",
    "OfficialArchive",
    "read_cifar",
    "ImageFolder",
    "index_imagefolder",
    "read_imagefolder",
    "check_same_shape",
    "imagefolder_layout",
    "cifar_member_map",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class OfficialArchive:
    """A published dataset archive and its official checksum (md5, as published)."""

    url: str
    md5: str
    folder: str  # the folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes


OFFICIAL_ARCHIVES: dict[str, OfficialArchive] = {
    "cifar10": OfficialArchive(
        CIFAR10_URL,
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": OfficialArchive(
        CIFAR100_URL,
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
        ("train",),
        ("test",),
        "meta",
        b"fine_labels",
        b"fine_label_names",
    ),
}


# --------------------------------------------------------------------------- image folders


def _is_junk(name: str) -> bool:
    """Hidden files and OS litter (macOS resource forks, Thumbs.db) are not data."""
    parts = name.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] in ("Thumbs.db", "desktop.ini")


def imagefolder_layout(names: list[str], where: Path) -> tuple[str, dict[str, list[str]]]:
    """(prefix, {'train': names, ['test': names]}): where the split folders are, and their images.

    Layout: ``<split>/<class>/.../<image>``, optionally inside one top-level folder
    (``cifar10/train/...``). Split folder names match case-insensitively. A class folder
    under train/ without images (only other files, or empty: a folder entry, a name ending
    in ``/``) is refused, naming it: a class with nothing to learn from means a broken dataset.
    """
    all_names = names
    names = [n for n in names if not _is_junk(n) and not n.endswith("/")]
    parts = [n.split("/") for n in names]
    depth, prefix = _split_folders_depth(parts, where)
    layout: dict[str, list[str]] = {"train": []}
    ignored_dirs: set[str] = set()
    skipped: list[str] = []
    for n, p in zip(names, parts, strict=True):
        if len(p) < depth + 3 or (depth and p[0] + "/" != prefix):
            skipped.append(n)
            continue
        split = p[depth].lower()
        if split not in ("train", "test"):
            ignored_dirs.add(p[depth])
            continue
        if posixpath.splitext(p[-1])[1].lower() not in IMAGE_EXTENSIONS:
            skipped.append(n)
            continue
        layout.setdefault(split, []).append(n)
    _warn_unread(where, ignored_dirs, skipped)
    if not layout["train"]:
        raise DataError(f"{where}: the train/ folder holds no images ({sorted(IMAGE_EXTENSIONS)})")
    empty = sorted(_train_class_folders(all_names, depth, prefix) - {_class_of(n, prefix) for n in layout["train"]})
    if empty:
        raise DataError(
            f"{where}: class folder(s) {[f'{prefix}train/{c}/' for c in empty]} hold no images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images to them or remove them"
        )
    return prefix, layout


def _split_folders_depth(parts: list[list[str]], where: Path) -> tuple[int, str]:
    """(0, "") when train/ is at the top, (1, "<top>/") when it is inside one top-level folder."""
    top_dirs = sorted({p[0] for p in parts if len(p) > 1})

    def has_train(depth: int) -> bool:
        return any(len(p) >= depth + 3 and p[depth].lower() == "train" for p in parts)

    if has_train(0):
        return 0, ""
    if len(top_dirs) == 1 and has_train(1):
        return 1, top_dirs[0] + "/"
    raise DataError(
        f"{where}: no train/ folder found; an image folder must be laid out as "
        f"train/<class>/<image> (and optionally test/<class>/<image>), possibly inside one top-level "
        f"folder; found top-level folders {top_dirs[:10]}"
    )


def _warn_unread(where: Path, ignored_dirs: set[str], skipped: list[str]) -> None:
    """Say what of an image folder is not read: folders beside train/test, files that are not images."""
    if ignored_dirs:
        log.warning(
            "%s: ignored folder(s) %s beside train/test: only train and test are read "
            "(validation is carved from train by data.val_fraction)",
            where,
            sorted(ignored_dirs),
        )
    if skipped:
        log.warning(
            "%s: skipped %d file(s) that are not images at <split>/<class>/..., e.g. %s",
            where,
            len(skipped),
            skipped[:3],
        )


def _train_class_folders(names: list[str], depth: int, prefix: str) -> set[str]:
    """The class folder names under ``<prefix>train/`` that any member (file or folder entry) shows."""
    found = set()
    for n in names:
        parts = n.rstrip("/").split("/")
        is_folder = n.endswith("/")
        if len(parts) < depth + (2 if is_folder else 3) or (depth and parts[0] + "/" != prefix):
            continue
        if parts[depth].lower() == "train" and not _is_junk(parts[depth + 1]):
            found.add(parts[depth + 1])
    return found


def _class_of(name: str, prefix: str) -> str:
    """The class folder of an image: the folder just below its split folder."""
    return name[len(prefix) :].split("/")[1]


@dataclass
class ImageFolder:
    """An image folder's files, indexed but not decoded: names and labels per split, and the encoded files.

    Names are in sorted path order, so a tar, a zip and a folder of the same images
    give the same arrays; classes are the train folder names sorted (label = index, as
    torchvision's ImageFolder). Decoding is left to :meth:`decode`, a chunk of images
    at a time if need be: the decoded pixels can be far larger than the files, which
    stay on disk too (:class:`~resnet.data.encoded.EncodedFiles`).
    """

    path: Path
    blobs: Mapping[str, bytes]
    names: dict[str, list[str]]
    labels: dict[str, np.ndarray]
    classes: list[str]

    def decode(
        self,
        split: str,
        idx: np.ndarray | None = None,
        *,
        image_size: int | None = None,
        channels: int = 3,
        progress: bool = True,
    ) -> np.ndarray:
        """uint8 (N, H, W, channels) of the split's images ``idx`` (all by default), in that order."""
        names = self.names[split] if idx is None else [self.names[split][i] for i in idx]
        return decode_images(names, self.blobs, self.path, image_size, channels, desc=split, progress=progress)


def index_imagefolder(path: str | Path) -> ImageFolder:
    """Read ``<split>/<class>/<image>`` (train, optional test) from an archive or directory, without decoding."""
    path = Path(path)
    blobs = EncodedFiles(path)
    prefix, layout = imagefolder_layout([*blobs, *blobs.folders], path)
    classes = sorted({_class_of(n, prefix) for n in layout["train"]})
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted({_class_of(n, prefix) for n in layout.get("test", [])} - set(classes))
    if extra:
        raise DataError(
            f"{path}: test/ has class folder(s) {extra} that train/ lacks; every test class needs training images"
        )
    names = {split: sorted(found) for split, found in layout.items()}
    labels = {s: np.array([index[_class_of(n, prefix)] for n in ns], dtype=np.int64) for s, ns in names.items()}
    return ImageFolder(path, blobs, names, labels, classes)


def read_imagefolder(
    path: str | Path, *, channels: int = 3, image_size: int | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Read and decode ``<split>/<class>/<image>``: ``({"train": (x, y), ["test": (x, y)]}, classes)``.

    See :class:`ImageFolder` for the order; every image is resized to ``image_size``
    when given, otherwise all must have the same size.
    """
    folder = index_imagefolder(path)
    out = {s: (folder.decode(s, image_size=image_size, channels=channels), y) for s, y in folder.labels.items()}
    if "test" in out:
        check_same_shape(folder.path, out["train"][0], out["test"][0])
    return out, folder.classes


def check_same_shape(path: Path, train: np.ndarray, test: np.ndarray) -> None:
    """Refuse test images of another size than train's (a model takes one size)."""
    if test.shape[1:] != train.shape[1:]:
        raise DataError(
            f"{path}: test images are {test.shape[1:3]} but train images "
            f"{train.shape[1:3]}; set data.image_size to resize them all"
        )


# --------------------------------------------------------------------------- CIFAR python archives


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches allowing only the few globals numpy arrays need (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _unpickle(data: bytes, member: str, path: Path) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad batch file
        raise DataError(f"{path}: cannot read CIFAR batch {member!r}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: CIFAR batch {member!r} is a {type(obj).__name__}, expected a dict")
    return obj


def cifar_member_map(names: list[str], spec: OfficialArchive, path: Path) -> dict[str, str]:
    """Find each expected batch file (by base name) exactly once in the archive."""
    wanted = (*spec.train_files, *spec.test_files, spec.meta_file)
    found: dict[str, list[str]] = {w: [] for w in wanted}
    for n in names:
        base = posixpath.basename(n)
        if base in found and not _is_junk(n):
            found[base].append(n)
    missing = [w for w, v in found.items() if not v]
    if missing:
        raise DataError(
            f"{path} is not a CIFAR python archive: {missing} missing (expected {spec.folder}/"
            f"{{{','.join(wanted)}}}); for an image folder set data.dataset=imagefolder"
        )
    dup = {w: v for w, v in found.items() if len(v) > 1}
    if dup:
        raise DataError(f"{path}: CIFAR batch files found more than once: {dup}")
    return {v[0]: w for w, v in found.items()}


def read_cifar(path: str | Path, dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Read a CIFAR-10/100 "python version" archive: (train_x, train_y, test_x, test_y, classes).

    Images are uint8 (N, 32, 32, 3) RGB; labels int64; train is data_batch_1..5 in order
    (CIFAR-100: ``train``), labels from b'labels' (CIFAR-100: b'fine_labels').
    """
    path = Path(path)
    spec = OFFICIAL_ARCHIVES[dataset]
    blobs = {e.name: e.data for e in iter_archive(path) if e.kind == "file"}
    members = cifar_member_map(list(blobs), spec, path)
    by_base = {base: _unpickle(blobs[name] or b"", name, path) for name, base in members.items()}
    meta = by_base[spec.meta_file]
    if spec.names_key not in meta:
        raise DataError(f"{path}: {spec.meta_file} has no {spec.names_key!r}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec.names_key]]

    def batches(files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            b = by_base[f]
            if b"data" not in b or spec.label_key not in b:
                raise DataError(f"{path}: CIFAR batch {f!r} lacks b'data' or {spec.label_key!r}")
            x = np.asarray(b[b"data"], dtype=np.uint8)
            y = np.asarray(b[spec.label_key], dtype=np.int64)
            if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(x) != len(y):
                raise DataError(
                    f"{path}: CIFAR batch {f!r} has data {x.shape} and {len(y)} labels; expected (N, 3072) and N"
                )
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(y)
        y = np.concatenate(ys)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{path}: labels outside 0..{len(classes) - 1} in {files}")
        return np.ascontiguousarray(np.concatenate(xs)), y

    train_x, train_y = batches(spec.train_files)
    test_x, test_y = batches(spec.test_files)
    return train_x, train_y, test_x, test_y, classes
