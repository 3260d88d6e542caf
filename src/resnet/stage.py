"""What every DVC stage script does around its work: logging, params, exit status.

A stage script is a small ``run(params)`` plus ``main = lambda: run_stage(run)``.
Expected failures (:class:`~resnet.utils.PipelineError`: bad params, data,
checkpoints, a missing MLflow run) become one log line and exit status 1, so
``dvc repro`` stops with a message that says what to fix instead of a traceback.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

from resnet.config import Params, load_params
from resnet.utils import PipelineError, setup_logging

__all__ = ["run_stage"]

log = logging.getLogger("resnet.stage")


def run_stage(run: Callable[[Params], None], params_path: str | Path = "params.yaml", on_interrupt: str = "") -> int:
    """Load and validate params.yaml, call ``run(params)``; return the process exit status.

    Ends with one line giving the stage's wall time and peak resident memory.
    """
    setup_logging()
    start = time.perf_counter()
    try:
        run(load_params(params_path))
    except PipelineError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted%s", f"; {on_interrupt}" if on_interrupt else "")
        return 130
    log.info("done in %.1f s, peak memory %.0f MiB", time.perf_counter() - start, peak_rss_mib())
    return 0


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
