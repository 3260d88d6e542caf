"""Tiny dataset archives for the tests, built on the fly (never downloaded).

* :func:`make_cifar_archive`: the CIFAR-10/100 "python version" layout (pickled
  batches with the real key names) in a .tar.gz.
* :func:`write_imagefolder`, :func:`make_tar`, :func:`make_zip`: ``<split>/<class>/<image>``
  folders and their archives, optionally inside one top-level folder.
* :func:`make_malicious_tar`, :func:`make_malicious_zip`: path traversal, links
  pointing outside, device files.
* :func:`png_bomb`, :func:`jpeg_claiming_size`: decompression bombs (a few KB that claim
  a huge image).

Importable from any test module (pytest puts tests/ on sys.path): ``from archives import ...``.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "frog")


def class_image(label: int, index: int, size: int = 8, channels: int = 3) -> np.ndarray:
    """A deterministic uint8 (size, size, channels) image; classes differ in mean colour."""
    rng = np.random.default_rng(1000 * label + index)
    base = np.array([60 + 70 * label, 200 - 60 * label, 40 + 50 * (index % 4)], dtype=np.int64)[:channels]
    noise = rng.integers(-40, 41, size=(size, size, channels))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_imagefolder(
    root: str | Path,
    *,
    classes: tuple[str, ...] = CLASSES,
    per_class: dict[str, int] | None = None,
    size: int = 8,
    fmt: str = "png",
    wrapper: str | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``[wrapper/]<split>/<class>/<NNNN>.<fmt>`` under root.

    Returns, per split, the images and labels in the order the split stage reads
    them (class folders sorted, then file names sorted). PNG is lossless, so decoded
    pixels equal these arrays exactly; JPEG is not.
    """
    per_class = {"train": 10, "test": 4} if per_class is None else per_class
    base = Path(root) / wrapper if wrapper else Path(root)
    out = {}
    for split, n in per_class.items():
        xs, ys = [], []
        for label, cls in enumerate(sorted(classes)):
            d = base / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = class_image(label, i + (0 if split == "train" else 10_000), size)
                Image.fromarray(img).save(d / f"{i:04d}.{fmt}", **({"quality": 95} if fmt == "jpg" else {}))
                xs.append(img)
                ys.append(label)
        out[split] = (np.stack(xs), np.array(ys, dtype=np.int64))
    return out


def make_tar(src: str | Path, out: str | Path, *, compression: str = "gz", fmt: int = tarfile.PAX_FORMAT) -> Path:
    """Pack the contents of folder src (not src itself) into a tar; compression '', 'gz', 'bz2' or 'xz'."""
    src, out = Path(src), Path(out)
    with tarfile.open(out, f"w:{compression}", format=fmt) as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return out


def make_zip(src: str | Path, out: str | Path) -> Path:
    """Pack the contents of folder src into a zip, folders included (as most zip tools do)."""
    src, out = Path(src), Path(out)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    return out


