"""DVC stage `download`: fetch data.source into data/raw/ (verified archive or folder + source.json)."""

from __future__ import annotations

import logging
import sys

from resnet.config import ConfigError, load_params
from resnet.data import DataError, download
from resnet.utils import setup_logging

log = logging.getLogger("stages.download")


def main() -> int:
    setup_logging()
    try:
        params = load_params("params.yaml")
    except ConfigError as e:
        log.error("params.yaml: %s", e)
        return 1
    try:
        # Built aside and swapped in whole: a failure leaves no data/raw behind.
        download(params.data, "data/raw")
    except DataError as e:
        log.error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
