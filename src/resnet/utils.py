"""Small shared helpers: atomic file writes, logging, seeding, devices, repository root."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "PipelineError",
    "STORAGE_ERRNOS",
    "is_storage_error",
    "naming_write_errors",
    "atomic_path",
    "atomic_dir",
    "write_json",
    "read_json",
    "read_handover_json",
    "flatten",
    "setup_logging",
    "seed_everything",
    "resolve_device",
    "repo_root",
    "workspace_root",
    "progress_enabled",
    "interrupts_deferred",
    "interrupt",
]

log = logging.getLogger(__name__)


class PipelineError(Exception):
    """An expected failure: bad params, data, checkpoint... Its message names the problem and the fix.

    Stage scripts turn it into one log line and exit status 1 (resnet.stage.run_stage);
    anything else is a bug and keeps its traceback.
    """


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: errno values that mean the storage refused a write (full disk or quota, file-size limit,
#: read-only file system, permissions, a failing disk): the machine's state, not a bug in
#: the code, so stage scripts report them in one line (resnet.stage.run_stage).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def is_storage_error(e: BaseException) -> bool:
    """True for an OSError whose errno is one of :data:`STORAGE_ERRNOS`."""
    return isinstance(e, OSError) and e.errno in STORAGE_ERRNOS


def _rename_in_error(e: OSError, tmp: Path, path: Path) -> None:
    """Name ``path`` (the output the user knows) instead of ``tmp`` (a temporary name) in a storage error.

    ``f.write()`` errors carry no file name at all: they get ``path``.
    """
    if not is_storage_error(e):
        return
    if e.filename is None:
        e.filename = str(path)
        return
    name = str(e.filename)
    if name == str(tmp) or name.startswith(f"{tmp}/"):
        e.filename = str(path) + name[len(str(tmp)) :]


@contextlib.contextmanager
def naming_write_errors(path: str | Path) -> Iterator[None]:
    """Give a storage error raised inside the block the file name ``path`` when it has none."""
    try:
        yield
    except OSError as e:
        _rename_in_error(e, Path(path), Path(path))
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or exception inside the block leaves no file at ``path`` that a later
    stage could mistake for valid output (the temp file is removed) and leaves an
    earlier ``path`` as it was. A storage error (full disk...) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the output the permissions a plain open() would.
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        _rename_in_error(e, tmp_path, path)
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_path` for a directory: build it aside, then swap it in whole.

    A storage error names the file under ``path`` it was writing (``path`` itself when unknown).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        _swap_in(tmp, path)
    except OSError as e:
        _rename_in_error(e, tmp, path)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace the folder ``path`` by ``tmp``; if that fails, the old ``path`` is put back."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / path.name)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(old / path.name, path)
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically, pretty-printed with a trailing newline."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def read_handover_json(path: str | Path, stage: str) -> dict[str, Any]:
    """A JSON object one stage hands another; missing, garbage or not an object is one PipelineError.

    The message names the file and the stage that writes it (``dvc repro -f <stage>``).
    """
    path = Path(path)
    fix = f"the {stage} stage writes it; rerun it (dvc repro -f {stage})"
    if not path.is_file():
        raise PipelineError(f"{path} not found: {fix}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"{path} is not readable JSON ({type(e).__name__}: {str(e)[:120]}): {fix}") from e
    if not isinstance(data, dict):
        raise PipelineError(f"{path} holds a {type(data).__name__}, not a JSON object: {fix}")
    return data


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: ``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``.

    Lists stay values (``train.milestones: [5, 8]``), as ``dvc params diff`` shows them.
    An empty mapping is kept as a value too, so a section that was emptied still differs.
    """
    if not isinstance(obj, Mapping):
        return {prefix: obj} if prefix else {}
    if not obj and prefix:
        return {prefix: {}}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


#: Other libraries' loggers that entry points turn down to warnings.
QUIET_LOGGERS = ("alembic", "mlflow.store.db.utils", "mlflow.tracking._tracking_service.client")


def setup_logging(level: int = logging.INFO) -> None:
    """Process-wide logging for an entry point: timestamped lines on stderr, other libraries quieter."""
    # Not force=True: where handlers exist already (pytest's log capture) they stay.
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    # MLflow's own chatter (alembic migrations, "View run ..." lines) drowns the stage logs.
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def progress_enabled() -> bool:
    """tqdm bars only on a terminal: logs and CI get the per-epoch summary lines instead."""
    return sys.stderr.isatty() and os.environ.get("RESNET_NO_PROGRESS", "") == ""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available; asking for 'cuda' without one is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PipelineError("train.device is 'cuda' but no CUDA GPU is available; set it to 'auto' or 'cpu'")
    return torch.device(name)


def repo_root() -> Path:
    """The repository root: DVC_ROOT when DVC runs the stage, else the nearest parent with .dvc or .git.

    ``dvc exp run --temp`` and queued runs execute in a temporary copy; DVC sets
    DVC_ROOT to that copy, so anything resolved from here (the MLflow store) must be
    handled with care by the caller.
    """
    env = os.environ.get("DVC_ROOT")
    if env:
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for p in (here, *here.parents):
        if (p / ".dvc").is_dir() or (p / ".git").exists():
            return p
    return here


def workspace_root() -> Path:
    """The user's repository, also from inside DVC's temporary copies.

    ``dvc exp run --temp`` and queued experiments run in ``<repo>/.dvc/tmp/exps/<tmp>``,
    a copy that is deleted afterwards: the MLflow store, and relative paths a user
    wrote in params.yaml (``../shared/...``), belong to the repository above it.
    """
    root = repo_root()
    parts = root.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return root


# --------------------------------------------------------------------------- interrupts

_held_interrupts: list[int] = []
_deferring = 0


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM (the stage's :func:`interrupt`) until the block ends.

    For short writes that must not stop halfway: an interrupt inside an MLflow call lands
    in SQLAlchemy or sqlite3, which log it as a database error with a traceback and may
    leave the write undone; held, it is raised as the block ends, after the write.
    """
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _held_interrupts:
        signum = _held_interrupts.pop()
        _held_interrupts.clear()
        raise KeyboardInterrupt(f"signal {signum}")


def interrupt(signum: int, frame: object = None) -> None:
    """A signal handler: KeyboardInterrupt now, or as the innermost deferring block ends."""
    if _deferring:
        _held_interrupts.append(signum)
        return
    raise KeyboardInterrupt(f"signal {signum}")
