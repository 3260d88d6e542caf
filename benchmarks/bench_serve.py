"""The served model on this CPU: requests per second and latency at batch 1 and 32.

Registers a resnet20 (full width, 10 classes, 32x32: the default recipe's model; random
weights, since the cost of a request does not depend on their values) in a temporary
SQLite store, starts ``mlflow models serve -m models:/bench@champion --env-manager
local`` on loopback (MLflow's default of one worker), and sends JSON requests of 32x32
RGB images (``{"inputs": [...]}``, as the README's curl example):

* sequential: one client, one request at a time: latency p50/p99 and requests/s;
* concurrent: 4 client threads at once: requests/s and images/s under load.

A request's time is the client's: JSON encoding is done before, the server's parsing,
preprocessing, model and answer are inside. Run from the repository root, nothing else
heavy running:

    python benchmarks/bench_serve.py [--requests 200] [--batches 1 32]

Prints the machine (CPU model and flags, versions) and the figures; writes
benchmarks/results/serve-<date>.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import torch
from bench_split import cpu_info, git_revision

from resnet import tracking
from resnet.checkpoint import save_checkpoint
from resnet.config import load_params
from resnet.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def register_model(work: Path) -> str:
    """A resnet20 registered as bench@champion in work/mlflow.db; the store's URI."""
    os.chdir(work)
    subprocess.run(["git", "init", "-q"], check=True)
    model = build_model("resnet20", len(CLASSES)).eval()
    arch = {"name": "resnet20", "num_classes": len(CLASSES), "in_channels": 3, "options": {}}
    state = {"arch": arch, "model": model.state_dict(), "classes": CLASSES, "mean": [0.49, 0.48, 0.45]}
    save_checkpoint("best.pt", {**state, "std": [0.25, 0.24, 0.26], "image_size": [32, 32], "epoch": 1})
    params = load_params(ROOT / "params.yaml")
    with tracking.start_run(params, {"source": "bench"}, "cpu", "run.json"):
        pass
    with tracking.continue_run(params, "run.json", "register") as run:
        uri = tracking.log_model(run, "best.pt", np.zeros((2, 32, 32, 3), dtype=np.uint8))
        tracking.register_model(run, uri, "bench", "test_accuracy", {"test_accuracy": 0.5})
    return tracking.resolve_tracking_uri(params.tracking)


def start_server(store: str, work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["mlflow", "models", "serve", "-m", "models:/bench@champion", "--env-manager", "local", "-p", str(port)]
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(360):
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 180 s")


def post(url: str, body: bytes) -> float:
    """One request; its wall time in seconds (the answer is read whole and checked)."""
    req = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read())
    seconds = time.perf_counter() - t0
    assert r.status == 200 and "predictions" in answer
    return seconds


def measure(url: str, batch: int, requests: int) -> dict[str, float]:
    images = np.random.default_rng(batch).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    body = json.dumps({"inputs": images.tolist()}).encode()
    for _ in range(5):  # warm-up: first requests pay for lazy initialisation
        post(url, body)
    t0 = time.perf_counter()
    lat = sorted(post(url, body) for _ in range(requests))
    seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: post(url, body), range(requests)))
    conc = time.perf_counter() - t0
    return {
        "batch": batch,
        "requests": requests,
        "kb_per_request": len(body) / 1024,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "rps_sequential": requests / seq,
        "rps_4_clients": requests / conc,
        "images_per_s_4_clients": requests * batch / conc,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    cpu, flags = cpu_info()
    with tempfile.TemporaryDirectory() as tmp:
        store = register_model(Path(tmp))
        proc, url = start_server(store, Path(tmp))
        try:
            rows = [measure(url, b, args.requests) for b in args.batches]
        finally:
            proc.terminate()
            proc.wait(30)
    os.chdir(ROOT)
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
    lines = [
        f"# Served model: resnet20 (10 classes, 32x32) behind `mlflow models serve`, {dt.date.today()}",
        "",
        f"Command: `python benchmarks/bench_serve.py --requests {args.requests} --batches "
        f"{' '.join(map(str, args.batches))}` (git {git_revision()})",
        f"Machine: {cpu}, {os.cpu_count()} cores, flags {' '.join(wanted)}; torch {torch.__version__}, "
        f"mlflow {mlflow.__version__}, one server worker (MLflow's default), torch threads as the server sets them.",
        "",
        "| batch | KB/request | p50 ms | p99 ms | requests/s (1 client) | requests/s (4 clients) "
        "| images/s (4 clients) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['kb_per_request']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['rps_sequential']:.1f} | {r['rps_4_clients']:.1f} | {r['images_per_s_4_clients']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / f"serve-{dt.date.today()}.md"
    out.write_text(text)
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
