"""Peak memory of each pipeline stage on a dataset larger than memory: CIFAR-10 resized to 224x224.

At 224 px the CIFAR-10 splits are 9 GB of uint8 (train alone 6.8 GB). This runs the
pipeline's own stage scripts (``python stages/<stage>.py``, what ``dvc repro`` runs) in
a scratch workspace on the real archive, each as a child process whose peak resident
memory the kernel reports (``wait4``'s ``ru_maxrss``), while a thread samples its
resident memory (``VmRSS``, of which ``RssFile`` are mapped file pages) every second:

1. ``download``, ``split`` at ``--image-size``;
2. one epoch of ``--model`` at ``--width`` (train, then validate, evaluate, register),
   the train split streamed from disk (data.max_resident_mb below its size);
3. optionally (``--full-width-minutes M``) the train stage with the full-width model,
   stopped after M minutes with SIGTERM (as Ctrl-C), for machines where a whole
   full-width epoch is too long (``--width 1`` runs it whole: 27 min on a 2-core CPU
   with AVX-512 bf16, an estimated two hours in fp32 on an AVX2-only one; with
   ``--device cuda`` on a GPU).

DVC is not used to run them: it would copy the 9 GB of prepared data into its cache,
which the figures are not about. Run from the repository root, nothing else heavy running:

    python benchmarks/bench_large_data.py --archive ../shared/datasets/cifar10-jpeg.tar.gz \\
        --workdir /tmp/large --width 1

Prints and writes benchmarks/results/large-data-<size>-<date>/ (report.md, results.json,
the stages' logs and memory traces).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from bench_loader import RESULTS, git_describe, machine_info, unused_path

from resnet.runtime import cpu_summary

REPO = Path(__file__).resolve().parents[1]
LIMIT_MB = 3 * 1024  # the goal: at most 3 GB resident in any stage


STAGES = ("download", "split", "train", "validate", "evaluate", "register")


def _status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process, in kB (empty once it is gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (ln.split(":", 1) for ln in lines) if k in ("VmRSS", "RssAnon", "RssFile")}


def run_stage(stage: str, ws: Path, log_dir: Path, stop_after: float | None = None) -> dict[str, Any]:
    """Run stages/<stage>.py in ``ws``; its wall time, exit status, peak RSS and an RSS trace."""
    log = (log_dir / f"{stage}.log").open("w")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py")], cwd=ws, stdout=log, stderr=log)
    trace: list[tuple[float, dict[str, int]]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(1.0):
            s = _status(proc.pid)
            if s:
                trace.append((round(time.monotonic() - t0, 1), s))
            if stop_after is not None and time.monotonic() - t0 > stop_after and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the stage ends as on Ctrl-C

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    log.close()
    with (log_dir / f"{stage}.rss.csv").open("w") as f:
        f.write("seconds,vmrss_kb,rss_anon_kb,rss_file_kb\n")
        f.writelines(f"{t},{s.get('VmRSS', '')},{s.get('RssAnon', '')},{s.get('RssFile', '')}\n" for t, s in trace)
    peak_file = max((s.get("RssFile", 0) for _, s in trace), default=0)
    result = {
        "stage": stage,
        "exit": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # kB on Linux
        "peak_sampled_rss_file_mb": round(peak_file / 1024),
        "stopped_after_s": stop_after,
    }
    print(json.dumps(result), flush=True)
    return result


def workspace(ws: Path, archive: Path, size: int, model: str, width: float, batch: int, device: str) -> None:
    """A pipeline workspace: the repository's params.yaml with this run's values; MLflow in ws."""
    ws.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    d, m, t = params["data"], params["model"], params["train"]
    d.update(dataset="imagefolder", source=str(archive.resolve()), sha256=None, image_size=size, max_per_class=None)
    m.update(name=model, stem="imagenet", width_multiplier=width, tta="none", pretrained=None, freeze_backbone=False)
    m.update(block=None, layers=[], widths=[], shortcut="B", zero_init_residual=False)
    t.update(epochs=1, batch_size=batch, optimizer="sgd", lr=0.01, momentum=0.9, nesterov=False, weight_decay=5e-4)
    t.update(schedule="constant", milestones=[], warmup_epochs=0, label_smoothing=0.0, eval_every=1)
    t.update(channels_last=False, compile=False, device=device, num_threads=0, precision="auto")
    t["augment"].update(crop_padding=0, flip=True, cutout=0, resized_crop_scale=0.35)
    t["ema"].update(decay=0.0, lookahead=False)
    params["validate"]["batch_size"] = params["evaluate"]["batch_size"] = 100
    params["tracking"].update(uri=None, system_metrics=False)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def report(results: dict[str, Any]) -> str:
    lines = [
        f"# Peak memory per stage, CIFAR-10 (JPEG copy) at {results['image_size']}x{results['image_size']}, "
        f"{results['date']}",
        "",
        f"- Command: `{results['command']}`",
        f"- Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; {results['cpu_flags']}",
        f"- torch {results['machine']['torch']}, git {results['git']}",
        f"- Prepared splits: {results['prepared_mb']} MB on disk (train {results['train_mb']} MB); "
        f"data.max_resident_mb {results['max_resident_mb']}",
        f"- Goal: every stage at most {LIMIT_MB} MB resident",
        "",
        "| run | stage | exit | wall, s | peak RSS, MB | peak mapped-file RSS (sampled), MB | within goal |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in results["runs"]:
        for r in run["stages"]:
            stop = f" (stopped after {r['stopped_after_s']:.0f} s)" if r["stopped_after_s"] else ""
            lines.append(
                f"| {run['name']} | {r['stage']}{stop} | {r['exit']} | {r['wall_s']} | {r['peak_rss_mb']} | "
                f"{r['peak_sampled_rss_file_mb']} | {'yes' if r['peak_rss_mb'] <= LIMIT_MB else 'NO'} |"
            )
    if results.get("metrics"):
        lines += ["", "Metrics of the one-epoch run (its model is not the point):", "", "```"]
        lines += [json.dumps(results["metrics"], indent=1), "```"]
    lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archive", type=Path, default=REPO.parent / "shared/datasets/cifar10-jpeg.tar.gz")
    ap.add_argument("--workdir", type=Path, required=True, help="scratch folder (about 10 GB at 224 px)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--width", type=float, default=0.25, help="width multiplier of the one-epoch run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--full-width-minutes", type=float, default=0.0, help="0 = skip the full-width train stage")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="train.device")
    ap.add_argument(
        "--last-stage", default="register", choices=STAGES[1:], help="stop the one-epoch run after this stage"
    )
    args = ap.parse_args()
    date = dt.date.today().isoformat()
    out = unused_path(RESULTS, f"large-data-{args.image_size}-{date}")
    out.mkdir(parents=True)
    results: dict[str, Any] = {
        "date": date,
        "command": "python " + " ".join(sys.argv),
        "machine": machine_info(torch.device("cpu")),
        "cpu_flags": cpu_summary(),
        "git": git_describe(REPO),
        "image_size": args.image_size,
        "runs": [],
    }
    ws = args.workdir / "epoch"
    shutil.rmtree(ws, ignore_errors=True)
    workspace(ws, args.archive, args.image_size, args.model, args.width, args.batch_size, args.device)
    run = STAGES[: STAGES.index(args.last_stage) + 1]
    stages = [run_stage(s, ws, out) for s in run[:2]]
    prepared = ws / "data" / "prepared"
    results["prepared_mb"] = round(sum(f.stat().st_size for f in prepared.iterdir()) / 2**20)
    results["train_mb"] = round((prepared / "train.npz").stat().st_size / 2**20)
    results["max_resident_mb"] = yaml.safe_load((ws / "params.yaml").read_text())["data"]["max_resident_mb"]
    for s in run[2:]:
        stages.append(run_stage(s, ws, out))
        if stages[-1]["exit"] != 0:
            break
    name = f"one epoch, {args.model} x{args.width}" if "train" in run else "data stages"
    results["runs"].append({"name": name, "stages": stages})
    results["metrics"] = {f.name: json.loads(f.read_text()) for f in sorted((ws / "metrics").glob("*.json"))}
    if args.full_width_minutes > 0:
        full = args.workdir / "full"
        shutil.rmtree(full, ignore_errors=True)
        workspace(full, args.archive, args.image_size, args.model, 1.0, args.batch_size, args.device)
        (full / "data").mkdir()
        (full / "data" / "prepared").symlink_to(prepared)  # the same prepared splits
        (full / "data" / "raw").symlink_to(ws / "data" / "raw")
        full_log = out / "full-width"
        full_log.mkdir(exist_ok=True)
        stage = run_stage("train", full, full_log, stop_after=args.full_width_minutes * 60)
        results["runs"].append({"name": f"{args.model} x1.0, stopped", "stages": [stage]})
    text = report(results)
    (out / "report.md").write_text(text)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
