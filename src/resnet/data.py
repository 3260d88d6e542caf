"""Data: download (URL or path, checksum, progress), safe archive reading, decoding, splits.

Two stages use this module:

* ``download`` (:func:`download`) copies ``data.source`` (an https/http URL, a
  ``file://`` URL, a local archive or, for image folders, a directory) into
  ``data/raw/`` with ``source.json``. The archive is verified (size, md5 of the
  official CIFAR archives or a user-given ``data.sha256``) and read through once, so
  that a truncated, corrupt or malicious archive is refused here and never becomes
  an output. Everything is built aside and swapped in whole (``atomic_dir``).
* ``split`` (:func:`prepare`) reads images straight out of the archive (no 60,000
  extracted files for DVC to hash), decodes them to uint8 ``(N, H, W, C)``, carves a
  stratified, seeded validation split from train and writes
  ``data/prepared/{train,val,test}.npz`` and ``meta.json`` (docs/architecture.md).

Archive members are never extracted to disk, but every member name is still checked
as an extractor would: absolute paths, ``..`` components, links that point outside
the archive and device files are refused with :class:`DataError`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import io
import logging
import lzma
import os
import pickle
import posixpath
import re
import stat
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet.config import CIFAR10_URL, CIFAR100_URL, DataParams
from resnet.utils import PipelineError, atomic_dir, progress_enabled, read_json, workspace_root, write_json

__all__ = [
    "DataError",
    "OFFICIAL_ARCHIVES",
    "SPLITS",
    "IMAGE_EXTENSIONS",
    "Entry",
    "download",
    "prepare",
    "load_split",
    "load_meta",
    "check_member_name",
    "iter_archive",
    "iter_directory",
    "read_cifar",
    "read_imagefolder",
    "decode_image",
    "to_grayscale",
    "stratified_split",
    "cap_per_class",
    "channel_stats",
    "save_npz",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
OFFLINE_HINT = (
    "point data.source at a local copy of the archive (a path or file:// URL), e.g. "
    "`dvc exp run -S data.dataset=imagefolder -S data.source=../shared/datasets/cifar10-jpeg.tar.gz`, "
    "or edit data.dataset and data.source in params.yaml"
)
_CHUNK = 1 << 20


class DataError(PipelineError, RuntimeError):
    """The data source is unreachable, corrupt, unsafe or not laid out as expected."""


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
        CIFAR10_URL, "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        b"labels", b"label_names"),
    "cifar100": OfficialArchive(
        CIFAR100_URL, "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
        ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names"),
}


# --------------------------------------------------------------------------- safety


def check_member_name(name: str, archive: str | Path = "archive", *, folder: bool = False) -> str:
    """Return the normalised (posix, no ``./``) form of an archive member name, or refuse it.

    Refused, as a safe extractor would: empty names, NUL bytes, absolute paths
    (``/x``, ``\\x``, ``C:x``) and any ``..`` component (backslashes count as
    separators, so Windows-style traversal is caught too). A folder may be the root
    itself (``./``, as ``tar -C dir .`` writes); its normalised name is then ``""``.
    """
    if not name or "\x00" in name:
        raise DataError(f"{archive}: refused member {name!r}: empty name or NUL byte")
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha()):
        raise DataError(f"{archive}: refused member {name!r}: absolute path (path traversal)")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive}: refused member {name!r}: '..' component (path traversal)")
    if not parts and not folder:
        raise DataError(f"{archive}: refused member {name!r}: a file cannot be the archive root")
    return "/".join(parts)


def _link_target(name: str, target: str, archive: str | Path, *, relative_to_member: bool) -> str:
    """Normalised in-archive path a link points at; refuse links that leave the archive."""
    if not target or target.startswith(("/", "\\")) or (len(target) > 1 and target[1] == ":" and target[0].isalpha()):
        raise DataError(f"{archive}: refused link {name!r} -> {target!r}: absolute target points outside the archive")
    base = posixpath.dirname(name) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if joined == ".." or joined.startswith("../") or joined in (".", ""):
        raise DataError(f"{archive}: refused link {name!r} -> {target!r}: it points outside the archive")
    return joined


@dataclass
class Entry:
    """One archive or directory member: a regular file (with its bytes) or a link to another member."""

    name: str
    kind: str  # "file" or "link"
    data: bytes | None = None
    target: str | None = None


def _corrupt(path: Path, err: BaseException) -> DataError:
    return DataError(
        f"{path} is truncated or corrupt ({type(err).__name__}: {err}); download it again "
        f"(`dvc repro -f download`) or check data.source"
    )


def _archive_format(path: Path) -> str:
    """'zip', 'gz', 'bz2', 'xz' or 'tar', from the file's first bytes (URLs need not end in .tar.gz)."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for fmt, magic in (("gz", b"\x1f\x8b"), ("bz2", b"BZh"), ("xz", b"\xfd7zXZ\x00")):
        if head.startswith(magic):
            return fmt
    return "tar"


