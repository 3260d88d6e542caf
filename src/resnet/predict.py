"""Classify images with a registered model, streamed in batches, into a CSV.

    python -m resnet.predict --model models:/cifar10-resnet@champion photos/ 'more/*.jpg' shots.tar.gz \\
        --output predictions.csv

Inputs: image files, folders (searched recursively), globs (expanded here, so quote
them) and archives (.tar, .tar.gz, .tgz, .zip: their image members, read in place).
Images are read and decoded ``--batch-size`` at a time and their rows written as they
come, so memory does not grow with the input. A file that is not a readable image
(corrupt, truncated, a decompression bomb) is reported in one warning line and skipped.
The CSV (``--output``, else standard output): ``path, label, confidence`` and the
top ``--top-k`` classes with their probabilities.

The tracking store is the one the pipeline uses (MLFLOW_TRACKING_URI, else
params.yaml's tracking.uri, else mlflow.db at the repository root). Files are only
decoded here (to RGB at their own size); the model brings them to its input size and
channels the split stage's way (resnet.preprocess), so an image gets the same
prediction from this command as from ``mlflow.pyfunc.load_model(...).predict``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from resnet import preprocess, tracking
from resnet.config import load_params
from resnet.data.archives import iter_archive
from resnet.data.datasets import IMAGE_EXTENSIONS
from resnet.utils import PipelineError, atomic_path, progress_enabled, setup_logging

log = logging.getLogger("resnet.predict")

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")

#: One input: its name in the CSV, and how to get its bytes (called when its batch is read).
Item = tuple[str, Callable[[], bytes]]


class InputError(PipelineError):
    """A named input that does not exist, or a glob that matches nothing."""


def _is_image(name: str) -> bool:
    """What folders and archives are searched for, as in the split stage (a file named by the user is always read)."""
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Each input as paths: itself when it exists, else its glob's matches; nothing matched is an error."""
    out = []
    for name in inputs:
        if Path(name).exists():
            out.append(Path(name))
            continue
        matches = sorted(glob.glob(name, recursive=True)) if glob.has_magic(name) else []
        if not matches:
            what = "matches no file" if glob.has_magic(name) else "does not exist"
            raise InputError(f"input {name!r} {what}; give image files, folders, globs or archives")
        out.extend(Path(m) for m in matches)
    return out


def iter_items(paths: Iterable[Path]) -> Iterator[Item]:
    """Every image input in order: files as named, folders sorted and recursive, archives member by member."""
    for path in paths:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and _is_image(p.name):
                    yield str(p), p.read_bytes
        elif path.name.lower().endswith(ARCHIVE_SUFFIXES):
            # Members stream one at a time; their bytes are already read, the lambda only hands them over.
            for entry in iter_archive(path):
                if entry.kind == "file" and _is_image(entry.name):
                    yield f"{path}!{entry.name}", (lambda data=entry.data: data or b"")
        else:
            yield str(path), path.read_bytes


def read_image(name: str, read: Callable[[], bytes]) -> np.ndarray:
    """Decode to uint8 RGB (H, W, 3) at its own size; ValueError naming the input when it cannot be read."""
    try:
        return preprocess.decode(read())
    except OSError as e:
        raise ValueError(f"cannot read image {name}: {e.strerror or e}") from e
    except preprocess.ImageError as e:
        raise ValueError(f"cannot read image {name}: {e}") from e


def iter_batches(items: Iterable[Item], batch_size: int) -> Iterator[tuple[list[str], list[np.ndarray], int]]:
    """Decoded images in batches: (names, images, skipped in this batch); unreadable ones warned about."""
    names: list[str] = []
    images: list[np.ndarray] = []
    skipped = 0
    for name, read in items:
        try:
            images.append(read_image(name, read))
            names.append(name)
        except ValueError as e:
            log.warning("skipped: %s", e)
            skipped += 1
        if len(images) == batch_size:
            yield names, images, skipped
            names, images, skipped = [], [], 0
    if images or skipped:
        yield names, images, skipped


def predict_images(model: Any, images: list[np.ndarray]) -> pd.DataFrame:
    """The model's output table, one row per image in order; images of one size go to the model together."""
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        by_shape[image.shape].append(i)
    tables = [model.predict(np.stack([images[i] for i in rows])).set_axis(rows, axis=0) for rows in by_shape.values()]
    return pd.concat(tables).sort_index()


def predict_files(model: Any, paths: list[Path]) -> pd.DataFrame:
    """The model's output table for image files, one row per file in order (all in memory: for a few files)."""
    return predict_images(model, [read_image(str(p), p.read_bytes) for p in paths])


def csv_rows(names: list[str], table: pd.DataFrame, top_k: int) -> Iterator[list[Any]]:
    """``path, label, confidence, top1_label, top1_prob, ...`` per image."""
    prob_cols = [c for c in table.columns if c.startswith("prob_")]
    for name, (_, row) in zip(names, table.iterrows(), strict=True):
        top = sorted(((row[c], c.removeprefix("prob_")) for c in prob_cols), reverse=True)[:top_k]
        yield [name, row["label"], f"{row['confidence']:.6f}"] + [v for p, c in top for v in (c, f"{p:.6f}")]


def write_predictions(model: Any, items: Iterable[Item], out: IO[str], batch_size: int, top_k: int) -> tuple[int, int]:
    """Stream the items through the model into CSV ``out``; (classified, skipped)."""
    writer = csv.writer(out)
    header = ["path", "label", "confidence"]
    writer.writerow(header + [f"top{i}_{k}" for i in range(1, top_k + 1) for k in ("label", "prob")])
    done = skipped = 0
    with tqdm(desc="predict", unit="img", disable=not progress_enabled()) as bar:
        for names, images, bad in iter_batches(items, batch_size):
            skipped += bad
            if images:
                writer.writerows(csv_rows(names, predict_images(model, images), top_k))
                done += len(images)
            bar.update(len(images) + bad)
    return done, skipped


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m resnet.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model URI, e.g. models:/cifar10-resnet@champion")
    parser.add_argument("inputs", nargs="+", help="image files, folders, globs (quoted) or .tar/.tar.gz/.zip archives")
    parser.add_argument("--output", "-o", type=Path, help="CSV file to write (default: standard output)")
    parser.add_argument("--batch-size", type=int, default=64, help="images read and classified at a time (64)")
    parser.add_argument("--top-k", type=int, default=3, help="top classes per image in the CSV (default 3)")
    parser.add_argument("--params", default="params.yaml", help="params.yaml for tracking.uri (optional)")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.top_k < 1:
        parser.error("--batch-size and --top-k must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    setup_logging(logging.INFO)
    try:
        paths = expand_inputs(args.inputs)
        tparams = load_params(args.params).tracking if Path(args.params).is_file() else None
        model = tracking.load_pyfunc(args.model, tparams)
        with contextlib.ExitStack() as stack:
            if args.output is None:
                out = sys.stdout
            else:  # written aside and renamed: a failure leaves no half CSV
                out = stack.enter_context(stack.enter_context(atomic_path(args.output)).open("w", newline=""))
            done, skipped = write_predictions(model, iter_items(paths), out, args.batch_size, args.top_k)
            if done == 0:
                raise InputError(f"no image could be classified ({skipped} skipped, see above)")
    except PipelineError as e:
        log.error("%s", e)
        return 1
    where = args.output or "standard output"
    log.info("classified %d images, skipped %d%s -> %s", done, skipped, " (listed above)" if skipped else "", where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
