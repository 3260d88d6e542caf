"""What every DVC stage script does around its work: logging, params, exit status.

A stage script is a small ``run(params)`` plus ``main = lambda: run_stage(run)``.
Expected failures (:class:`~resnet.utils.PipelineError`: bad params, data,
checkpoints, a missing MLflow run) become one log line and exit status 1, so
``dvc repro`` stops with a message that says what to fix instead of a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from resnet.config import Params, load_params
from resnet.utils import PipelineError, setup_logging

__all__ = ["run_stage"]

log = logging.getLogger("resnet.stage")


def run_stage(run: Callable[[Params], None], params_path: str | Path = "params.yaml",
              on_interrupt: str = "") -> int:
    """Load and validate params.yaml, call ``run(params)``; return the process exit status."""
    setup_logging()
    try:
        run(load_params(params_path))
    except PipelineError as e:
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:
        log.warning("interrupted%s", f"; {on_interrupt}" if on_interrupt else "")
        return 130
    return 0
