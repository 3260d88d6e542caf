"""Training throughput: our loop against the tutorials' loop, side by side in one run.

The tutorials' way (the PyTorch CIFAR-10 tutorial and the "ResNet from scratch"
posts): a Dataset over the images making a PIL image per sample, PIL transforms
(RandomCrop with padding 4, RandomHorizontalFlip, ToTensor, Normalize), a DataLoader
with worker processes, fp32 NCHW, and a loop that reads ``loss.item()`` and the
correct count every batch. Ours: resnet.epoch.train_one_epoch over a
resnet.loader.DeviceLoader with the recipe of params.yaml (channels_last, no
per-step host reads), exactly as the train stage runs it.

Both train the same model from the same data for a fixed number of steps after a
warm-up; rounds alternate between the two, and the median is reported. They run in
one process, so process-wide settings (threads, and on CPU keep_freed_memory's malloc
setting, as the train stage makes it) apply to both: the ratio is what the loop itself gains.

    python benchmarks/bench_train.py [--models resnet20 resnet18] [--steps 30] [--rounds 2]

Prints the machine, the command, images/s of each and the ratio; writes
benchmarks/results/train-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_loader import RESULTS, machine_info, tutorial_loader
from torch import nn

from resnet.config import load_params
from resnet.data.store import load_meta, load_split
from resnet.epoch import train_one_epoch
from resnet.loader import DeviceLoader
from resnet.parts import build_training
from resnet.runtime import configure_torch, keep_freed_memory

#: Model options per benchmarked name (resnet18 with the CIFAR stem, as for 32x32 images).
MODELS = {"resnet20": {"name": "resnet20"}, "resnet18": {"name": "resnet18", "stem": "cifar"}}


def tutorial_rate(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    meta: dict,
    batch: int,
    workers: int,
    warmup: int,
    steps: int,
) -> float:
    """Images/s of the tutorials' loop over `steps` batches, after `warmup` batches (worker start-up excluded)."""
    loader = tutorial_loader(images, labels, meta, batch, workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    batches = iter(loader)
    for i in range(warmup + steps):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        x, y = next(batches)
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # the tutorials' bookkeeping: two host reads a step
        correct += (out.argmax(1) == y).sum().item()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def our_rate(
    params, meta: dict, images: np.ndarray, labels: np.ndarray, device: torch.device, warmup: int, steps: int
) -> float:
    """Images/s of train_one_epoch (the train stage's loop) over `steps` batches, after a `warmup`-batch epoch."""
    batch = params.train.batch_size
    parts = build_training(params, meta, device, warmup + steps)
    parts.model.train()
    rate = 0.0
    for lo, hi in ((0, warmup * batch), (warmup * batch, (warmup + steps) * batch)):
        loader = DeviceLoader(
            images[lo:hi],
            labels[lo:hi],
            batch,
            mean=meta["mean"],
            std=meta["std"],
            device=device,
            train=True,
            augment=params.train.augment,
            channels_last=params.train.channels_last,
        )
        rate = train_one_epoch(parts.model, loader, parts.optimizer, parts.scheduler, parts.scaler, parts.criterion)[
            "images_per_sec"
        ]
    return rate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", default="data/prepared")
    ap.add_argument("--params", default="params.yaml", help="the recipe whose loop is measured")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument(
        "--steps", type=int, nargs="+", default=[30, 8], help="timed steps per model (one value, or one per model)"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of the tutorials' way")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    base = load_params(args.params)
    device = configure_torch(base.train)
    if device.type == "cpu":
        keep_freed_memory()  # as stages/train.py does
    images, labels = load_split(args.prepared, "train")
    meta = load_meta(args.prepared)
    machine = machine_info(device)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, device "
        f"{machine['device']}, {torch.get_num_threads()} threads, load {machine['load_average_at_start']}"
    )
    print(f"command: {command}")

    steps_per_model = dict(zip(args.models, args.steps * len(args.models) if len(args.steps) == 1 else args.steps))
    results = {}
    for name in args.models:
        steps = steps_per_model[name]
        params = dataclasses.replace(base, model=dataclasses.replace(base.model, **MODELS[name]))
        batch = params.train.batch_size
        rates: dict[str, list[float]] = {"ours": [], "tutorial": []}
        for r in range(args.rounds):
            rates["ours"].append(our_rate(params, meta, images, labels, device, args.warmup, steps))
            torch.manual_seed(0)
            model = build_training(params, meta, torch.device("cpu"), 1).model.to(memory_format=torch.contiguous_format)
            rates["tutorial"].append(
                tutorial_rate(model, images, labels, meta, batch, args.workers, args.warmup, steps)
            )
            print(
                f"{name} round {r + 1}: ours {rates['ours'][-1]:.0f} img/s, tutorial {rates['tutorial'][-1]:.0f} img/s"
            )
        ours, tutorial = statistics.median(rates["ours"]), statistics.median(rates["tutorial"])
        results[name] = {
            "ours_images_per_sec": ours,
            "tutorial_images_per_sec": tutorial,
            "ratio": ours / tutorial,
            "rounds": rates,
            "steps": steps,
            "batch_size": batch,
        }
        print(f"{name}: ours {ours:.0f} img/s, tutorial {tutorial:.0f} img/s, ratio {ours / tutorial:.2f}x")

    date = dt.date.today().isoformat()
    recipe = {
        "batch_size": base.train.batch_size,
        "channels_last": base.train.channels_last,
        "precision": base.train.precision,
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train-{date}.json").write_text(
        json.dumps(
            {
                "date": date,
                "command": command,
                "machine": machine,
                "recipe": recipe,
                "warmup": args.warmup,
                "workers": args.workers,
                "results": results,
            },
            indent=2,
        )
        + "\n"
    )
    rows = "\n".join(
        f"| {n} | {r['ours_images_per_sec']:.0f} | {r['tutorial_images_per_sec']:.0f} | "
        f"{r['ratio']:.2f}x | {r['steps']} |"
        for n, r in results.items()
    )
    (out / f"train-{date}.md").write_text(f"""# Training throughput, {date}

Images per second over a fixed number of batches after {args.warmup} warm-up batches, median of
{args.rounds} alternating rounds: our loop (DeviceLoader + train_one_epoch, recipe {recipe})
against the tutorials' loop (PIL transforms, DataLoader with {args.workers} workers, fp32 NCHW,
`.item()` every batch), same model and data.

- Machine: {machine["cpu"]}, {machine["cores"]} cores; torch {machine["torch"]}; device {machine["device"]};
  load average at start {machine["load_average_at_start"]}
- Command: `{command}`

| model | ours (img/s) | tutorial (img/s) | ratio | timed steps |
| --- | --- | --- | --- | --- |
{rows}
""")
    print(f"wrote {out / f'train-{date}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
