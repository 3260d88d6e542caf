"""An image folder's encoded files, kept on disk and read one at a time when decoded.

The split stage decodes a chunk of images at a time (:mod:`resnet.data.split`), so the
encoded files need not be in memory either: a dataset whose JPEGs alone outgrow RAM
must still split. A folder source is read in place. An archive is copied once, member by
member, into an unnamed temporary file beside it: a ``.tar.gz`` has no random access,
and the split's order is not the archive's. Memory then holds names and offsets only.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

from resnet.data.archives import iter_archive, iter_directory, resolve_links
from resnet.data.errors import DataError

__all__ = ["EncodedFiles"]

log = logging.getLogger(__name__)


class EncodedFiles(Mapping[str, bytes]):
    """The files of an archive or folder by member name (links resolved); bytes read when looked up.

    ``folders`` lists the folder entries ("train/cat/"), which alone show an empty class folder.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.folders: list[str] = []
        # (offset, size) in the spill file; None for a folder source's files, read in place.
        self._spans: dict[str, tuple[int, int] | None] = {}
        self._spill: IO[bytes] | None = None
        if self.path.is_dir():
            for e in iter_directory(self.path, read_data=False, folders=True):
                if e.kind == "dir":
                    self.folders.append(e.name)
                else:  # iter_directory hands out in-root symlinks as the files they point to
                    self._spans[e.name] = None
        else:
            self._copy_archive()

    def _copy_archive(self) -> None:
        spill, where = _unnamed_file(self.path.parent)
        links: dict[str, str] = {}
        offset = 0
        try:
            for e in iter_archive(self.path, folders=True):
                if e.kind == "link":
                    links[e.name] = e.target or ""
                elif e.kind == "dir":
                    self.folders.append(e.name)
                else:
                    data = e.data or b""
                    spill.write(data)
                    self._spans[e.name] = (offset, len(data))
                    offset += len(data)
            spill.flush()
        except BaseException as e:
            spill.close()
            if isinstance(e, OSError) and not e.filename:  # iter_archive's own read errors are DataErrors
                e.filename = str(where / f"<temporary copy of {self.path.name}'s files>")
            raise
        resolve_links(self._spans, links, self.path)
        self._spill = spill
        log.debug("%s: %d files (%.0f MB) copied aside for decoding", self.path, len(self._spans), offset / 2**20)

    def __getitem__(self, name: str) -> bytes:
        span = self._spans[name]
        if span is None:
            return (self.path / name).read_bytes()
        assert self._spill is not None
        offset, size = span
        data = os.pread(self._spill.fileno(), size, offset)
        if len(data) != size:
            raise DataError(f"{self.path}: {name}: its temporary copy was cut short ({len(data)} of {size} bytes)")
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def close(self) -> None:
        """Let the temporary copy go (it is also gone when this object or the process is)."""
        if self._spill is not None:
            self._spill.close()


def _unnamed_file(beside: Path) -> tuple[IO[bytes], Path]:
    """A temporary file with no name on disk (nothing left behind, whatever happens), and its folder.

    Beside the archive if allowed: on the data's disk, not in /tmp, which may be a RAM disk.
    """
    try:
        return tempfile.TemporaryFile(dir=beside), beside
    except OSError as e:
        log.warning("%s: cannot write a temporary file there (%s); using %s", beside, e, tempfile.gettempdir())
        return tempfile.TemporaryFile(), Path(tempfile.gettempdir())