def _pickle_batch(obj: dict) -> bytes:
    """Protocol 2, as the official archive's Python 2 pickles (bytes keys there too), naming numpy's
    array reconstructor by its old module path numpy.core.multiarray as they do (numpy 2 says numpy._core)."""
    return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_cifar_archive(
    out: str | Path, dataset: str = "cifar10", *, per_batch: int = 6, n_test: int = 9, num_classes: int | None = None
) -> dict[str, object]:
    """A tiny CIFAR python archive: cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta
    (cifar-100-python/train, test, meta with fine labels). Returns the arrays it holds.
    """
    out = Path(out)
    num_classes = num_classes or (10 if dataset == "cifar10" else 20)
    rng = np.random.default_rng(7)
    names = [f"class{k:02d}".encode() for k in range(num_classes)]
    files: dict[str, bytes] = {}

    def batch(n: int, label: str) -> tuple[dict, np.ndarray, np.ndarray]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, num_classes, size=n)]
        obj = {b"batch_label": label.encode(), b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
        return obj, data, np.array(labels, dtype=np.int64)

    train_x, train_y = [], []
    if dataset == "cifar10":
        folder = "cifar-10-batches-py"
        for i in range(1, 6):
            obj, x, y = batch(per_batch, f"training batch {i} of 5")
            obj[b"labels"] = [int(v) for v in y]
            files[f"data_batch_{i}"] = _pickle_batch(obj)
            train_x.append(x)
            train_y.append(y)
        obj, test_x, test_y = batch(n_test, "testing batch 1 of 1")
        obj[b"labels"] = [int(v) for v in test_y]
        files["test_batch"] = _pickle_batch(obj)
        files["batches.meta"] = _pickle_batch(
            {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072}
        )
    else:
        folder = "cifar-100-python"
        obj, x, y = batch(5 * per_batch, "training batch 1 of 1")
        obj[b"fine_labels"] = [int(v) for v in y]
        obj[b"coarse_labels"] = [int(v) // 5 for v in y]
        files["train"] = _pickle_batch(obj)
        train_x.append(x)
        train_y.append(y)
        obj, test_x, test_y = batch(n_test, "testing batch 1 of 1")
        obj[b"fine_labels"] = [int(v) for v in test_y]
        obj[b"coarse_labels"] = [int(v) // 5 for v in test_y]
        files["test"] = _pickle_batch(obj)
        files["meta"] = _pickle_batch(
            {b"fine_label_names": names, b"coarse_label_names": [f"super{k}".encode() for k in range(4)]}
        )
    files["readme.html"] = b"<html>tiny test copy</html>"
    with tarfile.open(out, "w:gz") as tf:
        info = tarfile.TarInfo(folder)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        tf.addfile(info)
        for name, payload in files.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))

    def hwc(x: np.ndarray) -> np.ndarray:
        return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    return {
        "train_x": hwc(np.concatenate(train_x)),
        "train_y": np.concatenate(train_y),
        "test_x": hwc(test_x),
        "test_y": test_y,
        "classes": [n.decode() for n in names],
    }


def _png_bytes(label: int = 0, index: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(class_image(label, index)).save(buf, format="PNG")
    return buf.getvalue()


def make_malicious_tar(out: str | Path, kind: str) -> Path:
    """An otherwise valid image-folder tar.gz plus one bad member.

    kind: 'dotdot' (train/cat/../../../evil.png), 'absolute' (/tmp/evil.png),
    'symlink' (-> ../../../../etc/passwd), 'abs_symlink' (-> /etc/passwd),
    'hardlink' (to ../outside), 'device' (a character device), 'fifo'.
    """
    out = Path(out)
    with tarfile.open(out, "w:gz", format=tarfile.PAX_FORMAT) as tf:
        for cls in CLASSES:
            for i in range(2):
                data = _png_bytes(CLASSES.index(cls), i)
                info = tarfile.TarInfo(f"data/train/{cls}/{i:04d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo("data/train/cat/evil.png")
        data = _png_bytes()
        if kind == "dotdot":
            bad.name = "data/train/cat/../../../evil.png"
        elif kind == "absolute":
            bad.name = "/tmp/evil.png"
        elif kind == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "../../../../etc/passwd"
        elif kind == "abs_symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "../outside.png"
        elif kind == "device":
            bad.type, bad.devmajor, bad.devminor = tarfile.CHRTYPE, 1, 3
        elif kind == "fifo":
            bad.type = tarfile.FIFOTYPE
        else:
            raise ValueError(kind)
        if bad.isfile():
            bad.size = len(data)
            tf.addfile(bad, io.BytesIO(data))
        else:
            tf.addfile(bad)
    return out


def make_malicious_zip(out: str | Path, kind: str) -> Path:
    """A valid image-folder zip plus one bad member: 'dotdot', 'absolute', 'backslash'
    (Windows-style ..\\..\\evil.png), 'symlink' (a unix symlink entry pointing outside).
    """
    out = Path(out)
    with zipfile.ZipFile(out, "w") as zf:
        for cls in CLASSES:
            for i in range(2):
                zf.writestr(f"train/{cls}/{i:04d}.png", _png_bytes(CLASSES.index(cls), i))
        if kind == "dotdot":
            zf.writestr("train/cat/../../../evil.png", _png_bytes())
        elif kind == "absolute":
            zf.writestr(zipfile.ZipInfo("/tmp/evil.png"), _png_bytes())
        elif kind == "backslash":
            zf.writestr("train\\cat\\..\\..\\..\\evil.png", _png_bytes())
        elif kind == "symlink":
            info = zipfile.ZipInfo("train/cat/evil.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "../../../../etc/passwd")
        else:
            raise ValueError(kind)
    return out


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def md5_of(path: str | Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A valid 1-bit grayscale PNG of zeros, ``width`` x ``height``: about 50 KB on disk for 20000 x 20000.

    Written by hand (PIL would hold all the pixels to encode it).
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def jpeg_claiming_size(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose frame header claims ``width`` x ``height`` (its data is cut short for that size)."""
    buf = io.BytesIO()
    Image.fromarray(class_image(0, 0)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # baseline start of frame: length, precision, height, width
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)
