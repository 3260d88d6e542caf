"""The hand-written tar reader: one sequential pass over ustar, GNU and pax headers.

Kept, rather than :mod:`tarfile` alone, because it matters for the whole split stage:
on the 60,000-image CIFAR-10 JPEG archive, ``resnet.data.split.prepare`` took 5.52 s with
it against 7.80 s with tarfile's streaming mode (29% less; reading the archive alone
0.85 s against 3.16 s), medians of 3 interleaved rounds on 2 shared cores
(benchmarks/bench_split.py, benchmarks/results/split-2026-11-23.md).

It only parses: it yields members as their headers describe them, and
:mod:`resnet.data.archives` applies the safety rules to them as to tarfile's. What
it does not know (sparse files, global pax headers that rename members, other member
types) raises :class:`Unsupported`, and the archive is read by tarfile instead.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from resnet.data.errors import AGAIN_HINT, FORMATS_HINT, DataError, corrupt

__all__ = ["Unsupported", "Member", "iter_members"]

_ZERO_BLOCK = bytes(512)
# Member kinds by tar type flag; "7" (contiguous) is a regular file to every extractor.
_KINDS = {
    b"0": "file",
    b"\x00": "file",
    b"7": "file",
    b"5": "dir",
    b"1": "hardlink",
    b"2": "symlink",
    b"3": "special",
    b"4": "special",
    b"6": "special",
}
_EXTENDED = (b"x", b"g", b"L", b"K")  # pax and GNU records that describe the next member


class Unsupported(Exception):
    """A tar feature this reader leaves to tarfile."""


@dataclass
class Member:
    """One tar member as its headers describe it: names are not checked yet."""

    name: str
    kind: str  # "file", "dir", "symlink", "hardlink" or "special"
    type: bytes  # the tar type flag, for messages
    linkname: str
    data: bytes | None


def iter_members(path: Path, fmt: str, read_data: bool) -> Iterator[Member]:
    """Yield the members of a tar archive (fmt 'tar', 'gz', 'bz2' or 'xz'); folders too.

    Raises :class:`DataError` for an empty, truncated (no end-of-archive marker) or
    corrupt archive, :class:`Unsupported` for what only tarfile reads.
    """
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}.get(fmt, open)
    try:
        with opener(path, "rb") as f:
            yield from _members(f, path, read_data)
    except (DataError, Unsupported):
        raise
    except (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as e:
        raise corrupt(path, e) from None


def _members(f: IO[bytes], path: Path, read_data: bool) -> Iterator[Member]:
    pending = _Extended()
    first = True
    while (hdr := _next_header(f, path, first)) is not None:
        first = False
        flag, size = hdr[156:157], _number(hdr[124:136])
        if flag in _EXTENDED:
            pending.add(flag, _read_exact(f, size + (-size % 512), path)[:size])
            continue
        if flag not in _KINDS:
            raise Unsupported(f"tar member type {flag!r}")
        name, linkname, size = pending.apply(_name(hdr), _nts(hdr[157:257]), size)
        kind = _KINDS[flag]
        if kind == "file" and name.endswith("/"):
            kind = "dir"  # old tars mark folders by a trailing slash only
        data = None
        if kind == "file" and read_data:
            data = _read_exact(f, size + (-size % 512), path)[:size]
        else:
            _read_exact(f, size + (-size % 512), path)  # skipped; links and folders carry no data anyway
        yield Member(name, kind, flag, linkname, data)


def _next_header(f: IO[bytes], path: Path, first: bool) -> bytes | None:
    """The next 512-byte header, checked; None at the end-of-archive marker (a zero block)."""
    hdr = f.read(512)
    if not hdr and first:
        raise DataError(f"{path} is empty; {FORMATS_HINT}")
    if len(hdr) < 512:
        raise DataError(f"{path} is truncated: no end-of-archive marker; {AGAIN_HINT}")
    if hdr == _ZERO_BLOCK:
        return None
    if not _checksum_ok(hdr):
        if first:
            raise DataError(f"{path} is not a tar or zip archive (first bytes {hdr[:16]!r}); {FORMATS_HINT}")
        raise DataError(f"{path} is corrupt: bad tar header checksum; {AGAIN_HINT}")
    return hdr


def _checksum_ok(hdr: bytes) -> bool:
    try:
        stored = _number(hdr[148:156])
    except ValueError:
        return False
    unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])
    if stored == unsigned:
        return True
    # Some old tars summed signed chars; only computed when needed (it is slow in Python).
    return stored == unsigned - 2 * sum(b for b in hdr if b > 127) + 2 * sum(b for b in hdr[148:156] if b > 127)


def _read_exact(f: IO[bytes], n: int, path: Path) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(f"{path} is truncated: it ends inside a member; {AGAIN_HINT}")
    return data


def _nts(field: bytes) -> str:
    return field.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _name(hdr: bytes) -> str:
    name = _nts(hdr[0:100])
    if hdr[257:263] == b"ustar\x00":  # POSIX ustar: a name prefix field (GNU uses it for times)
        prefix = _nts(hdr[345:500])
        if prefix:
            return f"{prefix}/{name}"
    return name


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 when the top bit is set."""
    if field[0] & 0x80:
        if field[0] == 0xFF:
            raise Unsupported("negative base-256 number in a tar header")
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
        key, _, value = payload[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class _Extended:
    """pax records and GNU long names or links, waiting for the member they describe."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.pax: dict[str, str] = {}
        self.long_name: str | None = None
        self.long_link: str | None = None

    def add(self, flag: bytes, payload: bytes) -> None:
        if flag == b"g":
            # Global records (git archive writes a commit id 'comment'): harmless unless they
            # rename or resize members, which only tarfile handles.
            if set(_pax_records(payload)) & {"path", "linkpath", "size"}:
                raise Unsupported("global pax header that renames or resizes members")
        elif flag == b"x":
            self.pax.update(_pax_records(payload))
            if any(k.startswith("GNU.sparse") for k in self.pax):
                raise Unsupported("GNU sparse file in pax format")
        elif flag == b"L":
            self.long_name = _nts(payload)
        else:
            self.long_link = _nts(payload)

    def apply(self, name: str, linkname: str, size: int) -> tuple[str, str, int]:
        """(name, linkname, size) of the member that follows, with the pending records applied, then cleared."""
        name = self.pax.get("path", self.long_name or name)
        linkname = self.pax.get("linkpath", self.long_link or linkname)
        size = int(self.pax["size"]) if "size" in self.pax else size
        self.clear()
        return name, linkname, size
