"""Two versions of the pipeline's code, the same stages on the same data, timed side by side.

Did a change make a stage slower? This runs ``python <checkout>/stages/<stage>.py`` for
each checkout (``--checkout NAME=PATH``, PATH a clone or ``git worktree`` of this
repository at the version to time) in one workspace whose ``data/prepared`` is given,
rounds interleaved and the order alternating, each run starting from no models and no
MLflow store (so training never resumes). The package comes from each checkout's
``src`` (PYTHONPATH before the installed one). Reports the median wall time of each
stage per checkout, and the peak resident memory (``wait4``'s ``ru_maxrss``).

    git worktree add /tmp/before <commit>
    python benchmarks/bench_stage_versions.py --checkout before=/tmp/before --checkout after=. \\
        --prepared data/prepared --set train.epochs=1 --rounds 3

``--stages split --raw data/raw`` times the split stage instead (from a download stage's
output) and checks that every run wrote the same files.

Writes benchmarks/results/stage-versions-<date>.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_loader import RESULTS, git_describe, machine_info, unused_path

from resnet.recipes import parse_sets
from resnet.runtime import cpu_summary

FRESH = ("models", "metrics", "plots", "mlflow.db", "mlartifacts")


def checkout_params(checkout: Path, sets: list[str]) -> str:
    """The checkout's own params.yaml (each version knows its own keys) with the overrides."""
    params = yaml.safe_load((checkout / "params.yaml").read_text())
    for key, value in parse_sets(sets).items():
        *parents, leaf = key.split(".")
        section = params
        for p in parents:
            section = section[p]
        section[leaf] = value
    return yaml.safe_dump(params, sort_keys=False)


def folder_digest(folder: Path) -> str:
    """sha256 over the names and bytes of a folder's files, in name order."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def run_once(checkout: Path, stages: list[str], ws: Path, params: str) -> dict[str, dict[str, float]]:
    """The stages in order, from a clean workspace; wall seconds and peak RSS (MB) of each."""
    (ws / "params.yaml").write_text(params)
    for name in FRESH:
        path = ws / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve() / "src"))
    out = {}
    for stage in stages:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, str(checkout / "stages" / f"{stage}.py")],
            cwd=ws,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"{checkout}: stage {stage} failed:\n{proc.stderr.read()[-3000:]}")
        out[stage] = {"seconds": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024)}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", action="append", required=True, help="NAME=PATH, two or more")
    ap.add_argument("--prepared", type=Path, help="a split stage's output folder (stages after split)")
    ap.add_argument("--raw", type=Path, help="a download stage's output folder (to time split itself)")
    ap.add_argument("--stages", default="train,evaluate")
    ap.add_argument("--set", nargs="*", default=[], help="params.yaml overrides, key=value")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stage-versions"))
    args = ap.parse_args()
    checkouts = {name: str(Path(path).resolve()) for name, path in (c.split("=", 1) for c in args.checkout)}
    stages = args.stages.split(",")
    ws = args.workdir
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "data").mkdir(parents=True)
    given = {"raw": args.raw, "prepared": None if "split" in stages else args.prepared}
    for folder, path in given.items():
        if path is not None:
            (ws / "data" / folder).symlink_to(path.resolve())
    if "split" in stages and args.raw is None or "split" not in stages and args.prepared is None:
        ap.error("give --raw to time the split stage, --prepared for the stages after it")
    params = {name: checkout_params(Path(path), args.set) for name, path in checkouts.items()}
    machine = machine_info(torch.device("cpu"))
    commits = {name: git_describe(Path(path)) for name, path in checkouts.items()}
    print(json.dumps(machine), cpu_summary(), flush=True)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in checkouts}
    for r in range(args.rounds):
        order = list(checkouts) if r % 2 == 0 else list(reversed(checkouts))
        for name in order:
            runs[name].append(run_once(Path(checkouts[name]), stages, ws, params[name]))
            if "split" in stages:  # the same files, or the change is not only about speed
                runs[name][-1]["prepared_sha256"] = folder_digest(ws / "data" / "prepared")
            print(f"round {r + 1} {name}: {json.dumps(runs[name][-1])}", flush=True)
    date = dt.date.today().isoformat()
    lines = [
        f"# Stage wall time, {' vs '.join(checkouts)}, {date}",
        "",
        f"- Command: `python {' '.join(sys.argv)}`",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores, flags {cpu_summary()['cpu.flags']}",
        f"- torch {machine['torch']}, Python {machine['python']}",
        f"- Load average at start {machine['load_average_at_start']}, at end {[round(v, 2) for v in os.getloadavg()]}",
        f"- Overrides: {args.set}; {args.rounds} rounds, interleaved, order alternating",
        "",
        "| checkout | stage | median wall, s | rounds, s | peak RSS, MB (max) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, path in checkouts.items():
        for stage in stages:
            secs = [run[stage]["seconds"] for run in runs[name]]
            rss = max(run[stage]["peak_rss_mb"] for run in runs[name])
            median = statistics.median(secs)
            lines.append(f"| {name} ({path}, {commits[name]}) | {stage} | {median:.1f} | {secs} | {rss} |")
    digests = {run["prepared_sha256"] for name in checkouts for run in runs[name] if "prepared_sha256" in run}
    if digests:
        lines += [
            "",
            f"Prepared files (sha256 of all of them) {'identical in every run' if len(digests) == 1 else 'DIFFER'}.",
        ]
    text = "\n".join(lines) + "\n"
    report = unused_path(RESULTS, f"stage-versions-{date}", ".md")
    report.write_text(text)
    report.with_suffix(".json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
