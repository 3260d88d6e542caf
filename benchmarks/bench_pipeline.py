"""Time to accuracy: the whole pipeline, forced, with each stage's wall time and peak memory.

Runs ``dvc repro --force`` in this repository (or ``dvc exp run --force -S ...`` when
``--set`` overrides are given, e.g. the data source on an offline machine), streams
its output, and reads the line every stage ends with ("done in X s, peak memory Y
MiB"). Reports the total wall time, each stage's time and peak resident memory, and
the test accuracy from metrics/test.json.

    python benchmarks/bench_pipeline.py --set data.dataset=imagefolder \\
        --set data.source=../shared/datasets/cifar10-jpeg.tar.gz

Writes benchmarks/results/pipeline-<date>.json and .md. Takes as long as the
pipeline (about half an hour for the CPU default recipe on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_loader import RESULTS, machine_info

STAGE_RE = re.compile(r"Running stage '([\w-]+)'")
DONE_RE = re.compile(r"done in ([\d.]+) s, peak memory (\d+) MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dvc exp run -S override")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    bin_dir = Path(sys.executable).parent
    dvc = [str(bin_dir / "dvc")]
    cmd = dvc + (
        ["exp", "run", "--force"] + [a for s in args.set for a in ("-S", s)] if args.set else ["repro", "--force"]
    )
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    machine = machine_info(torch.device("cpu"))
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}; "
        f"load {machine['load_average_at_start']}\ncommand: {command}\nruns: {' '.join(cmd)}",
        flush=True,
    )

    stages: dict[str, dict[str, float]] = {}
    current = None
    start = time.perf_counter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            if m := STAGE_RE.search(line):
                current = m.group(1)
            elif (m := DONE_RE.search(line)) and current:
                stages[current] = {"seconds": float(m.group(1)), "peak_memory_mib": int(m.group(2))}
    total = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"pipeline failed (exit {proc.returncode})", file=sys.stderr)
        return proc.returncode

    test = json.loads(Path("metrics/test.json").read_text())
    date = dt.date.today().isoformat()
    result = {
        "date": date,
        "command": command,
        "pipeline_command": " ".join(cmd[1:]),
        "machine": machine,
        "total_seconds": round(total, 1),
        "stages": stages,
        "test_accuracy": test["test_accuracy"],
        "checkpoint": test.get("checkpoint"),
        "epoch": test.get("epoch"),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pipeline-{date}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {n} | {s['seconds']:.1f} | {s['peak_memory_mib']} |" for n, s in stages.items())
    (out / f"pipeline-{date}.md").write_text(f"""# Pipeline time to accuracy, {date}

`dvc {" ".join(cmd[1:])}` with the default recipe of params.yaml, every stage forced.

- Machine: {machine["cpu"]}, {machine["cores"]} cores; torch {machine["torch"]}; load average at
  start {machine["load_average_at_start"]}
- Command: `{command}`

| stage | wall time (s) | peak memory (MiB) |
| --- | --- | --- |
{rows}

Whole pipeline: {total / 60:.1f} min (including DVC's own work between stages).
Test accuracy: {test["test_accuracy"]:.4f} ({test.get("checkpoint")}, epoch {test.get("epoch")}).
""")
    print(
        f"total {total / 60:.1f} min, test accuracy {test['test_accuracy']:.4f}; "
        f"wrote {out / f'pipeline-{date}.json'} and .md"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
