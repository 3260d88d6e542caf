"""DVC stage `download`: fetch data.source into data/raw/ (verified archive or folder + source.json)."""

import sys

from resnet import paths
from resnet.config import Params
from resnet.data.sources import download
from resnet.stage import run_stage


def run(params: Params) -> None:
    # Built aside and swapped in whole: a failure leaves no data/raw behind.
    download(params.data, paths.RAW)


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