def iter_archive(path: str | Path, *, read_data: bool = True) -> Iterator[Entry]:
    """Yield the files and links of a tar (plain, gz, bz2, xz) or zip archive, checking every member.

    Directories are skipped; device files, fifos, unsafe names and links pointing
    outside the archive raise :class:`DataError`, as do truncated or corrupt archives.
    Tar archives are read in one sequential pass by a small header reader (ustar, GNU
    and pax formats; ten times faster than :mod:`tarfile` on 60,000 small members);
    anything it does not know (sparse files, global pax headers...) is handed to tarfile.
    """
    path = Path(path)
    fmt = _archive_format(path)
    if fmt == "zip":
        yield from _iter_zip(path, read_data)
        return
    yielded = 0
    try:
        for entry in _iter_tar_fast(path, fmt, read_data):
            yielded += 1
            yield entry
    except _Unsupported as e:
        log.info("%s: %s; reading it with tarfile instead", path, e)
        for i, entry in enumerate(_iter_tarfile(path, read_data)):
            if i >= yielded:  # the fast reader already handed out the members before the odd one
                yield entry


class _Unsupported(Exception):
    """A tar feature the fast reader leaves to tarfile."""


_ZERO_BLOCK = bytes(512)


def _nts(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _tar_number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise _Unsupported("negative base-256 number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\x00", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _pax_records(payload: bytes) -> dict[str, str]:
    """Parse pax extended-header records ``"<len> <key>=<value>\\n"``."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        space = payload.index(b" ", pos)
        length = int(payload[pos:space])
        if length <= 0:
            raise ValueError("bad pax record length")
        key, _, value = payload[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _open_stream(path: Path, fmt: str) -> Any:
    import bz2
    import gzip

    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(fmt, open)
    return opener(path, "rb")


def _iter_tar_fast(path: Path, fmt: str, read_data: bool) -> Iterator[Entry]:
    """The tar reader behind :func:`iter_archive` (see there)."""
    def read_exact(f: Any, n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise DataError(f"{path} is truncated: it ends inside a member; download it again "
                            f"(`dvc repro -f download`) or check data.source")
        return data

    try:
        with _open_stream(path, fmt) as f:
            pax: dict[str, str] = {}
            long_name = long_link = None
            first = True
            while True:
                hdr = f.read(512)
                if not hdr and first:
                    raise DataError(f"{path} is empty; data.source must be a tar or zip archive")
                if len(hdr) < 512:
                    raise DataError(f"{path} is truncated: no end-of-archive marker; download it again "
                                    f"(`dvc repro -f download`) or check data.source")
                if hdr == _ZERO_BLOCK:
                    return
                try:
                    stored = _tar_number(hdr[148:156])
                except ValueError:
                    stored = -1
                unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])
                # Some old tars summed signed chars; only computed when needed (it is slow in Python).
                if stored != unsigned and stored != unsigned - 2 * sum(b for b in hdr if b > 127) + 2 * sum(
                        b for b in hdr[148:156] if b > 127):
                    if first:
                        raise DataError(f"{path} is not a tar or zip archive (first bytes {hdr[:16]!r}); "
                                        f"data.source must be a .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .zip")
                    raise DataError(f"{path} is corrupt: bad tar header checksum; download it again "
                                    f"(`dvc repro -f download`) or check data.source")
                first = False
                kind = hdr[156:157]
                size = _tar_number(hdr[124:136])
                name, linkname = _nts(hdr[0:100]), _nts(hdr[157:257])
                if hdr[257:263] == b"ustar\x00":  # POSIX ustar: a name prefix field (GNU uses it for times)
                    prefix = _nts(hdr[345:500])
                    if prefix:
                        name = f"{prefix}/{name}"
                if kind in (b"x", b"g", b"L", b"K"):
                    payload = read_exact(f, size)
                    read_exact(f, -size % 512)
                    if kind == b"g":
                        # Global records (git archive writes a commit id 'comment'): harmless unless they
                        # rename or resize members, which only tarfile handles.
                        if set(_pax_records(payload)) & {"path", "linkpath", "size"}:
                            raise _Unsupported("global pax header that renames or resizes members")
                    elif kind == b"x":
                        pax.update(_pax_records(payload))
                        if any(k.startswith("GNU.sparse") for k in pax):
                            raise _Unsupported("GNU sparse file in pax format")
                    elif kind == b"L":
                        long_name = _nts(payload)
                    else:
                        long_link = _nts(payload)
                    continue
                if kind not in (b"0", b"\x00", b"7", b"1", b"2", b"3", b"4", b"5", b"6"):
                    raise _Unsupported(f"tar member type {kind!r}")
                name = pax.get("path", long_name or name)
                linkname = pax.get("linkpath", long_link or linkname)
                if "size" in pax:
                    size = int(pax["size"])
                pax, long_name, long_link = {}, None, None
                raw_name = name
                if kind in (b"0", b"\x00", b"7") and raw_name.endswith("/"):
                    kind = b"5"  # old tars mark folders by a trailing slash only
                checked = check_member_name(raw_name, path, folder=kind == b"5")
                data = None
                if kind in (b"0", b"\x00", b"7"):
                    if read_data:
                        data = read_exact(f, size)
                        read_exact(f, -size % 512)
                    else:
                        read_exact(f, size + (-size % 512))
                    yield Entry(checked, "file", data=data)
                    continue
                read_exact(f, size + (-size % 512))  # links and folders carry no data; skip any
                if kind == b"5":
                    continue
                if kind in (b"1", b"2"):
                    target = _link_target(checked, linkname, path, relative_to_member=kind == b"2")
                    yield Entry(checked, "link", target=target)
                    continue
                raise DataError(f"{path}: refused member {raw_name!r}: device file, fifo or other special file "
                                f"(tar type {kind!r}); "
                                f"an image archive holds only folders and files")
    except (DataError, _Unsupported):
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise _corrupt(path, e) from None


def _iter_tarfile(path: Path, read_data: bool) -> Iterator[Entry]:
    """The same as the fast reader, through :mod:`tarfile` (stream mode)."""
    try:
        tf = tarfile.open(path, mode="r|*")
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise DataError(f"{path} is not a readable tar or zip archive ({e}); data.source must be a "
                        f".tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .zip archive") from None
    try:
        with tf:
            for m in tf:
                name = check_member_name(m.name, path, folder=m.isdir())
                if m.isdir():
                    continue
                if m.issym() or m.islnk():
                    # Symlink targets are relative to the link's folder, hardlink targets to the root.
                    target = _link_target(name, m.linkname, path, relative_to_member=m.issym())
                    yield Entry(name, "link", target=target)
                elif m.isfile():
                    data = None
                    if read_data:
                        f = tf.extractfile(m)
                        data = f.read() if f is not None else b""
                        if len(data) != m.size:
                            raise tarfile.ReadError(f"member {m.name!r} is cut short")
                    yield Entry(name, "file", data=data)
                else:
                    raise DataError(f"{path}: refused member {m.name!r}: device file, fifo or other special "
                                    f"file (tar type {m.type!r}); an image archive holds only folders and files")
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise _corrupt(path, e) from None


def _iter_zip(path: Path, read_data: bool) -> Iterator[Entry]:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = check_member_name(info.filename, path, folder=info.is_dir())
                if info.is_dir():
                    continue
                # Unix file-type bits, when the zip was made on unix (0 = not recorded: a plain file).
                ftype = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
                if ftype == stat.S_IFLNK:
                    target = zf.read(info).decode("utf-8", "replace")
                    yield Entry(name, "link", target=_link_target(name, target, path, relative_to_member=True))
                elif ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                    mode = info.external_attr >> 16
                    raise DataError(f"{path}: refused member {info.filename!r}: device file, fifo or socket "
                                    f"(mode {oct(mode)}); an image archive holds only folders and files")
                else:
                    # Zip has per-member CRCs: reading (always) is what catches corrupt data.
                    data = zf.read(info)
                    yield Entry(name, "file", data=data if read_data else None)
    except DataError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error, ValueError,
            NotImplementedError) as e:
        raise _corrupt(path, e) from None


def iter_directory(root: str | Path, *, read_data: bool = True) -> Iterator[Entry]:
    """Yield the files under ``root`` (sorted walk) like :func:`iter_archive` does for an archive.

    Symlinks are followed only when they resolve inside ``root``; special files are refused.
    """
    root = Path(root)
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        # Symlinked folders are not walked by os.walk; check them like files.
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                _check_inside(p, real_root)
                dirnames.remove(d)
                log.warning("%s: symlinked folder %s is not followed", root, p.relative_to(root))
        for fname in sorted(filenames):
            p = here / fname
            rel = p.relative_to(root).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                real = _check_inside(p, real_root)
                if not real.is_file():
                    raise DataError(f"{root}: refused {rel!r}: link to something that is not a regular file")
            elif not stat.S_ISREG(st.st_mode):
                raise DataError(f"{root}: refused {rel!r}: device file, fifo or socket; "
                                f"an image folder holds only folders and files")
            yield Entry(rel, "file", data=p.read_bytes() if read_data else None)


def _check_inside(p: Path, real_root: Path) -> Path:
    real = p.resolve()
    if real != real_root and real_root not in real.parents:
        raise DataError(f"refused {p}: symlink to {os.readlink(p)!r} points outside {real_root}")
    return real


def _resolve_links(files: dict[str, bytes | None], links: dict[str, str], where: Path) -> None:
    """Turn in-archive links into copies of their targets' bytes (chains allowed, no cycles)."""
    for name in list(links):
        target, seen = links[name], {name}
        while target in links and target not in seen:
            seen.add(target)
            target = links[target]
        if target not in files:
            raise DataError(f"{where}: link {name!r} points to {links[name]!r}, which is not a file in the archive")
        files[name] = files[target]


# --------------------------------------------------------------------------- download


def _source_kind(source: str) -> tuple[str, str | Path]:
    """('url', url) for http(s), ('path', Path) for file:// URLs and local paths."""
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return "url", source
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise DataError(f"data.source: {source!r}: file:// URLs must name a local file (file:///abs/path)")
        return "path", Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:  # one letter is a Windows drive
        raise DataError(f"data.source: unsupported URL scheme {parsed.scheme!r} in {source!r}; "
                        f"use https://, http://, file:// or a local path")
    path = Path(source).expanduser()
    if not path.is_absolute() and not path.exists() and workspace_root() != Path.cwd().resolve():
        # A DVC temporary copy (dvc exp run --temp, queued runs) sits two levels below
        # .dvc/tmp/exps/: resolve paths the user wrote from the repository itself. The
        # stage runs in the copy, but DVC points DVC_ROOT at the repository, so compare
        # with the working directory, not with repo_root().
        path = workspace_root() / path
    return "path", path


def _archive_filename(source: str, dataset: str) -> str:
    """A safe file name for the copy in data/raw: the source's own name when it has one."""
    tail = posixpath.basename(urllib.parse.urlparse(source).path) if "://" in source else Path(source).name
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", tail)
    if not tail or tail.startswith(".") or tail == "source.json":
        tail = f"{dataset}-archive"
    return tail


def _open_url(url: str, timeout: float) -> Any:
    """urlopen with a hard deadline: the socket timeout does not cover DNS look-ups, this does."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "resnet-pipeline"})
            result["response"] = urllib.request.urlopen(req, timeout=timeout)
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"no answer within {timeout:g} s (data.timeout)")
    if "error" in result:
        raise result["error"]
    return result["response"]


class _Hashes:
    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    def update(self, chunk: bytes) -> None:
        self.sha256.update(chunk)
        self.md5.update(chunk)
        self.size += len(chunk)


def _fetch_url(url: str, dest: Path, timeout: float) -> _Hashes:
    """Stream url to dest with a progress bar; the size is checked against Content-Length."""
    from tqdm import tqdm

    start = time.monotonic()
    try:
        response = _open_url(url, timeout)
    except urllib.error.HTTPError as e:
        raise DataError(f"cannot download {url}: the server answered {e.code} {e.reason}; check data.source, "
                        f"or {OFFLINE_HINT}") from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {url}: {reason} (after {time.monotonic() - start:.1f} s). "
                        f"This machine may be offline; {OFFLINE_HINT}") from None
    hashes = _Hashes()
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        log.info("downloading %s (%s)", url, f"{total / 2**20:.1f} MiB" if total else "size unknown")
        try:
            with open(dest, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                               desc=dest.name, disable=not progress_enabled()) as bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    hashes.update(chunk)
                    bar.update(len(chunk))
        except (OSError, TimeoutError, ValueError, http.client.HTTPException) as e:
            # A stalled socket (data.timeout), a dropped connection, IncompleteRead.
            raise DataError(f"download of {url} failed after {hashes.size} bytes ({type(e).__name__}: {e}); "
                            f"run the stage again") from None
    if total is not None and hashes.size != total:
        raise DataError(f"download of {url} is truncated: {hashes.size} of {total} bytes; run the stage again")
    return hashes


def _copy_file(src: Path, dest: Path) -> _Hashes:
    hashes = _Hashes()
    with open(src, "rb") as inp, open(dest, "wb") as out:
        while chunk := inp.read(_CHUNK):
            out.write(chunk)
            hashes.update(chunk)
    return hashes


def _copy_tree(src: Path, dest: Path) -> tuple[str, int, int]:
    """Copy an image folder (files only, links resolved inside it); return (tree sha256, bytes, files).

    The tree digest is the sha256 of the sorted lines ``<sha256 of file>  <relative path>``
    (the output of ``sha256sum`` over the sorted file list), so it is reproducible by hand.
    """
    digests: dict[str, str] = {}
    size = 0
    for entry in iter_directory(src):
        data = entry.data or b""
        out = dest / entry.name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        digests[entry.name] = hashlib.sha256(data).hexdigest()
        size += len(data)
    listing = "".join(f"{digests[n]}  {n}\n" for n in sorted(digests))
    return hashlib.sha256(listing.encode()).hexdigest(), size, len(digests)


def _verify(hashes: _Hashes, params: DataParams, source: str) -> None:
    """Compare with data.sha256 when given, else with the official md5 of a CIFAR archive."""
    if params.sha256:
        got = hashes.sha256.hexdigest()
        if got != params.sha256.lower():
            raise DataError(f"checksum mismatch for {source}: its sha256 is {got} but data.sha256 expects "
                            f"{params.sha256.lower()}; the file is corrupt or another archive: fetch it again, "
                            f"or correct data.sha256")
        log.info("sha256 verified: %s", got)
    elif params.dataset in OFFICIAL_ARCHIVES:
        official = OFFICIAL_ARCHIVES[params.dataset]
        got = hashes.md5.hexdigest()
        if got != official.md5:
            raise DataError(f"checksum mismatch for {source}: md5 {got}, but the official {params.dataset} archive "
                            f"({official.url}) has md5 {official.md5}; the file is corrupt or not the official "
                            f"archive: fetch it again, or if you trust this archive set data.sha256 to "
                            f"{hashes.sha256.hexdigest()}")
        log.info("md5 verified against the official %s checksum: %s", params.dataset, got)
    else:
        log.info("no checksum to verify (data.sha256 is null); recorded sha256 %s", hashes.sha256.hexdigest())


def _check_content(path: Path, dataset: str) -> dict[str, Any]:
    """Read the archive through once: every member checked, the expected layout present."""
    names = [e.name for e in iter_archive(path, read_data=False)]
    if dataset in OFFICIAL_ARCHIVES:
        _cifar_member_map(names, OFFICIAL_ARCHIVES[dataset], path)
        return {"members": len(names)}
    _, layout = _imagefolder_layout(names, path)
    return {"members": len(names), "splits": {s: len(v) for s, v in layout.items()}}


def download(params: DataParams, raw_dir: str | Path = "data/raw") -> dict[str, Any]:
    """Fetch ``params.source`` into ``raw_dir`` with ``source.json``; return what source.json holds.

    The whole of ``raw_dir`` is built aside and swapped in only after the size, the
    checksum and every archive member have been checked, so a failure leaves nothing
    behind that the split stage could take for valid.
    """
    raw_dir = Path(raw_dir)
    kind, where = _source_kind(params.source)
    if kind == "path":
        where = Path(where)
        if not where.exists():
            raise DataError(f"data.source: {params.source!r} not found (looked at {where.absolute()}); give the "
                            f"path of the archive (relative to the repository root) or a URL")
        if where.is_dir() and params.dataset != "imagefolder":
            raise DataError(f"data.source: {params.source!r} is a directory; data.dataset={params.dataset} needs the "
                            f"official archive (.tar.gz); directories are read only with data.dataset=imagefolder")
    with atomic_dir(raw_dir) as tmp:
        info: dict[str, Any]
        if kind == "path" and Path(where).is_dir():
            name = _archive_filename(str(where.resolve()), params.dataset)
            log.info("copying image folder %s", where)
            digest, size, count = _copy_tree(Path(where), tmp / name)
            if params.sha256 and digest != params.sha256.lower():
                raise DataError(f"checksum mismatch for folder {params.source}: tree sha256 {digest}, data.sha256 "
                                f"expects {params.sha256.lower()}; correct data.sha256 or set it to null")
            _, layout = _imagefolder_layout(_relative_names(tmp / name), Path(where))
            info = {"kind": "directory", "sha256_of": "sorted `sha256sum` lines of the folder's files",
                    "members": count, "splits": {s: len(v) for s, v in layout.items()}}
        else:
            name = _archive_filename(params.source, params.dataset)
            dest = tmp / name
            if kind == "url":
                hashes = _fetch_url(str(where), dest, params.timeout)
            else:
                log.info("copying %s", where)
                hashes = _copy_file(Path(where), dest)
            digest, size = hashes.sha256.hexdigest(), hashes.size
            _verify(hashes, params, params.source)
            try:
                info = {"kind": "archive", "md5": hashes.md5.hexdigest(), **_check_content(dest, params.dataset)}
            except DataError as e:  # name the user's source, not the temporary copy
                raise DataError(str(e).replace(str(dest), params.source)) from None
        record = {
            "source": params.source,
            "dataset": params.dataset,
            "path": name,
            "sha256": digest,
            "size": size,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **info,
        }
        write_json(tmp / "source.json", record)
    log.info("%s: %s (%d bytes, sha256 %s)", raw_dir / name, record["kind"], size, digest)
    return record


def _relative_names(root: Path) -> list[str]:
    return [e.name for e in iter_directory(root, read_data=False)]


# --------------------------------------------------------------------------- reading


def _is_junk(name: str) -> bool:
    """Hidden files and OS litter (macOS resource forks, Thumbs.db) are not data."""
    parts = name.split("/")
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1] in ("Thumbs.db", "desktop.ini")


def _imagefolder_layout(names: list[str], where: Path) -> tuple[str, dict[str, list[str]]]:
    """(prefix, {'train': names, ['test': names]}): where the split folders are, and their images.

    Layout: ``<split>/<class>/.../<image>``, optionally inside one top-level folder
    (``cifar10/train/...``). Split folder names match case-insensitively.
    """
    names = [n for n in names if not _is_junk(n)]
    parts = [n.split("/") for n in names]
    top_dirs = sorted({p[0] for p in parts if len(p) > 1})

    def has_train(depth: int) -> bool:
        return any(len(p) >= depth + 3 and p[depth].lower() == "train" for p in parts)

    if has_train(0):
        depth, prefix = 0, ""
    elif len(top_dirs) == 1 and has_train(1):
        depth, prefix = 1, top_dirs[0] + "/"
    else:
        raise DataError(
            f"{where}: no train/ folder found; an image folder must be laid out as "
            f"train/<class>/<image> (and optionally test/<class>/<image>), possibly inside one top-level "
            f"folder; found top-level folders {top_dirs[:10]}")
    layout: dict[str, list[str]] = {"train": []}
    ignored_dirs: set[str] = set()
    skipped: list[str] = []
    for n, p in zip(names, parts):
        if len(p) < depth + 3 or (depth and p[0] != top_dirs[0]):
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
    if ignored_dirs:
        log.warning("%s: ignored folder(s) %s beside train/test: only train and test are read "
                    "(validation is carved from train by data.val_fraction)", where, sorted(ignored_dirs))
    if skipped:
        log.warning("%s: skipped %d file(s) that are not images at <split>/<class>/..., e.g. %s",
                    where, len(skipped), skipped[:3])
    if not layout["train"]:
        raise DataError(f"{where}: the train/ folder holds no images ({sorted(IMAGE_EXTENSIONS)})")
    return prefix, layout


def _class_of(name: str, prefix: str) -> str:
    """The class folder of an image: the folder just below its split folder."""
    return name[len(prefix):].split("/")[1]


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches allowing only the few globals numpy arrays need (no code execution)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):  # numpy 2 moved numpy.core to numpy._core
            module = "numpy._core" + module[len("numpy.core"):]
        return super().find_class(module, name)


def _unpickle(data: bytes, member: str, path: Path) -> dict:
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # any unpickling failure means a bad batch file
        raise DataError(f"{path}: cannot read CIFAR batch {member!r}: {e}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: CIFAR batch {member!r} is a {type(obj).__name__}, expected a dict")
    return obj


def _cifar_member_map(names: list[str], spec: OfficialArchive, path: Path) -> dict[str, str]:
    """Find each expected batch file (by base name) exactly once in the archive."""
    wanted = (*spec.train_files, *spec.test_files, spec.meta_file)
    found: dict[str, list[str]] = {w: [] for w in wanted}
    for n in names:
        base = posixpath.basename(n)
        if base in found and not _is_junk(n):
            found[base].append(n)
    missing = [w for w, v in found.items() if not v]
    if missing:
        raise DataError(f"{path} is not a CIFAR python archive: {missing} missing (expected {spec.folder}/"
                        f"{{{','.join(wanted)}}}); for an image folder set data.dataset=imagefolder")
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
    members = _cifar_member_map(list(blobs), spec, path)
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
                raise DataError(f"{path}: CIFAR batch {f!r} has data {x.shape} and {len(y)} labels; "
                                f"expected (N, 3072) and N")
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(y)
        y = np.concatenate(ys)
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{path}: labels outside 0..{len(classes) - 1} in {files}")
        return np.ascontiguousarray(np.concatenate(xs)), y

    train_x, train_y = batches(spec.train_files)
    test_x, test_y = batches(spec.test_files)
    return train_x, train_y, test_x, test_y, classes


# --------------------------------------------------------------------------- decoding


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """RGB uint8 (..., 3) to (..., 1) with PIL's ITU-R 601-2 luma, in PIL's integer arithmetic."""
    rgb = images.astype(np.uint32)
    y = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)[..., None]


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.array(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))


def decode_image(data: bytes, *, channels: int = 3, image_size: int | None = None) -> np.ndarray:
    """Decode one encoded image to uint8 (H, W, channels), resized to image_size x image_size if given.

    This is the split stage's preprocessing; inference should call it too so that
    its inputs match training. RGB first (alpha dropped, palettes expanded), then
    resize (bilinear, antialiased; aspect ratio not kept), then grayscale if asked.
    JPEGs at native size go through torchvision's libjpeg-turbo decoder (4x faster
    than PIL here, same pixels); everything else through PIL.
    """
    arr = None
    if image_size is None and data[:3] == b"\xff\xd8\xff":
        arr = _decode_jpeg_fast(data)
    if arr is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as im:
                if image_size is not None:
                    # JPEG: decode at the smallest 1/2^k scale still >= image_size (much faster for photos).
                    im.draft("RGB", (image_size, image_size))
                arr = np.array(im.convert("RGB"))  # a writable copy (asarray's is read-only)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise DataError(f"cannot decode image: {e}") from None
        if image_size is not None:
            arr = _resize(arr, image_size)
    return to_grayscale(arr) if channels == 1 else arr


def _decode_jpeg_fast(data: bytes) -> np.ndarray | None:
    decoded = _decode_jpeg_batch([data])
    if decoded is None or decoded[0] is None:
        return None
    return np.ascontiguousarray(decoded[0].permute(1, 2, 0).numpy())


def _decode_jpeg_batch(blobs: list[bytes]) -> list[Any] | None:
    """Decode JPEGs with torchvision in one call: CHW uint8 tensors, None where it fails (PIL then tries).

    One call for many images: 34 us an image here against 120 us through a per-image
    Python wrapper. Returns None when torchvision is unavailable.
    """
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision is a dependency, but PIL alone is enough
        return None
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders (moving to torchcodec); when they are gone the
        # import above fails and PIL does the work.
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB)
        except RuntimeError:  # one odd file (CMYK, corrupt) fails the call: go one by one
            out = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB))
                except RuntimeError:
                    out.append(None)
    return [t if t is not None and t.dtype == torch.uint8 and t.ndim == 3 and t.shape[0] == 3 else None
            for t in out]


def _decode_all(names: list[str], blobs: dict[str, bytes | None], where: Path, channels: int,
                image_size: int | None, desc: str) -> np.ndarray:
    """Decode the named members to one uint8 (N, H, W, C) array, in the order given."""
    import torch
    from tqdm import tqdm

    chunk = 1024
    out: list[Any] = []
    with tqdm(total=len(names), desc=f"decoding {desc}", unit="img", disable=not progress_enabled()) as bar:
        for start in range(0, len(names), chunk):
            part = names[start:start + chunk]
            data = [blobs[n] or b"" for n in part]
            fast: list[Any] = [None] * len(part)
            jpeg = [i for i, d in enumerate(data) if d[:3] == b"\xff\xd8\xff"] if image_size is None else []
            if jpeg:
                decoded = _decode_jpeg_batch([data[i] for i in jpeg])
                if decoded is not None:
                    for i, t in zip(jpeg, decoded):
                        fast[i] = t
            for i, n in enumerate(part):
                if fast[i] is None:
                    try:
                        arr = decode_image(data[i], channels=3, image_size=image_size)
                    except DataError as e:
                        raise DataError(f"{where}: {n}: {e}; remove or replace the file") from None
                    fast[i] = torch.from_numpy(arr).permute(2, 0, 1)
            out.extend(fast)
            bar.update(len(part))
    shapes = {tuple(t.shape) for t in out}
    if len(shapes) > 1:
        first = out[0].shape
        odd = next(n for n, t in zip(names, out) if t.shape != first)
        raise DataError(f"{where}: images differ in size ({odd} is {out[names.index(odd)].shape[2]}x"
                        f"{out[names.index(odd)].shape[1]}, {names[0]} is {first[2]}x{first[1]}); "
                        f"set data.image_size to resize them all")
    images = torch.stack(out).permute(0, 2, 3, 1).contiguous().numpy()
    return to_grayscale(images) if channels == 1 else images


def read_imagefolder(path: str | Path, *, channels: int = 3, image_size: int | None = None
                     ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Read ``<split>/<class>/<image>`` from an archive or directory.

    Returns ``({"train": (x, y), ["test": (x, y)]}, classes)``; classes are the train
    folder names sorted (label = index, as torchvision's ImageFolder), images are in
    sorted path order, so a tar, a zip and a folder of the same images give the same arrays.
    """
    path = Path(path)
    entries = iter_directory(path) if path.is_dir() else iter_archive(path)
    blobs: dict[str, bytes | None] = {}
    links: dict[str, str] = {}
    for e in entries:
        if e.kind == "link":
            links[e.name] = e.target or ""
        else:
            blobs[e.name] = e.data
    _resolve_links(blobs, links, path)
    prefix, layout = _imagefolder_layout(list(blobs), path)
    classes = sorted({_class_of(n, prefix) for n in layout["train"]})
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted({_class_of(n, prefix) for n in layout.get("test", [])} - set(classes))
    if extra:
        raise DataError(f"{path}: test/ has class folder(s) {extra} that train/ lacks; every test class needs "
                        f"training images")
    out = {}
    for split, names in layout.items():
        names = sorted(names)
        x = _decode_all(names, blobs, path, channels, image_size, split)
        y = np.array([index[_class_of(n, prefix)] for n in names], dtype=np.int64)
        out[split] = (x, y)
    if "test" in out and out["test"][0].shape[1:] != out["train"][0].shape[1:]:
        raise DataError(f"{path}: test images are {out['test'][0].shape[1:3]} but train images "
                        f"{out['train'][0].shape[1:3]}; set data.image_size to resize them all")
    return out, classes


# --------------------------------------------------------------------------- splitting


def _rng(seed: int, purpose: int) -> np.random.Generator:
    """One independent stream per purpose, so e.g. max_per_class does not shift the val split's draw."""
    return np.random.default_rng(np.random.SeedSequence([seed, purpose]))


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def stratified_split(labels: np.ndarray, fraction: float, seed: int, *, purpose: int = 1
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
        stds.append(var ** 0.5)
    return means, stds


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez, uncompressed, but byte-reproducible: fixed zip timestamps (numpy stamps the clock)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, arr in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
    src_file = raw_dir / "source.json"
    if not src_file.is_file():
        raise DataError(f"{src_file} not found; run the download stage first (`dvc repro download`)")
    source = read_json(src_file)
    if source.get("dataset") != params.dataset:
        raise DataError(f"{raw_dir} holds dataset {source.get('dataset')!r} but data.dataset is {params.dataset!r}; "
                        f"run the download stage again (`dvc repro download`)")
    path = raw_dir / source["path"]
    if source.get("kind") == "archive":
        got = _sha256_file(path)
        if got != source["sha256"]:
            raise DataError(f"{path} has sha256 {got}, but source.json records {source['sha256']}; the copy was "
                            f"modified: run `dvc repro -f download`")
    t0 = time.monotonic()
    if params.dataset in OFFICIAL_ARCHIVES:
        train_x, train_y, test_x, test_y, classes = read_cifar(path, params.dataset)
        if params.image_size is not None and params.image_size != 32:
            train_x = np.stack([_resize(a, params.image_size) for a in train_x])
            test_x = np.stack([_resize(a, params.image_size) for a in test_x])
        if params.channels == 1:
            train_x, test_x = to_grayscale(train_x), to_grayscale(test_x)
        test_origin = "archive"
    else:
        splits, classes = read_imagefolder(path, channels=params.channels, image_size=params.image_size)
        train_x, train_y = splits["train"]
        if "test" in splits:
            test_x, test_y = splits["test"]
            test_origin = "archive"
        else:
            keep, take = stratified_split(train_y, params.test_fraction, params.seed, purpose=2)
            test_x, test_y = train_x[take], train_y[take]
            train_x, train_y = train_x[keep], train_y[keep]
            test_origin = f"carved from train (data.test_fraction={params.test_fraction})"
            log.info("no test/ folder: %d test images carved from train, stratified", len(test_y))
    log.info("read %d train-pool and %d test images of %d classes in %.1f s",
             len(train_y), len(test_y), len(classes), time.monotonic() - t0)

    if params.max_per_class is not None:
        pool_counts = np.bincount(train_y, minlength=len(classes))
        test_counts = np.bincount(test_y, minlength=len(classes))
        fractions = {c: min(1.0, params.max_per_class / n) for c, n in enumerate(pool_counts) if n}
        sel = cap_per_class(train_y, {c: params.max_per_class for c in range(len(classes))}, params.seed, purpose=3)
        train_x, train_y = train_x[sel], train_y[sel]
        test_caps = {c: max(1, _round_half_up(test_counts[c] * fractions.get(c, 1.0))) for c in range(len(classes))}
        sel = cap_per_class(test_y, test_caps, params.seed, purpose=4)
        test_x, test_y = test_x[sel], test_y[sel]
        log.info("max_per_class=%d: %d train-pool and %d test images kept", params.max_per_class,
                 len(train_y), len(test_y))

    keep, take = stratified_split(train_y, params.val_fraction, params.seed, purpose=1)
    parts = {"train": (train_x[keep], train_y[keep]), "val": (train_x[take], train_y[take]),
             "test": (test_x, test_y)}
    empty = [s for s, (_, y) in parts.items() if len(y) == 0]
    if empty:
        raise DataError(f"the {' and '.join(empty)} split(s) would be empty ({len(train_y)} train-pool images of "
                        f"{len(classes)} classes); every class needs at least 2 training images: raise "
                        f"data.max_per_class or data.val_fraction, or add images")
    mean, std = channel_stats(parts["train"][0])
    h, w, c = parts["train"][0].shape[1:]
    meta = {
        "dataset": params.dataset,
        "classes": classes,
        "num_classes": len(classes),
        "image_size": [int(h), int(w)],
        "channels": int(c),
        "mean": mean,
        "std": std,
        "sizes": {s: int(len(y)) for s, (_, y) in parts.items()},
        "counts": {s: {classes[k]: int(n) for k, n in enumerate(np.bincount(y, minlength=len(classes)))}
                   for s, (_, y) in parts.items()},
        "source": source["source"],
        "source_sha256": source["sha256"],
        "test_split": test_origin,
        "seed": params.seed,
        "val_fraction": params.val_fraction,
        "max_per_class": params.max_per_class,
    }
    with atomic_dir(out_dir) as tmp:
        for s, (x, y) in parts.items():
            save_npz(tmp / f"{s}.npz", images=x, labels=y)
        write_json(tmp / "meta.json", meta)
    log.info("wrote %s: train %d, val %d, test %d images (%dx%dx%d), mean %s, std %s", out_dir,
             *meta["sizes"].values(), h, w, c, [round(m, 4) for m in mean], [round(s, 4) for s in std])
    return meta


# --------------------------------------------------------------------------- reading prepared files


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
        raise DataError(f"{path}: expected uint8 images (N, H, W, C) and int64 labels (N,), got {images.dtype} "
                        f"{images.shape} and {labels.dtype} {labels.shape}; run `dvc repro -f split`")
    return images, labels


def load_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """Read ``<prepared_dir>/meta.json`` (classes, mean, std, image_size, channels, counts, source...)."""
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"{path} not found; run the split stage first (`dvc repro split`)")
    return read_json(path)
