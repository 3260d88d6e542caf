"""The prepared files: ``data/prepared/{train,val,test}.npz`` and ``meta.json``, written and read.

Split files (uncompressed ``.npz``): ``images`` uint8 ``(N, H, W, C)``, ``labels``
int64 ``(N,)``; ``meta.json``: classes, mean, std, image_size, channels, counts,
source (docs/architecture.md).

A split may be larger than memory (CIFAR-10 at 224 px is 6.8 GB for train alone), so
the images are written chunk by chunk (:class:`SplitWriter`) and read memory-mapped:
an uncompressed zip member is the ``.npy`` bytes at an offset of the file, so
:func:`load_split` maps them where they lie and nothing is read until it is used.
Pages that were read stay counted in the process's resident memory until
:func:`release_pages` drops them (the kernel's page cache keeps them, so a second
read is still a memory copy).
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np

from resnet.data.errors import DataError
from resnet.utils import PipelineError, naming_write_errors, read_handover_json

__all__ = ["SPLITS", "SplitWriter", "save_npz", "load_split", "load_meta", "open_npy", "release_pages"]

SPLITS = ("train", "val", "test")


def _zip_member(zf: zipfile.ZipFile, key: str) -> IO[bytes]:
    """A stored member opened for writing, with fixed timestamps (numpy stamps the clock): byte-reproducible."""
    info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    return zf.open(info, "w", force_zip64=True)


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez, uncompressed, but byte-reproducible. A full disk is an OSError naming ``path``."""
    with naming_write_errors(path), zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            with _zip_member(zf, key) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


class SplitWriter:
    """Write one split file image chunk by chunk: the same bytes as ``save_npz(images=..., labels=...)``.

    ``with SplitWriter(path, n, (h, w, c)) as w: w.write(chunk)...; w.finish(labels)``.
    Only one chunk is in memory at a time; the zip member's checksum is computed as it goes.
    """

    def __init__(self, path: str | Path, n: int, image_shape: tuple[int, ...]) -> None:
        self.path, self.n, self.shape, self.written = Path(path), n, tuple(image_shape), 0
        with naming_write_errors(self.path):  # a full disk names the file, whichever call meets it
            self._zf = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self._member: IO[bytes] | None = _zip_member(self._zf, "images")
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False}
            np.lib.format.write_array_header_1_0(self._member, {**header, "shape": (n, *self.shape)})

    def __enter__(self) -> SplitWriter:
        return self

    def write(self, chunk: np.ndarray) -> None:
        """Append uint8 images (k, H, W, C) of the split's shape."""
        if chunk.dtype != np.uint8 or chunk.shape[1:] != self.shape or self.written + len(chunk) > self.n:
            left = self.n - self.written
            raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not fit {left} more {self.shape}")
        assert self._member is not None, "write after finish"
        with naming_write_errors(self.path):
            self._member.write(np.ascontiguousarray(chunk).data)
        self.written += len(chunk)

    def finish(self, labels: np.ndarray) -> None:
        """Close the images (all n written) and write the int64 labels."""
        if self.written != self.n or len(labels) != self.n:
            raise ValueError(f"{self.written} images and {len(labels)} labels written, {self.n} expected")
        assert self._member is not None, "finish twice"
        with naming_write_errors(self.path):
            self._member.close()
            self._member = None
            with _zip_member(self._zf, "labels") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(labels, dtype=np.int64), allow_pickle=False)

    def __exit__(self, *exc: object) -> None:
        with naming_write_errors(self.path):
            try:
                if self._member is not None:
                    self._member.close()
            finally:
                self._zf.close()


def _read_header(f: IO[bytes]) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the .npy that starts at f's position; f is left at its first data byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    if fortran or dtype.hasobject:
        raise ValueError(f"not a C-ordered plain array ({dtype}, fortran={fortran})")
    return shape, dtype


def _mapped(path: Path, start: int, size: int | None) -> np.ndarray:
    """The .npy at byte ``start`` of ``path`` (``size`` bytes at most), mapped read-only."""
    with open(path, "rb") as f:
        f.seek(start)
        shape, dtype = _read_header(f)
        offset = f.tell()
        count = int(np.prod(shape, dtype=np.int64))
        end = offset + count * dtype.itemsize
        if end > (start + size if size is not None else path.stat().st_size):
            raise ValueError(f"{count} items of {dtype} do not fit in the file")
        if count == 0:
            return np.zeros(shape, dtype)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=count, offset=offset).reshape(shape)


def _member_mapped(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """Member ``key``.npy of an npz, mapped where it lies (stored members), else read whole (compressed)."""
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as f:  # an npz from np.savez_compressed: no bytes to map
            return np.lib.format.read_array(f, allow_pickle=False)
    with open(path, "rb") as f:  # the local header's name and extra field lengths give the data's offset
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise ValueError(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    _check_crc(path, start, info)
    return _mapped(path, start, info.file_size)


def _check_crc(path: Path, start: int, info: zipfile.ZipInfo) -> None:
    """The CRC-32 the zip records for a stored member, checked as np.load would (a mapping reads no CRC).

    Read through a 16 MB buffer, not the mapping: nothing stays resident. About 4 GB/s of
    CRC here, so a few seconds for the 6.5 GB train split at 224 px, milliseconds at 32 px.
    """
    crc, left = 0, info.file_size
    buf = memoryview(bytearray(min(left, 16 * 2**20)))
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while left:
            n = f.readinto(buf[: min(left, len(buf))])
            if not n:
                raise ValueError(f"{info.filename} is cut short ({left} bytes missing)")
            crc = zlib.crc32(buf[:n], crc)
            left -= n
    if crc != info.CRC:
        raise ValueError(f"{info.filename} fails its CRC check: the file changed after the split stage wrote it")


def open_npy(path: str | Path) -> np.ndarray:
    """A .npy file mapped read-only (np.load(mmap_mode="r"), with pages :func:`release_pages` can drop)."""
    return _mapped(Path(path), 0, None)


def release_pages(array: np.ndarray) -> None:
    """Drop the pages of a mapped array (:func:`load_split`, :func:`open_npy`) from this process's resident memory.

    Reading a mapped file counts every page read as resident until the mapping goes;
    streaming a split larger than memory calls this between chunks. Not mapped: no-op.
    """
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``<prepared_dir>/<split>.npz``: uint8 images (N, H, W, C), read-only and memory-mapped, and int64 labels (N,)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise DataError(f"{path} not found; run the split stage first (`dvc repro split`)")
    try:
        with zipfile.ZipFile(path) as zf:
            images = _member_mapped(path, zf, "images")
            labels = np.array(_member_mapped(path, zf, "labels"))  # small: a copy, not a mapping
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, struct.error) as e:
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
