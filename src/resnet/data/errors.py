"""The one error type of the data stages, and the messages that several modules give."""

from __future__ import annotations

from pathlib import Path

from resnet.utils import PipelineError

__all__ = ["DataError", "FORMATS_HINT", "AGAIN_HINT", "corrupt"]

FORMATS_HINT = "data.source must be a .tar, .tar.gz, .tgz, .tar.bz2, .tar.xz or .zip archive"
AGAIN_HINT = "download it again (`dvc repro -f download`) or check data.source"


class DataError(PipelineError, RuntimeError):
    """The data source is unreachable, corrupt, unsafe or not laid out as expected."""


def corrupt(path: Path, err: BaseException) -> DataError:
    """The error for an archive that a reader or decompressor could not get through."""
    return DataError(f"{path} is truncated or corrupt ({type(err).__name__}: {err}); {AGAIN_HINT}")
