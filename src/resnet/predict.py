"""Classify image files with a registered model.

    python -m resnet.predict --model models:/cifar10-resnet@champion cat.png ship.jpg

Prints the top classes of each image with their probabilities. The tracking store is
the one the pipeline uses (MLFLOW_TRACKING_URI, else params.yaml's tracking.uri, else
mlflow.db at the repository root).

Files are only decoded here (to RGB at their own size); the model brings them to its
input size and channels the split stage's way (resnet.preprocess), so an image gets
the same prediction from this command as from ``mlflow.pyfunc.load_model(...).predict``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from resnet import preprocess, tracking
from resnet.config import load_params
from resnet.utils import PipelineError, setup_logging

log = logging.getLogger("resnet.predict")


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to uint8 RGB (H, W, 3) at its own size (grayscale files are replicated)."""
    try:
        return preprocess.decode(path.read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e.strerror or e}") from e
    except preprocess.ImageError as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def predict_files(model: Any, paths: list[Path]) -> pd.DataFrame:
    """The model's output table for image files, one row per file in order.

    Images of one size go to the model together; the model resizes them to its own.
    """
    images = [read_image(p) for p in paths]
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    tables = []
    for rows in by_shape.values():
        table = model.predict(np.stack([images[i] for i in rows]))
        tables.append(table.set_axis(rows, axis=0))
    return pd.concat(tables).sort_index()


def format_predictions(paths: list[Path], table: pd.DataFrame, top_k: int) -> list[str]:
    """One line per image: 'path: ship 0.912, airplane 0.051, ...'."""
    prob_cols = [c for c in table.columns if c.startswith("prob_")]
    lines = []
    for path, (_, row) in zip(paths, table.iterrows(), strict=True):
        probs = sorted(((row[c], c.removeprefix("prob_")) for c in prob_cols), reverse=True)[:top_k]
        lines.append(f"{path}: " + ", ".join(f"{name} {p:.3f}" for p, name in probs))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resnet.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/cifar10-resnet@champion")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image (default 3)")
    parser.add_argument("--params", default="params.yaml", help="params.yaml for tracking.uri (optional)")
    parser.add_argument("images", nargs="+", type=Path, help="image files (any size; resized to the model's)")
    args = parser.parse_args(argv)
    setup_logging(logging.WARNING)
    try:
        tparams = load_params(args.params).tracking if Path(args.params).is_file() else None
        model = tracking.load_pyfunc(args.model, tparams)
        table = predict_files(model, args.images)
    except (PipelineError, ValueError) as e:
        log.error("%s", e)
        return 1
    print("\n".join(format_predictions(args.images, table, args.top_k)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
