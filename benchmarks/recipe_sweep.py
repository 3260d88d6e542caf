"""Recipe sweep: train several variants of params.yaml and record test accuracy against epochs.

Used to choose recipes by accuracy per unit of training: accuracy after a given number
of epochs does not depend on the hardware, so a sweep on a fast machine (a GPU)
tells which recipes are worth a long run on a slow one (the 2-core CPU). Each variant
is trained with resnet.training.fit exactly as the train stage does, then evaluated
on the test split, plainly and with horizontal-flip test-time augmentation.

    python benchmarks/recipe_sweep.py --sweep benchmarks/sweeps/cpu-short.yaml [--prepared data/prepared]
        [--params params.yaml] [--device auto] [--only NAME ...] [--out results.jsonl]

The sweep file maps variant names to overrides of params.yaml in `dvc exp run -S`
form, e.g. ``r20-e6: {train.epochs: 6, train.lr: 0.4}``. One JSON line per variant
is appended to --out as soon as it finishes, so an interrupted sweep keeps what it did.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_loader import machine_info

from resnet.checkpoint import load_checkpoint
from resnet.config import parse_params
from resnet.data.store import load_meta, load_split
from resnet.loader import DeviceLoader
from resnet.models import count_parameters
from resnet.runtime import autocast, configure_torch, keep_freed_memory
from resnet.training import fit
from resnet.utils import setup_logging


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of the params mapping with dotted keys (train.lr, train.augment.cutout) replaced."""
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def load_inputs(params: str, variants: str, prepared: str) -> tuple[dict, dict, dict, dict]:
    """The base params mapping, the variants file ({name: overrides}), meta.json and the three splits."""
    base = yaml.safe_load(Path(params).read_text())
    named = yaml.safe_load(Path(variants).read_text())
    splits = {s: load_split(prepared, s) for s in ("train", "val", "test")}
    return base, named, load_meta(prepared), splits


@torch.inference_mode()
def test_accuracy(model: torch.nn.Module, loader: DeviceLoader, precision: str) -> tuple[float, float]:
    """Top-1 test accuracy, plain and with the mean of the image's and its mirror's logits."""
    model.eval()
    plain = tta = 0
    with autocast(loader.device, precision):
        for x, y in loader:
            logits = model(x).float()
            plain += int((logits.argmax(1) == y).sum())
            both = logits + model(x.flip(3)).float()
            tta += int((both.argmax(1) == y).sum())
    return plain / loader.num_samples, tta / loader.num_samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", required=True, help="YAML file: {variant name: {dotted.key: value}}")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml", help="the base recipe")
    ap.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda)")
    ap.add_argument("--only", nargs="*", help="run only these variants")
    ap.add_argument("--out", default="sweep-results.jsonl")
    args = ap.parse_args()
    setup_logging()

    base, variants, meta, splits = load_inputs(args.params, args.sweep, args.prepared)
    out = Path(args.out)
    machine = None
    for name, overrides in variants.items():
        if args.only and name not in args.only:
            continue
        overrides = dict(overrides or {})
        if args.device:
            overrides["train.device"] = args.device
        params = parse_params(apply_overrides(base, overrides))
        tp = params.train
        device = configure_torch(tp)
        if device.type == "cpu" and machine is None:
            keep_freed_memory()  # as stages/train.py does, once per process
        machine = machine or machine_info(device)
        norm = {"mean": meta["mean"], "std": meta["std"], "device": device, "channels_last": tp.channels_last}
        train = DeviceLoader(*splits["train"], tp.batch_size, train=True, augment=tp.augment, seed=tp.seed, **norm)
        val = DeviceLoader(*splits["val"], 500, **norm)
        test = DeviceLoader(*splits["test"], 500, **norm)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = fit(params, meta, train, val, tmp)
            wall = time.perf_counter() - t0
            best = load_checkpoint(Path(tmp) / "best.pt", map_location=device)
        model = result.model
        last_plain, last_tta = test_accuracy(model, test, result.precision)
        model.load_state_dict(best["model"])
        best_plain, best_tta = test_accuracy(model, test, result.precision)
        record = {
            "name": name,
            "overrides": overrides,
            "model": params.model.name,
            "parameters": count_parameters(model),
            "epochs": result.epochs_completed,
            "images_trained": result.epochs_completed * len(train) * tp.batch_size,
            "train_seconds": round(result.train_seconds, 2),
            "wall_seconds": round(wall, 2),
            "images_per_sec": round(result.images_per_sec, 1),
            "precision": result.precision,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_metric,
            "test_accuracy_best": best_plain,
            "test_accuracy_best_flip_tta": best_tta,
            "test_accuracy_last": last_plain,
            "test_accuracy_last_flip_tta": last_tta,
            "device": machine["device"],
            "torch": machine["torch"],
        }
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(
            f"{name}: {result.epochs_completed} epochs, {result.train_seconds:.1f} s training, "
            f"test {best_plain:.4f} (flip TTA {best_tta:.4f}), last epoch {last_plain:.4f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
