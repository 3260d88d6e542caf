"""Classify image files with a registered model.

    python -m resnet.predict --model models:/cifar10-resnet@champion cat.png ship.jpg

Prints the top classes of each image with their probabilities. The tracking store is
the one the pipeline uses (MLFLOW_TRACKING_URI, else params.yaml's tracking.uri, else
mlflow.db at the repository root).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from resnet import tracking
from resnet.config import TrackingParams, load_params
from resnet.utils import PipelineError, setup_logging

log = logging.getLogger("resnet.predict")


def read_images(paths: list[Path], size: tuple[int, int], channels: int) -> np.ndarray:
    """Decode image files to uint8 (N, H, W, C) at the model's input size and channels."""
    arrays = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (size[1], size[0]):
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"cannot read image {p}: {e}") from e
        arrays.append(a[..., None] if channels == 1 else a)
    return np.stack(arrays)


def format_predictions(paths: list[Path], table, top_k: int) -> list[str]:
    """One line per image: 'path: ship 0.912, airplane 0.051, ...'."""
    prob_cols = [c for c in table.columns if c.startswith("prob_")]
    lines = []
    for path, (_, row) in zip(paths, table.iterrows()):
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
        tparams = load_params(args.params).tracking if Path(args.params).is_file() else TrackingParams()
        model, shape = tracking.load_pyfunc(args.model, tparams)
        images = read_images(args.images, (shape[1], shape[2]), shape[3])
        table = model.predict(images)
    except (PipelineError, ValueError) as e:
        log.error("%s", e)
        return 1
    print("\n".join(format_predictions(args.images, table, args.top_k)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
