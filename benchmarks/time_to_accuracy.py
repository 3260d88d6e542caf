"""Time to accuracy: test accuracy against training wall time, for several recipes side by side in one run.

Each recipe (params.yaml with the overrides of a file in ``--recipes``) is trained by
resnet.training.fit exactly as the train stage trains it (per-epoch validation
included). After every epoch the benchmark evaluates that epoch's checkpoint on the
test split with the recipe's own test-time augmentation, by the one evaluation the
evaluate stage runs; that evaluation is *not* counted in the wall time (a pipeline
does it once, at the end). The recipes run one after another in this process, on
the same data, so their times compare; the wall time of the whole main job (every
stage, ``make repro``) is what benchmarks/bench_pipeline.py measures.

    python benchmarks/time_to_accuracy.py --recipes benchmarks/sweeps/time-to-accuracy.yaml \\
        [--prepared data/prepared] [--target 0.85] [--only NAME ...]

Prints the machine (CPU model and flags), each recipe's curve, the time each first
reached --target and how many times faster than the first recipe that was; writes
benchmarks/results/time-to-accuracy-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_loader import RESULTS, machine_info
from recipe_sweep import apply_overrides, load_inputs

from resnet.checkpoint import load_checkpoint, model_from_checkpoint
from resnet.config import parse_params
from resnet.evaluation import evaluate
from resnet.loader import DeviceLoader
from resnet.runtime import configure_torch, cpu_summary, keep_freed_memory
from resnet.utils import setup_logging


def run_recipe(name: str, raw: dict[str, Any], meta: dict, splits: dict, device_override: str | None) -> dict:
    """Train one recipe; its curve: after each epoch, seconds of training so far and test accuracy."""
    params = parse_params(raw)
    tp = params.train
    device = configure_torch(tp) if device_override is None else torch.device(device_override)
    norm = {"mean": meta["mean"], "std": meta["std"], "device": device, "channels_last": tp.channels_last}
    train = DeviceLoader(*splits["train"], tp.batch_size, train=True, augment=tp.augment, seed=tp.seed, **norm)
    val = DeviceLoader(*splits["val"], 500, **norm)
    test = DeviceLoader(*splits["test"], 500, **norm)
    curve: list[dict[str, float]] = []
    excluded = 0.0  # seconds spent in the test evaluations, taken out of the wall time

    with tempfile.TemporaryDirectory() as tmp:

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            nonlocal excluded
            t = time.perf_counter()
            ckpt = load_checkpoint(Path(tmp) / "last.pt", map_location=device)
            model = model_from_checkpoint(ckpt).to(device)
            if tp.channels_last:
                model = model.to(memory_format=torch.channels_last)
            result = evaluate(model, test, len(meta["classes"]), precision=resolved, tta=params.model.tta)
            curve.append(
                {
                    "epoch": epoch,
                    "seconds": round(t - t0 - excluded, 2),
                    "val_accuracy": metrics.get("val_accuracy"),
                    "test_accuracy": result.accuracy,
                }
            )
            print(f"  {name} epoch {epoch}: {curve[-1]['seconds']:.0f} s, test {result.accuracy:.4f}", flush=True)
            excluded += time.perf_counter() - t

        from resnet.runtime import resolve_precision
        from resnet.training import fit

        resolved = resolve_precision(tp.precision, device)
        t0 = time.perf_counter()
        result = fit(params, meta, train, val, tmp, on_epoch=on_epoch)
        wall = time.perf_counter() - t0 - excluded
    return {
        "name": name,
        "model": params.model.name,
        "epochs": result.epochs_completed,
        "precision": result.precision,
        "tta": params.model.tta,
        "train_wall_seconds": round(wall, 2),
        "images_per_sec": round(result.images_per_sec, 1),
        "final_test_accuracy": curve[-1]["test_accuracy"],
        "curve": curve,
    }


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """Seconds of training until the first epoch whose test accuracy reached ``target``; None if none did."""
    return next((p["seconds"] for p in curve if p["test_accuracy"] >= target), None)


def report(records: list[dict], machine: dict, command: str, target: float) -> str:
    """The markdown record: machine, command, each recipe's summary and curve."""
    first = time_to(records[0]["curve"], target)
    lines = [
        f"# Time to {target:.0%} test accuracy, {dt.date.today()}",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; CPU flags: {machine['cpu_flags']}; "
        f"torch {machine['torch']}; device {machine['device']}; "
        f"load average at start {machine['load_average_at_start']}.",
        f"Command: `{command}`. Data: the prepared splits (train/val/test) this run read.",
        "",
        f"| recipe | model | epochs | precision | TTA | train wall (s) | final test | time to {target:.0%} (s) "
        f"| speed-up vs {records[0]['name']} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        t = time_to(r["curve"], target)
        ratio = f"{first / t:.2f}x" if t and first else "n/a"
        reached = "not reached" if t is None else f"{t:.0f}"
        lines.append(
            f"| {r['name']} | {r['model']} | {r['epochs']} | {r['precision']} | {r['tta']} | "
            f"{r['train_wall_seconds']:.0f} | {r['final_test_accuracy']:.4f} | {reached} | {ratio} |"
        )
    for r in records:
        lines += [
            "",
            f"## {r['name']}",
            "",
            "| epoch | seconds | val accuracy | test accuracy |",
            "| --- | --- | --- | --- |",
        ]
        for p in r["curve"]:
            val = f"{p['val_accuracy']:.4f}" if p["val_accuracy"] is not None else ""
            lines.append(f"| {p['epoch']} | {p['seconds']:.0f} | {val} | {p['test_accuracy']:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", required=True, help="YAML file: {recipe name: {dotted.key: value}}; first = reference")
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml", help="the base recipe")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--device", default=None, help="override train.device (cpu, cuda)")
    ap.add_argument("--only", nargs="*", help="run only these recipes")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    setup_logging()

    base, recipes, meta, splits = load_inputs(args.params, args.recipes, args.prepared)
    machine = machine_info(torch.device(args.device or "cpu"))
    machine["cpu_flags"] = cpu_summary()["cpu.flags"]
    command = " ".join(["python", *sys.argv])
    print(f"machine: {machine}\ncommand: {command}", flush=True)
    keep_freed_memory()  # as stages/train.py does
    records = []
    for name, overrides in recipes.items():
        if args.only and name not in args.only:
            continue
        records.append(run_recipe(name, apply_overrides(base, overrides or {}), meta, splits, args.device))
    out = Path(args.out)
    stem = out / f"time-to-accuracy-{dt.date.today()}"
    stem.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "command": command, "records": records}, indent=1)
    )
    text = report(records, machine, command, args.target)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
