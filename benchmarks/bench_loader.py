"""Augmented training batches per second: DeviceLoader against the tutorials' way, side by side.

The tutorials' way (the PyTorch CIFAR-10 tutorial, torchvision examples): a Dataset
over the same uint8 arrays that makes a PIL image per sample, PIL transforms
RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, and a
DataLoader with num_workers=2 and shuffle=True. Ours: resnet.loader.DeviceLoader
with crop padding 4 + flip, whole batches at once on the device.

Both iterate the same train split (data/prepared/train.npz, from the split stage)
with batch 128. Each method is measured in steady state (warm-up batches, worker
start-up excluded) for --seconds per round, rounds interleaved, median reported.
DeviceLoader is measured with 1 torch thread and with all cores: on a small shared
machine intra-op threads on 128x3x32x32 batches can cost more than they gain.

    python benchmarks/bench_loader.py [--prepared data/prepared] [--device cpu]

Prints the machine, the command, both figures and the ratio; writes
benchmarks/results/loader-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from resnet.config import AugmentParams
from resnet.data.errors import DataError
from resnet.data.store import load_meta, load_split
from resnet.loader import DeviceLoader

RESULTS = Path(__file__).resolve().parent / "results"


def unused_path(folder: Path, stem: str, suffix: str = "") -> Path:
    """``folder/<stem><suffix>``, or ``<stem>-2<suffix>``, ``-3``... if taken: a run never overwrites a record."""
    path, n = folder / f"{stem}{suffix}", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}{suffix}"
    return path


def git_describe(checkout: Path) -> str:
    """The checkout's commit (``-dirty`` when its files differ from it)."""
    cmd = ["git", "-C", str(checkout), "describe", "--always", "--dirty"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or "not a git checkout"


class ArrayDataset(Dataset):
    """The tutorials' Dataset: one PIL image per sample, PIL transforms, then a tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: transforms.Compose) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def tutorial_loader(images: np.ndarray, labels: np.ndarray, meta: dict, batch_size: int, workers: int) -> DataLoader:
    """The tutorials' input pipeline: a DataLoader of PIL crops and flips, ToTensor, Normalize."""
    size = meta["image_size"][0]
    augment = transforms.Compose(
        [
            transforms.RandomCrop(size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(meta["mean"], meta["std"]),
        ]
    )
    return DataLoader(ArrayDataset(images, labels, augment), batch_size=batch_size, shuffle=True, num_workers=workers)


def steady_rate(batches, seconds: float, warmup: int = 5, min_batches: int = 20) -> tuple[float, int]:
    """Batches per second over about `seconds`, after `warmup` batches; (rate, batches timed)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    for x, _ in it:
        _ = x.shape  # the batch exists; nothing else is done with it
        n += 1
        if n >= min_batches and time.perf_counter() - start >= seconds:
            break
    return n / (time.perf_counter() - start), n


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    """What the figures were measured on (printed and kept with the results)."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepared", default="data/prepared", help="the split stage's output folder")
    ap.add_argument("--device", default="cpu", help="device for DeviceLoader (the tutorials' way is CPU-side)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the tutorials' way")
    ap.add_argument("--seconds", type=float, default=4.0, help="timed seconds per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS), help="folder for loader-<date>.json/.md")
    args = ap.parse_args()

    try:
        images, labels = load_split(args.prepared, "train")
        meta = load_meta(args.prepared)
    except DataError as e:
        print(
            f"error: {e}\n(offline: dvc exp run -S data.dataset=imagefolder "
            f"-S data.source=../shared/datasets/cifar10-jpeg.tar.gz)",
            file=sys.stderr,
        )
        return 1
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    machine = machine_info(device)
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, "
        f"torchvision {machine['torchvision']}, device {machine['device']}, load {machine['load_average_at_start']}"
    )
    print(f"command: {command}")
    print(f"data: {args.prepared}/train.npz, {len(labels)} images {images.shape[1:]}, batch {args.batch_size}")

    augment = AugmentParams(crop_padding=4, flip=True, cutout=0, resized_crop_scale=0.0)
    device_loader = DeviceLoader(
        images,
        labels,
        args.batch_size,
        mean=meta["mean"],
        std=meta["std"],
        device=device,
        train=True,
        augment=augment,
        seed=0,
    )
    tutorial = tutorial_loader(images, labels, meta, args.batch_size, args.workers)

    def run_device(threads: int) -> float:
        torch.set_num_threads(threads)
        try:
            rate, _ = steady_rate(device_loader, args.seconds)
            if device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            torch.set_num_threads(default_threads)
        return rate

    thread_options = sorted({1, default_threads})
    rates: dict[str, list[float]] = {f"device_loader_{t}_threads": [] for t in thread_options}
    rates["tutorial"] = []
    for r in range(args.rounds):
        for t in thread_options:
            rates[f"device_loader_{t}_threads"].append(run_device(t))
        rates["tutorial"].append(steady_rate(tutorial, args.seconds)[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " batches/s")

    medians = {k: statistics.median(v) for k, v in rates.items()}
    best_threads = max(thread_options, key=lambda t: medians[f"device_loader_{t}_threads"])
    ours = medians[f"device_loader_{best_threads}_threads"]
    ratio = ours / medians["tutorial"]
    print(
        f"DeviceLoader: {ours:.1f} batches/s ({ours * args.batch_size:,.0f} images/s, "
        f"{best_threads} torch thread(s); "
        + ", ".join(f"{t} thread(s) {medians[f'device_loader_{t}_threads']:.1f}" for t in thread_options)
        + ")"
    )
    print(
        f"tutorials' way (PIL transforms, DataLoader num_workers={args.workers}): "
        f"{medians['tutorial']:.1f} batches/s ({medians['tutorial'] * args.batch_size:,.0f} images/s)"
    )
    print(f"ratio: {ratio:.1f}x")

    date = dt.date.today().isoformat()
    result = {
        "date": date,
        "command": command,
        "machine": machine,
        "data": {
            "prepared": args.prepared,
            "source": meta.get("source"),
            "images": int(len(labels)),
            "shape": list(images.shape[1:]),
        },
        "batch_size": args.batch_size,
        "augment": {"crop_padding": 4, "flip": True, "cutout": 0},
        "tutorial_workers": args.workers,
        "seconds_per_round": args.seconds,
        "rounds": args.rounds,
        "batches_per_second": {
            "device_loader": ours,
            "device_loader_threads": best_threads,
            "tutorial": medians["tutorial"],
            "all_medians": medians,
            "all_rounds": rates,
        },
        "ratio": ratio,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"loader-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {medians[k]:.1f} | {medians[k] * args.batch_size:,.0f} | {', '.join(f'{v:.1f}' for v in rates[k])} |"
        for k in rates
    )
    (out / f"loader-{date}.md").write_text(f"""# Loader benchmark, {date}

Augmented training batches (batch {args.batch_size}, random crop with padding 4 + horizontal flip,
normalised) per second, steady state, median of {args.rounds} interleaved rounds of ~{args.seconds:g} s.

- Machine: {machine["cpu"]}, {machine["cores"]} cores; torch {machine["torch"]}, torchvision
  {machine["torchvision"]}; device {machine["device"]}; load average at start {machine["load_average_at_start"]}
- Data: `{args.prepared}/train.npz`, {len(labels)} images {tuple(images.shape[1:])} (source: {meta.get("source")})
- Command: `{command}`

| loader | batches/s | images/s | rounds |
| --- | --- | --- | --- |
{rows}

**DeviceLoader ({best_threads} torch thread(s)): {ours:.1f} batches/s; tutorials' way (Dataset + PIL
transforms + DataLoader, num_workers={args.workers}, shuffle): {medians["tutorial"]:.1f} batches/s;
ratio {ratio:.1f}x.**
""")
    print(f"wrote {out / f'loader-{date}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
