"""DVC stage `split`: data/raw/ -> data/prepared/{train,val,test}.npz + meta.json."""

from __future__ import annotations

import logging
import sys

from resnet.config import ConfigError, load_params
from resnet.data import DataError, prepare
from resnet.utils import setup_logging

log = logging.getLogger("stages.split")


def main() -> int:
    setup_logging()
    try:
        params = load_params("params.yaml")
    except ConfigError as e:
        log.error("params.yaml: %s", e)
        return 1
    try:
        # Written aside and swapped in whole (atomic_dir inside prepare).
        prepare("data/raw", "data/prepared", params.data)
    except DataError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
