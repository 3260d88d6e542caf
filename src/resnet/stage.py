"""What every DVC stage script does around its work: logging, params, exit status.

A stage script is a small ``run(params)`` plus ``main = lambda: run_stage(run)``.
Expected failures (:class:`~resnet.utils.PipelineError`: bad params, data,
checkpoints, a missing MLflow run) become one log line and exit status 1, so
``dvc repro`` stops with a message that says what to fix instead of a traceback.
So do storage failures (a full disk, a file-size limit, a read-only or unwritable
folder: :func:`~resnet.utils.is_storage_error`); other OSErrors keep their traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from resnet.config import Params, load_params
from resnet.utils import PipelineError, interrupt, is_storage_error, setup_logging

__all__ = ["run_stage", "storage_error_message"]

log = logging.getLogger("resnet.stage")


def run_stage(run: Callable[[Params], None], params_path: str | Path = "params.yaml", on_interrupt: str = "") -> int:
    """Load and validate params.yaml, call ``run(params)``; return the process exit status.

    Ends with one line giving the stage's wall time and peak resident memory.
    """
    setup_logging()
    # MLflow's download bars (loading a model to check it, say) are noise in a stage's log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A tracking server that stops answering fails a stage in under a minute (4 tries, 1+2+4 s
    # apart, 30 s each at most) instead of MLflow's minutes of retries; the checkpoints stay.
    for name, value in (("MAX_RETRIES", "3"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "30")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{name}", value)
    # The system metrics monitor's start/stop notices (and "Skip logging GPU metrics" on a CPU) are noise.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    start = time.perf_counter()
    # SIGTERM (kill, a CI runner's timeout, a container stopping) ends the stage as Ctrl-C
    # does: the MLflow run is closed KILLED and atomic writes clean up, instead of dying
    # with the run left RUNNING. Both wait for a database write under way (interrupts_deferred).
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(load_params(params_path))
    except PipelineError as e:
        log.error("%s", e)
        return 1
    except OSError as e:
        # Only the machine's storage refusing a write is an expected failure. Any other
        # OSError (a file the code assumed present, a path that is a folder, a bad file
        # descriptor...) is a bug or an unchecked input: a PipelineError with its fix
        # belongs where it is raised, so it keeps its traceback here.
        if not is_storage_error(e):
            raise
        log.error("%s", storage_error_message(e))
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted%s", f"; {on_interrupt}" if on_interrupt else "")
        return 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("done in %.1f s, peak memory %.0f MiB", time.perf_counter() - start, peak_rss_mib())
    return 0


# What to do, by errno; the rest (EIO) points at the disk itself.
_STORAGE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free space within your disk quota (or raise it)",
    errno.EFBIG: "free disk space (or raise the file-size limit: ulimit -f)",
    errno.EROFS: "run from a writable checkout (the file system is read-only)",
    errno.EACCES: "give this user access to it and its folder",
    errno.EPERM: "give this user access to it and its folder",
}


def storage_error_message(e: OSError) -> str:
    """One line for a failed write: the file, the system's reason and errno, the fix.

    ``cannot write models/last.pt: File too large [errno 27]; free disk space (or raise
    the file-size limit: ulimit -f) and rerun (dvc repro)``
    """
    # Permissions and I/O errors also hit reads: no "write" in their line.
    verb = {errno.EACCES: "cannot access", errno.EPERM: "cannot access", errno.EIO: "cannot read or write"}
    where = e.filename if e.filename is not None else "a file"
    reason = e.strerror or errno.errorcode.get(e.errno or 0, "error")
    fix = _STORAGE_FIXES.get(e.errno or 0, "check the disk (dmesg, df -h)")
    return f"{verb.get(e.errno or 0, 'cannot write')} {where}: {reason} [errno {e.errno}]; {fix} and rerun (dvc repro)"


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
