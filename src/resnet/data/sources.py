"""Sources and download: URL or path, checksums, progress, the verified copy in data/raw.

:func:`download` copies ``data.source`` (an https/http URL, a ``file://`` URL, a
local archive or, for image folders, a directory) into ``data/raw/`` with
``source.json``. The archive is verified (size, md5 of the official CIFAR archives
or a user-given ``data.sha256``) and read through once, so that a truncated, corrupt
or malicious archive is refused here and never becomes an output. Everything is
built aside and swapped in whole (``atomic_dir``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import http.client
import logging
import os
import posixpath
import re
import stat
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from resnet.config import DataParams
from resnet.data.archives import iter_archive, iter_directory
from resnet.data.datasets import OFFICIAL_ARCHIVES, cifar_member_map, imagefolder_layout
from resnet.data.errors import DataError
from resnet.utils import (
    atomic_dir,
    is_storage_error,
    naming_write_errors,
    progress_enabled,
    workspace_root,
    write_json,
)

__all__ = ["OFFLINE_HINT", "download", "sha256_file"]

log = logging.getLogger(__name__)

OFFLINE_HINT = (
    "point data.source at a local copy of the archive (a path or file:// URL), e.g. "
    "`dvc exp run -S data.dataset=imagefolder -S data.source=../shared/datasets/cifar10-jpeg.tar.gz`, "
    "or edit data.dataset and data.source in params.yaml"
)
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


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
        raise DataError(
            f"data.source: unsupported URL scheme {parsed.scheme!r} in {source!r}; "
            f"use https://, http://, file:// or a local path"
        )
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
        raise DataError(
            f"cannot download {url}: the server answered {e.code} {e.reason}; check data.source, or {OFFLINE_HINT}"
        ) from None
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"cannot download {url}: {reason} (after {time.monotonic() - start:.1f} s). "
            f"This machine may be offline; {OFFLINE_HINT}"
        ) from None
    hashes = _Hashes()
    with response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        log.info("downloading %s (%s)", url, f"{total / 2**20:.1f} MiB" if total else "size unknown")
        try:
            with (
                open(dest, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    disable=not progress_enabled(),
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    with naming_write_errors(dest):
                        out.write(chunk)
                    hashes.update(chunk)
                    bar.update(len(chunk))
        except (OSError, TimeoutError, ValueError, http.client.HTTPException) as e:
            if is_storage_error(e) and getattr(e, "filename", None) == str(dest):
                raise  # the disk refused the copy, not a download problem: resnet.stage says so
            # A stalled socket (data.timeout), a dropped connection, IncompleteRead.
            raise DataError(
                f"download of {url} failed after {hashes.size} bytes ({type(e).__name__}: {e}); run the stage again"
            ) from None
    if total is not None and hashes.size != total:
        raise DataError(f"download of {url} is truncated: {hashes.size} of {total} bytes; run the stage again")
    return hashes


def _copy_file(src: Path, dest: Path) -> _Hashes:
    hashes = _Hashes()
    with open(src, "rb") as inp, open(dest, "wb") as out:
        while chunk := inp.read(_CHUNK):
            with naming_write_errors(dest):  # a failed write() names no file by itself
                out.write(chunk)
            hashes.update(chunk)
    return hashes


def _copy_tree(src: Path, dest: Path) -> tuple[str, int, int]:
    """Copy an image folder (files and folders, links resolved inside it); return (tree sha256, bytes, files).

    Empty folders are copied too, so that the check of the copy names an empty class
    folder instead of never seeing it. The tree digest is the sha256 of the sorted lines
    ``<sha256 of file>  <relative path>`` (the output of ``sha256sum`` over the sorted
    file list), so it is reproducible by hand; folders do not change it.
    """
    digests: dict[str, str] = {}
    size = 0
    dest.mkdir(parents=True, exist_ok=True)
    for entry in iter_directory(src, folders=True):
        out = dest / entry.name
        if entry.kind == "dir":
            out.mkdir(parents=True, exist_ok=True)
            continue
        data = entry.data or b""
        out.parent.mkdir(parents=True, exist_ok=True)
        with naming_write_errors(out):
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
            raise DataError(
                f"checksum mismatch for {source}: its sha256 is {got} but data.sha256 expects "
                f"{params.sha256.lower()}; the file is corrupt or another archive: fetch it again, "
                f"or correct data.sha256"
            )
        log.info("sha256 verified: %s", got)
    elif params.dataset in OFFICIAL_ARCHIVES:
        official = OFFICIAL_ARCHIVES[params.dataset]
        got = hashes.md5.hexdigest()
        if got != official.md5:
            raise DataError(
                f"checksum mismatch for {source}: md5 {got}, but the official {params.dataset} archive "
                f"({official.url}) has md5 {official.md5}; the file is corrupt or not the official "
                f"archive: fetch it again, or if you trust this archive set data.sha256 to "
                f"{hashes.sha256.hexdigest()}"
            )
        log.info("md5 verified against the official %s checksum: %s", params.dataset, got)
    else:
        log.info("no checksum to verify (data.sha256 is null); recorded sha256 %s", hashes.sha256.hexdigest())


def _check_content(path: Path, dataset: str) -> dict[str, Any]:
    """Read the archive through once: every member checked, the expected layout present."""
    entries = [(e.name, e.kind) for e in iter_archive(path, read_data=False, folders=True)]
    names = [n for n, kind in entries if kind != "dir"]  # files and links: what "members" counts
    if dataset in OFFICIAL_ARCHIVES:
        cifar_member_map(names, OFFICIAL_ARCHIVES[dataset], path)
        return {"members": len(names)}
    # Folder entries too: an empty class folder shows only as one.
    _, layout = imagefolder_layout([n for n, _ in entries], path)
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
        _check_local_source(Path(where), params)
    with atomic_dir(raw_dir) as tmp:
        if kind == "path" and Path(where).is_dir():
            name, digest, size, info = _copy_folder_source(Path(where), tmp, params)
        else:
            name, digest, size, info = _copy_archive_source(kind, where, tmp, params)
        record = {
            "source": params.source,
            "dataset": params.dataset,
            "path": name,
            "sha256": digest,
            "size": size,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            **info,
        }
        write_json(tmp / "source.json", record)
    log.info("%s: %s (%d bytes, sha256 %s)", raw_dir / name, record["kind"], size, digest)
    return record


def _check_local_source(where: Path, params: DataParams) -> None:
    if not where.exists():
        raise DataError(
            f"data.source: {params.source!r} not found (looked at {where.absolute()}); give the "
            f"path of the archive (relative to the repository root) or a URL"
        )
    mode = os.stat(where).st_mode  # through links: a link to /dev/zero is /dev/zero
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # Copied as a file, /dev/zero or /dev/urandom would fill the disk and a fifo would block.
        raise DataError(
            f"data.source: {params.source!r} ({where}) is a {_file_type(mode)}; a data source must be a "
            f"regular file (an archive) or a folder: point data.source at one"
        )
    if where.is_dir() and params.dataset != "imagefolder":
        raise DataError(
            f"data.source: {params.source!r} is a directory; data.dataset={params.dataset} needs the "
            f"official archive (.tar.gz); directories are read only with data.dataset=imagefolder"
        )


def _file_type(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISFIFO, "fifo (named pipe)"),
        (stat.S_ISSOCK, "socket"),
    ):
        if test(mode):
            return name
    return "special file"


def _copy_folder_source(where: Path, tmp: Path, params: DataParams) -> tuple[str, str, int, dict[str, Any]]:
    """Copy an image folder into tmp: (name in raw/, tree sha256, bytes, source.json fields)."""
    name = _archive_filename(str(where.resolve()), params.dataset)
    log.info("copying image folder %s", where)
    digest, size, count = _copy_tree(where, tmp / name)
    if params.sha256 and digest != params.sha256.lower():
        raise DataError(
            f"checksum mismatch for folder {params.source}: tree sha256 {digest}, data.sha256 "
            f"expects {params.sha256.lower()}; correct data.sha256 or set it to null"
        )
    names = [e.name for e in iter_directory(tmp / name, read_data=False, folders=True)]
    _, layout = imagefolder_layout(names, where)
    info = {
        "kind": "directory",
        "sha256_of": "sorted `sha256sum` lines of the folder's files",
        "members": count,
        "splits": {s: len(v) for s, v in layout.items()},
    }
    return name, digest, size, info


def _copy_archive_source(
    kind: str, where: str | Path, tmp: Path, params: DataParams
) -> tuple[str, str, int, dict[str, Any]]:
    """Fetch or copy an archive into tmp, verify it: (name in raw/, sha256, bytes, source.json fields)."""
    name = _archive_filename(params.source, params.dataset)
    dest = tmp / name
    if kind == "url":
        hashes = _fetch_url(str(where), dest, params.timeout)
    else:
        log.info("copying %s", where)
        hashes = _copy_file(Path(where), dest)
    _verify(hashes, params, params.source)
    try:
        info = {"kind": "archive", "md5": hashes.md5.hexdigest(), **_check_content(dest, params.dataset)}
    except DataError as e:  # name the user's source, not the temporary copy
        raise DataError(str(e).replace(str(dest), params.source)) from None
    return name, hashes.sha256.hexdigest(), hashes.size, info
