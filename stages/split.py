"""DVC stage `split`: data/raw/ -> data/prepared/{train,val,test}.npz + meta.json."""

import sys

from resnet import paths
from resnet.config import Params
from resnet.data.split import prepare
from resnet.stage import run_stage


def run(params: Params) -> None:
    # Written aside and swapped in whole (atomic_dir inside prepare).
    prepare(paths.RAW, paths.PREPARED, params.data)


def main() -> int:
    return run_stage(run)


if __name__ == "__main__":
    sys.exit(main())
