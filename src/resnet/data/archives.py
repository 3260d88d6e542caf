"""Reading archives and image folders safely: tar (plain, gz, bz2, xz), zip, directories.

Members are never extracted to disk, but every member is still checked as a safe
extractor would: absolute paths, ``..`` components, links that point outside the
archive and device files or fifos are refused with :class:`DataError`, and so are
truncated or corrupt archives. Tar archives are read by the hand-written reader of
:mod:`resnet.data.tar_reader` (29% of the split stage's time saved, see there), and by
tarfile's streaming mode for what that reader does not know; one set of rules
(:func:`_checked_entry`) serves both.
"""

from __future__ import annotations

import logging
import lzma
import os
import posixpath
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from resnet.data import tar_reader
from resnet.data.errors import AGAIN_HINT, FORMATS_HINT, DataError, corrupt

__all__ = ["Entry", "check_member_name", "iter_archive", "iter_directory", "resolve_links"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Entry:
    """One archive or directory member: a regular file (with its bytes), a link to another member, or a folder."""

    name: str
    kind: str  # "file", "link" or "dir" (a folder's name ends in "/"; only with folders=True)
    data: bytes | None = None
    target: str | None = None


# --------------------------------------------------------------------------- names and links


def _is_absolute(name: str) -> bool:
    """``/x``, ``\\x`` and Windows drive paths (``C:x``)."""
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":" and name[0].isalpha())


def check_member_name(name: str, archive: str | Path = "archive", *, folder: bool = False) -> str:
    """Return the normalised (posix, no ``./``) form of an archive member name, or refuse it.

    Refused, as a safe extractor would: empty names, NUL bytes, absolute paths
    (``/x``, ``\\x``, ``C:x``) and any ``..`` component (backslashes count as
    separators, so Windows-style traversal is caught too). A folder may be the root
    itself (``./``, as ``tar -C dir .`` writes); its normalised name is then ``""``.
    """
    if not name or "\x00" in name:
        raise DataError(f"{archive}: refused member {name!r}: empty name or NUL byte")
    if _is_absolute(name):
        raise DataError(f"{archive}: refused member {name!r}: absolute path (path traversal)")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive}: refused member {name!r}: '..' component (path traversal)")
    if not parts and not folder:
        raise DataError(f"{archive}: refused member {name!r}: a file cannot be the archive root")
    return "/".join(parts)


def link_target(name: str, target: str, archive: str | Path, *, relative_to_member: bool) -> str:
    """Normalised in-archive path a link points at; refuse links that leave the archive."""
    if not target or _is_absolute(target):
        raise DataError(f"{archive}: refused link {name!r} -> {target!r}: absolute target points outside the archive")
    base = posixpath.dirname(name) if relative_to_member else ""
    joined = posixpath.normpath(posixpath.join(base, target.replace("\\", "/")))
    if joined == ".." or joined.startswith("../") or joined in (".", ""):
        raise DataError(f"{archive}: refused link {name!r} -> {target!r}: it points outside the archive")
    return joined


def _special_file(archive: Path, name: str, what: str) -> DataError:
    return DataError(
        f"{archive}: refused member {name!r}: device file, fifo or other special file ({what}); "
        f"an image archive holds only folders and files"
    )


def resolve_links(files: dict[str, T], links: dict[str, str], where: Path) -> None:
    """Point in-archive links at their targets' entries: bytes, or where they are (chains allowed, no cycles)."""
    for name in list(links):
        target, seen = links[name], {name}
        while target in links and target not in seen:
            seen.add(target)
            target = links[target]
        if target not in files:
            raise DataError(f"{where}: link {name!r} points to {links[name]!r}, which is not a file in the archive")
        files[name] = files[target]


# --------------------------------------------------------------------------- archives


