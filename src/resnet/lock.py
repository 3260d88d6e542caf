"""One process at a time: an exclusive ``flock`` on a file, refused at once or waited for.

The kernel drops the lock when its process exits, however it exits (a crash, SIGKILL),
so a stale lock file never blocks anyone; the file itself stays (removing it would let
two processes lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resnet.utils import PipelineError

__all__ = ["exclusive_lock", "waiting_lock"]


@contextmanager
def exclusive_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, or raise :class:`PipelineError` at once.

    The holder writes its pid into the file, so the refusal names who holds it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PipelineError(
                f"another {what} is running in this workspace: {path} is held by pid {holder}; "
                "wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def waiting_lock(path: str | Path, what: str, timeout: float = 120.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for the block, waiting up to ``timeout`` s for its holder.

    For short critical sections that several processes enter in turn (creating a store,
    choosing a champion), unlike :func:`exclusive_lock`, which refuses at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"waited {timeout:.0f} s for {path} ({what}); the process holding it may hang: "
                        "find it with `fuser` and stop it"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)
