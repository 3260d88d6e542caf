"""What each named recipe costs to train here: multiply-adds per image and measured training speed.

For every recipe in recipes/ (or those named), builds its model and optimizer exactly as
the train stage does (resnet.parts.build_training, the recipe's batch size, precision
as train.precision resolves on this machine, channels_last as params.yaml has it), and
trains a few batches of random images at the recipe's image size through
resnet.epoch.train_one_epoch after a warm-up. The images per second, times the recipe's
epochs and the training images of an epoch (CIFAR-10 with val_fraction 0.1: 45,000),
give the training time a full run would take on this machine: an estimate from a
measured speed, which is what the README's recipe table quotes where no full run was made.

    python benchmarks/recipe_costs.py [--recipes NAME ...] [--steps 4] [--warmup 2]

Recipes that need a weights file (recipe.requires) get a torchvision ResNet-18 state
dict with random weights, written to a temporary file. Prints the machine and a table;
writes benchmarks/results/recipe-costs-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import torch
import torchvision
from bench_loader import RESULTS, machine_info
from torch import nn

from resnet.config import load_params, override
from resnet.epoch import train_one_epoch
from resnet.loader import DeviceLoader
from resnet.parts import build_training
from resnet.recipes import list_recipes, load_recipe, required_keys
from resnet.runtime import configure_torch, cpu_summary, keep_freed_memory, resolve_precision

CLASSES = 10


def multiply_adds(model: nn.Module, size: int, channels: int) -> int:
    """Multiply-adds of one forward pass of one image (convolutions and linear layers; the rest is small)."""
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total += output.numel() * per_output
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, channels, size, size).to(memory_format=torch.contiguous_format))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return total


def measure(name: str, overrides: dict, device: torch.device, steps: int, warmup: int, images: int) -> dict:
    """One recipe: its model's multiply-adds, the training images/s here, and a full run's estimated time."""
    params = override(load_params(), overrides)
    tp, size = params.train, params.data.image_size or 32
    precision = resolve_precision(tp.precision, device, warn=False)
    meta = {"classes": [str(c) for c in range(CLASSES)], "channels": params.data.channels}
    meta |= {"mean": [0.5] * params.data.channels, "std": [0.25] * params.data.channels}
    parts = build_training(params, meta, device, warmup + steps, precision)
    macs = multiply_adds(parts.model, size, params.data.channels)
    generator = torch.Generator().manual_seed(0)
    batch = tp.batch_size
    rate = 0.0
    for n in (warmup, steps):  # the first pass warms up (oneDNN picks its kernels), the second is timed
        pixels = torch.randint(0, 256, (n * batch, size, size, params.data.channels), generator=generator)
        labels = torch.randint(0, CLASSES, (n * batch,), generator=generator)
        loader = DeviceLoader(
            pixels.to(torch.uint8), labels, batch, mean=meta["mean"], std=meta["std"], device=device,
            train=True, augment=tp.augment, channels_last=tp.channels_last,
        )  # fmt: skip
        parts.model.train()
        epoch = train_one_epoch(
            parts.model, loader, parts.optimizer, parts.scheduler, parts.scaler, parts.criterion, precision=precision
        )
        rate = epoch["images_per_sec"]
    hours = tp.epochs * images / rate / 3600
    print(
        f"{name}: {params.model.label} at {size} px, batch {batch}, {precision}: {macs / 1e6:,.0f}M multiply-adds, "
        f"{rate:,.1f} img/s -> {tp.epochs} epochs of {images:,} images in about {hours:,.1f} h here",
        flush=True,
    )
    return {
        "model": params.model.label,
        "image_size": size,
        "batch_size": batch,
        "precision": precision,
        "epochs": tp.epochs,
        "multiply_adds": macs,
        "images_per_sec": rate,
        "estimated_training_hours": hours,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=None, help="recipe names (default: all in recipes/)")
    ap.add_argument("--steps", type=int, default=4, help="timed batches per recipe")
    ap.add_argument("--warmup", type=int, default=2, help="batches before the timed ones")
    ap.add_argument("--images", type=int, default=45_000, help="training images per epoch")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    base = load_params()
    device = configure_torch(base.train)
    if device.type == "cpu":
        keep_freed_memory()  # as stages/train.py does
    machine = {**machine_info(device), "cpu_flags": cpu_summary()["cpu.flags"]}
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"machine: {machine['cpu']} ({machine['cpu_flags']}), {machine['cores']} cores, torch {machine['torch']}")
    print(f"command: {command}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnet18.pth"
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
        for name in args.recipes or list_recipes():
            overrides = load_recipe(name, extra={k: str(weights) for k in required_keys(name)})
            results[name] = measure(name, overrides, device, args.steps, args.warmup, args.images)

    date = dt.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"date": date, "command": command, "machine": machine, "images_per_epoch": args.images}
    (out / f"recipe-costs-{date}.json").write_text(json.dumps({**record, "results": results}, indent=2) + "\n")
    rows = "\n".join(
        f"| `{n}` | {r['model']} | {r['image_size']} | {r['batch_size']} | {r['precision']} | "
        f"{r['multiply_adds'] / 1e6:,.0f}M | {r['images_per_sec']:,.1f} | {r['epochs']} | "
        f"{r['estimated_training_hours']:,.1f} h |"
        for n, r in results.items()
    )
    (out / f"recipe-costs-{date}.md").write_text(f"""# What each recipe costs to train, {date}

Training images per second of each recipe's model, optimizer, batch size and precision
(as `train.precision` resolves here), over {args.steps} batches of random images after
{args.warmup} warm-up batches, through the train stage's loop; multiply-adds of one
forward pass of one image (convolutions and linear layers). The last column is an
estimate from that measured speed: epochs x {args.images:,} images / (images/s), training
only (no validation, no other stage).

- Machine: {machine["cpu"]} ({machine["cpu_flags"]}), {machine["cores"]} cores; torch {machine["torch"]};
  load average at start {machine["load_average_at_start"]}
- Command: `{command}`

| recipe | model | px | batch | precision | multiply-adds/image | img/s | epochs | full training (estimate) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{rows}
""")
    print(f"wrote {out / f'recipe-costs-{date}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