def iter_archive(path: str | Path, *, read_data: bool = True, folders: bool = False) -> Iterator[Entry]:
    """Yield the files and links of a tar (plain, gz, bz2, xz) or zip archive, checking every member.

    Folder entries are skipped unless ``folders`` (then ``Entry("train/cat/", "dir")``:
    an empty folder shows only so); device files, fifos, unsafe names and links pointing
    outside the archive raise :class:`DataError`, as do truncated or corrupt archives.
    """
    path = Path(path)
    fmt = _archive_format(path)
    if fmt == "zip":
        yield from _iter_zip(path, read_data, folders=folders)
        return
    yielded = 0
    try:
        for entry in _iter_tar(path, fmt, read_data, folders=folders):
            yielded += 1
            yield entry
    except tar_reader.Unsupported as e:
        log.info("%s: %s; reading it with tarfile instead", path, e)
        for i, entry in enumerate(_iter_tarfile(path, read_data, folders=folders)):
            if i >= yielded:  # the hand-written reader already handed out the members before the odd one
                yield entry


def _archive_format(path: Path) -> str:
    """'zip', 'gz', 'bz2', 'xz' or 'tar', from the file's first bytes (URLs need not end in .tar.gz)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    for fmt, magic in (("gz", b"\x1f\x8b"), ("bz2", b"BZh"), ("xz", b"\xfd7zXZ\x00")):
        if head.startswith(magic):
            return fmt
    return "tar"


def _checked_entry(
    path: Path, name: str, kind: str, linkname: str, data: bytes | None, type_flag: bytes | str
) -> Entry | None:
    """The Entry of one tar member after the safety rules (None for the archive's root folder).

    Both tar readers use it. ``kind``: "file", "dir", "symlink", "hardlink" or "special"
    (device, fifo...); a folder's Entry has kind "dir" and a name ending in "/".
    """
    checked = check_member_name(name, path, folder=kind == "dir")
    if kind == "dir":
        return Entry(checked + "/", "dir") if checked else None
    if kind in ("symlink", "hardlink"):
        # Symlink targets are relative to the link's folder, hardlink targets to the root.
        target = link_target(checked, linkname, path, relative_to_member=kind == "symlink")
        return Entry(checked, "link", target=target)
    if kind != "file":
        raise _special_file(path, name, f"tar type {type_flag!r}")
    return Entry(checked, "file", data=data)


def _iter_tar(path: Path, fmt: str, read_data: bool, *, folders: bool = False) -> Iterator[Entry]:
    """The tar half of :func:`iter_archive`, by the hand-written reader."""
    for m in tar_reader.iter_members(path, fmt, read_data):
        entry = _checked_entry(path, m.name, m.kind, m.linkname, m.data, m.type)
        if entry is not None and (folders or entry.kind != "dir"):
            yield entry


class _HeaderProblem(Exception):
    """A tar header that is missing, cut short or corrupt where tarfile would quietly stop."""

    def __init__(self, offset: int, err: tarfile.HeaderError) -> None:
        super().__init__(str(err))
        self.offset, self.err = offset, err


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, but only a zero block (the end-of-archive marker) ends the archive.

    After the first member, TarFile.next() takes a missing, cut-off or corrupt header
    for the end of the archive without a word, so a truncated or damaged plain tar
    would pass for a shorter valid one.
    """

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:
        offset = tf.offset
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            raise  # a zero block: the regular end of the archive
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as e:
            raise _HeaderProblem(offset, e) from None


def _header_error(path: Path, problem: _HeaderProblem) -> DataError:
    first = problem.offset == 0
    if isinstance(problem.err, tarfile.EmptyHeaderError):
        if first:
            return DataError(f"{path} is empty; {FORMATS_HINT}")
        return DataError(f"{path} is truncated: no end-of-archive marker; {AGAIN_HINT}")
    if isinstance(problem.err, tarfile.TruncatedHeaderError):
        return DataError(f"{path} is truncated: it ends inside a tar header; {AGAIN_HINT}")
    if first:
        return DataError(f"{path} is not a tar or zip archive ({problem}); {FORMATS_HINT}")
    return DataError(f"{path} is corrupt: bad tar header at byte {problem.offset} ({problem}); {AGAIN_HINT}")


def _tarfile_kind(m: tarfile.TarInfo) -> str:
    if m.isdir():
        return "dir"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    return "file" if m.isfile() else "special"


def _read_member(tf: tarfile.TarFile, m: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(m)
    data = f.read() if f is not None else b""
    if len(data) != m.size:
        raise tarfile.ReadError(f"member {m.name!r} is cut short")
    return data


def _iter_tarfile(path: Path, read_data: bool, *, folders: bool = False) -> Iterator[Entry]:
    """The same as :func:`_iter_tar`, through tarfile's streaming mode, for what the hand-written reader leaves."""
    try:
        with tarfile.open(path, mode="r|*", tarinfo=_StrictTarInfo) as tf:
            for m in tf:
                kind = _tarfile_kind(m)
                data = _read_member(tf, m) if kind == "file" and read_data else None
                entry = _checked_entry(path, m.name, kind, m.linkname, data, m.type)
                if entry is not None and (folders or entry.kind != "dir"):
                    yield entry
    except _HeaderProblem as e:
        raise _header_error(path, e) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise corrupt(path, e) from None


def _iter_zip(path: Path, read_data: bool, *, folders: bool = False) -> Iterator[Entry]:
    """The zip half of :func:`iter_archive`."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = check_member_name(info.filename, path, folder=info.is_dir())
                if info.is_dir():
                    if folders and name:
                        yield Entry(name + "/", "dir")
                    continue
                # Unix file-type bits, when the zip was made on unix (0 = not recorded: a plain file).
                ftype = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
                if ftype == stat.S_IFLNK:
                    target = zf.read(info).decode("utf-8", "replace")
                    yield Entry(name, "link", target=link_target(name, target, path, relative_to_member=True))
                elif ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise _special_file(path, info.filename, f"mode {oct(info.external_attr >> 16)}")
                else:
                    # Zip has per-member CRCs: reading (always) is what catches corrupt data.
                    data = zf.read(info)
                    yield Entry(name, "file", data=data if read_data else None)
    except DataError:
        raise
    except (
        zipfile.BadZipFile,
        zipfile.LargeZipFile,
        OSError,
        EOFError,
        zlib.error,
        ValueError,
        NotImplementedError,
    ) as e:
        raise corrupt(path, e) from None


# --------------------------------------------------------------------------- folders


def iter_directory(root: str | Path, *, read_data: bool = True, folders: bool = False) -> Iterator[Entry]:
    """Yield the files under ``root`` (sorted walk) like :func:`iter_archive` does for an archive.

    With ``folders``, each folder below ``root`` first (``Entry("train/cat/", "dir")``).
    Symlinks are followed only when they resolve inside ``root``. Special files (devices,
    fifos, sockets) are refused, not skipped: reading a fifo blocks and a device never
    ends, and one in an image folder is a mistake or an attack that a warning would bury.
    """
    root = Path(root)
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=_walk_error):
        dirnames.sort()
        here = Path(dirpath)
        if folders and here != root:
            yield Entry(here.relative_to(root).as_posix() + "/", "dir")
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
                raise DataError(
                    f"{root}: refused {rel!r}: device file, fifo or socket; "
                    f"an image folder holds only folders and files"
                )
            yield Entry(rel, "file", data=p.read_bytes() if read_data else None)


def _walk_error(e: OSError) -> None:
    """os.walk skips unreadable folders silently; a folder source must not lose a class that way."""
    raise e


def _check_inside(p: Path, real_root: Path) -> Path:
    real = p.resolve()
    if real != real_root and real_root not in real.parents:
        raise DataError(f"refused {p}: symlink to {os.readlink(p)!r} points outside {real_root}")
    return real
