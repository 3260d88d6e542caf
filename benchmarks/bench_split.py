"""The whole split stage with the hand-written tar reader against tarfile's streaming mode, side by side.

Does the hand-written tar header reader (``resnet.data.tar_reader``) matter for the
split stage? This times ``resnet.data.split.prepare`` (read the archive, decode, split,
statistics, write the ``.npz`` files: the whole stage) on a real archive, once with
each reader per round, rounds interleaved (order alternating), and reports medians:

* ``handwritten``: ``resnet.data.archives._iter_tar``, the reader the package uses;
* ``tarfile``: ``resnet.data.archives._iter_tarfile``, ``tarfile.open(path, "r|*")``,
  the package's fallback for what the hand-written reader does not know.

Both apply the same safety rules (``archives._checked_entry``: names, links, special
files; both require the end-of-archive marker).

Both must give byte-identical prepared files. Reading the archive alone (every member
with its bytes) is timed too, to show each reader's own share. Run from the
repository root, with nothing else heavy running:

    python benchmarks/bench_split.py [--archive ../shared/datasets/cifar10-jpeg.tar.gz] [--rounds 3]

Prints the machine, the command, the figures and the decision rule's outcome (the
hand-written reader is worth keeping only if it saves at least 10% of the whole
stage); writes benchmarks/results/split-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
import torchvision.io  # noqa: F401  (else the first decode imports it inside the first timing)

from resnet.config import load_params, override
from resnet.data import archives
from resnet.data.sources import download
from resnet.data.split import prepare
from resnet.utils import read_json

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
THRESHOLD = 0.10  # the hand-written reader stays only if it saves this share of the whole stage

Reader = Callable[[Path, str, bool], Iterator[archives.Entry]]


def tarfile_reader(path: Path, fmt: str, read_data: bool) -> Iterator[archives.Entry]:
    """tarfile's streaming mode in the place of the hand-written reader (``fmt``: tarfile detects it)."""
    return archives._iter_tarfile(path, read_data)


def git_revision() -> str:
    """The checked-out commit, '+ changes' when the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" + changes" if git("status", "--porcelain") else "")


def cpu_info() -> tuple[str, str]:
    """(model name, flags) from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = value.strip()
    return model, flags


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run_rounds(readers: dict[str, Reader], raw: Path, work: Path, params, rounds: int) -> dict[str, dict]:
    """Per reader: whole-stage and read-only (wall, cpu) per round; the last round's prepared dir."""
    archive = raw / read_json(raw / "source.json")["path"]
    results = {name: {"stage": [], "read": [], "out": None} for name in readers}
    original = archives._iter_tar
    try:
        for r in range(rounds):
            order = list(readers) if r % 2 == 0 else list(reversed(readers))
            for name in order:
                archives._iter_tar = readers[name]
                out = work / f"{name}-{r}"
                results[name]["read"].append(timed(lambda: sum(1 for _ in archives.iter_archive(archive))))
                results[name]["stage"].append(timed(lambda out=out: prepare(raw, out, params)))
                if results[name]["out"] is not None:  # keep one prepared copy per reader (~190 MB each)
                    shutil.rmtree(results[name]["out"])
                results[name]["out"] = out
                print(
                    f"round {r + 1} {name:12s} split stage {results[name]['stage'][-1][0]:6.2f} s wall, "
                    f"read only {results[name]['read'][-1][0]:6.2f} s",
                    flush=True,
                )
    finally:
        archives._iter_tar = original
    return results


def same_outputs(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.npz", "val.npz", "test.npz"))


def report(results: dict[str, dict], info: dict[str, str]) -> str:
    """The Markdown record: machine, command, table, decision."""
    med = {n: statistics.median(w for w, _ in r["stage"]) for n, r in results.items()}
    med_cpu = {n: statistics.median(c for _, c in r["stage"]) for n, r in results.items()}
    med_read = {n: statistics.median(w for w, _ in r["read"]) for n, r in results.items()}
    gain = (med["tarfile"] - med["handwritten"]) / med["tarfile"]
    verdict = "keep it" if gain >= THRESHOLD else "tarfile streaming is enough; the hand-written reader goes"
    rows = "\n".join(
        f"| {n} | {med[n]:.2f} | {med_cpu[n]:.2f} | {med_read[n]:.2f} | "
        f"{', '.join(f'{w:.2f}' for w, _ in r['stage'])} |"
        for n, r in results.items()
    )
    return f"""# Split stage benchmark: hand-written tar reader vs tarfile streaming, {info["date"]}

`resnet.data.split.prepare` (the whole split stage: read, decode, split, statistics, write) on
{info["archive"]} ({info["members"]} images), median of {info["rounds"]} interleaved rounds per reader.

- Command: `{info["command"]}`
- CPU: {info["cpu"]}, {os.cpu_count()} cores; load average at start {info["load_start"]}, at end {info["load_end"]}
  (a shared machine: other processes may have used the cores during the run)
- CPU flags: {info["flags"]}
- Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__},
  numpy {np.__version__}, Pillow {PIL.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}
- Readers: `resnet.data.archives._iter_tar` (hand-written, `resnet.data.tar_reader`) and
  `resnet.data.archives._iter_tarfile` (`tarfile.open(path, "r|*")`), same safety rules; git {info["rev"]}
- Prepared files byte-identical between the readers: {info["identical"]}

| reader | split stage, s (wall) | split stage, s (CPU) | reading the archive alone, s (wall) | rounds, s (wall) |
| --- | --- | --- | --- | --- |
{rows}

**The hand-written reader saves {gain:.1%} of the whole split stage
({med["tarfile"]:.2f} s -> {med["handwritten"]:.2f} s); threshold {THRESHOLD:.0%}: {verdict}.**
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--archive",
        default="../shared/datasets/cifar10-jpeg.tar.gz",
        help="an image-folder archive (default: the shared CIFAR-10 JPEG copy)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("RESNET_NO_PROGRESS", "1")
    cpu, flags = cpu_info()
    info = {
        "date": dt.date.today().isoformat(),
        "archive": args.archive,
        "rounds": str(args.rounds),
        "command": "python " + " ".join(sys.argv),
        "cpu": cpu,
        "flags": flags,
        "rev": git_revision(),
        "load_start": str([round(x, 2) for x in os.getloadavg()]),
    }
    print(
        f"{info['command']}\nCPU: {cpu}, {os.cpu_count()} cores\nflags: {flags}\n"
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"numpy {np.__version__}, Pillow {PIL.__version__}, zlib {zlib.ZLIB_RUNTIME_VERSION}",
        flush=True,
    )
    readers = {"tarfile": tarfile_reader, "handwritten": archives._iter_tar}
    params = override(
        load_params(REPO / "params.yaml"),
        {"data.dataset": "imagefolder", "data.source": str(Path(args.archive).resolve())},
    ).data
    with tempfile.TemporaryDirectory(prefix="bench_split_") as tmp:
        record = download(params, Path(tmp) / "raw")
        info["members"] = f"{record['members']:,}"
        results = run_rounds(readers, Path(tmp) / "raw", Path(tmp), params, args.rounds)
        info["identical"] = "yes" if same_outputs(results["tarfile"]["out"], results["handwritten"]["out"]) else "NO"
    info["load_end"] = str([round(x, 2) for x in os.getloadavg()])
    text = report(results, info)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"split-{info['date']}.md").write_text(text)
    return 0 if info["identical"] == "yes" else 1


if __name__ == "__main__":
    sys.exit(main())
