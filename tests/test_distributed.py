"""Several processes training one model (resnet.distributed), on CPU with gloo, as CI runs it.

Real processes throughout: the train stage started as a user (or dvc) starts it, which
becomes torchrun's elastic agent and starts the processes that train.

* Data: every process's micro-batches put together are one process's global batch,
  images and augmentations alike; gradient accumulation sums to the same step.
* Two processes with SyncBatchNorm give one process's weights (same global batch, seed)
  within float rounding after a few steps, with one MLflow run written by rank 0 alone.
* A checkpoint saved by N processes resumes in M, and the reverse.
* A rank killed mid-epoch: the group restarts, resumes from models/last.pt and ends bit
  for bit where an uninterrupted run ends, in the same MLflow run.
* Two nodes (two launchers, c10d rendezvous on loopback) = two processes on one node.
* A rendezvous that cannot happen (no peer, a port held by another program) fails in
  bounded time, naming the endpoint.

Every process a test starts is killed (its whole process group) when the test ends, and
every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from test_training import ROOT, load_stage_module, make_params, quadrant_task, write_stage_inputs

from resnet import paths
from resnet.checkpoint import load_checkpoint
from resnet.config import ConfigError, override
from resnet.distributed import World, shard
from resnet.epoch import train_one_epoch
from resnet.loader import DeviceLoader
from resnet.lock import waiting_lock

STAGE = ROOT / "stages" / "train.py"
#: One recipe for the process runs: 3 epochs of 32 steps (global batch 32), long enough to kill one mid-epoch.
N_TRAIN, EPOCHS, GLOBAL_BATCH = 1024, 3, 32


# ----------------------------------------------------------------------------- data and steps (in process)


def _batches(loader: DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(1)
    return list(loader)


@pytest.mark.parametrize(("world", "accumulation"), [(2, 1), (2, 2), (3, 1)])
def test_the_shares_of_every_process_make_up_one_process_global_batch(world: int, accumulation: int) -> None:
    images, labels = quadrant_task(100, 16)
    aug = make_params(augment={"crop_padding": 2, "flip": True, "cutout": 4}).train.augment
    kw = {"mean": [0.3] * 3, "std": [0.3] * 3, "train": True, "augment": aug, "seed": 5}
    per = 4
    one = _batches(DeviceLoader(images, labels, per * world * accumulation, **kw))
    parts = [
        _batches(DeviceLoader(images, labels, per, rank=r, world_size=world, accumulation=accumulation, **kw))
        for r in range(world)
    ]
    assert all(len(p) == len(one) * accumulation for p in parts)
    for step, (x, y) in enumerate(one):
        # Micro-batch m of rank r holds images (m * world + r) * per ... of the global batch.
        got = [parts[r][step * accumulation + m] for m in range(accumulation) for r in range(world)]
        assert torch.equal(torch.cat([g[1] for g in got]), y)
        assert torch.equal(torch.cat([g[0] for g in got]), x)  # augmented the same way, bit for bit


def test_a_sharded_loader_refuses_a_split_smaller_than_one_global_batch() -> None:
    images, labels = quadrant_task(20, 8)
    with pytest.raises(ValueError, match="20 images cannot fill one global batch of 8 x 2 processes x 2"):
        DeviceLoader(images, labels, 8, mean=[0] * 3, std=[1] * 3, train=True, world_size=2, accumulation=2)


def test_validation_shares_cover_the_split_once() -> None:
    for n, size in ((10, 3), (7, 4), (5000, 2)):
        slices = [shard(n, World(rank=r, size=size)) for r in range(size)]
        assert list(np.concatenate([np.arange(n)[s] for s in slices])) == list(range(n))


def test_gradient_accumulation_takes_the_step_of_the_whole_batch() -> None:
    """Two micro-batches of 16 = one batch of 32 (a model without BatchNorm: its statistics differ by design)."""
    images, labels = quadrant_task(128, 8)
    results = []
    for batch, accumulation in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        loader = DeviceLoader(
            images, labels, batch, mean=[0.3] * 3, std=[0.3] * 3, train=True, seed=1, accumulation=accumulation
        )
        out = train_one_epoch(
            model, loader, opt, sched, torch.amp.GradScaler("cpu", enabled=False), torch.nn.CrossEntropyLoss()
        )
        results.append((model[1].weight.detach().clone(), out))
    (w1, out1), (w2, out2) = results
    torch.testing.assert_close(w2, w1, rtol=0, atol=1e-6)
    assert out1["images"] == out2["images"] == 128
    assert out2["loss"] == pytest.approx(out1["loss"], rel=1e-6)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"distributed.nnodes": 2}, "distributed.rdzv_endpoint: null, but distributed.nnodes is 2"),
        ({"distributed.rdzv_endpoint": "node0"}, "'node0' is not host:port"),
        ({"distributed.rdzv_endpoint": "node0:99999"}, "'node0:99999' is not host:port"),
        ({"distributed.backend": "nccl", "train.device": "cpu"}, "'nccl' needs CUDA GPUs"),
        ({"distributed.accumulation_steps": 0}, "distributed.accumulation_steps: 0 is out of range"),
    ],
)
def test_bad_distributed_params_are_refused_before_any_work(changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        override(make_params(), changes)


# ----------------------------------------------------------------------------- real processes


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; each one's whole process group is killed at the end, whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)


def _workspace(root: Path, nproc: int, *, n_train: int = N_TRAIN, epochs: int = EPOCHS, **dist: object) -> Path:
    changes = {
        "distributed.nproc_per_node": nproc,
        "distributed.sync_batchnorm": True,
        "distributed.timeout": 60,
        **{f"distributed.{k}": v for k, v in dist.items()},
    }
    batch = GLOBAL_BATCH // (nproc * int(dist.get("nnodes", 1)))
    write_stage_inputs(root, {"epochs": epochs, "batch_size": batch, "eval_every": 1}, n_train=n_train, changes=changes)
    return root


def _start(root: Path, procs: list[subprocess.Popen]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    p = subprocess.Popen(
        [sys.executable, str(STAGE)],
        cwd=root,
        env={**env, "RESNET_NO_PROGRESS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the fixture kills launcher and workers together
    )
    procs.append(p)
    return p


def _finish(p: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _train(root: Path, procs: list[subprocess.Popen]) -> str:
    return _finish(_start(root, procs))


def _state(root: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(root / paths.LAST_CHECKPOINT)["model"]


def _wait_for_epoch(root: Path, epoch: int, p: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert p.poll() is None, "the training ended before it could be interrupted"
        last = root / paths.LAST_CHECKPOINT
        if last.exists() and load_checkpoint(last)["epoch"] >= epoch:
            return
        time.sleep(0.05)
    raise AssertionError(f"no epoch {epoch} in {timeout} s")


def _mlflow_runs(root: Path) -> list[mlflow.entities.Run]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Uninterrupted runs of the recipe in one and in two processes (same global batch)."""
    procs: list[subprocess.Popen] = []
    roots = {n: _workspace(tmp_path_factory.mktemp(f"ref{n}"), n) for n in (1, 2)}
    try:
        for root in roots.values():
            _train(root, procs)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    return roots


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_with_syncbn_train_the_weights_of_one_and_rank_0_alone_records_them(
    tmp_path: Path, started: list[subprocess.Popen]
) -> None:
    one, two = (_workspace(tmp_path / f"p{n}", n, n_train=128, epochs=1) for n in (1, 2))
    _train(one, started)
    out = _train(two, started)
    assert "launching 2 process(es)" in out and "global batch 32 (16 x 2 processes x 1 accumulation steps)" in out
    # 4 steps: the same weights up to float rounding (sums in another order); measured 5e-7.
    a, b = _state(one), _state(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    m1, m2 = (json.loads((r / paths.TRAIN_METRICS).read_text()) for r in (one, two))
    assert m2["best_val_loss"] == pytest.approx(m1["best_val_loss"], abs=1e-5)
    assert m2["best_val_accuracy"] == m1["best_val_accuracy"]
    # One run, written once: one history row per epoch, the layout in its tags.
    (run,) = _mlflow_runs(two)
    assert run.info.status == "FINISHED"
    assert run.data.tags["distributed.world_size"] == "2" and run.data.tags["train.global_batch"] == "32"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epoch/val_loss")
    assert [h.step for h in history] == [1]
    assert json.loads((two / paths.RUN_FILE).read_text())["run_id"] == run.info.run_id


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_keep_the_weight_average_of_one(tmp_path: Path, started: list[subprocess.Popen]) -> None:
    """train.ema (lookahead) under DDP: each process averages the same weights; rank 0 saves one process's."""
    roots = [_workspace(tmp_path / f"p{n}", n, n_train=128, epochs=1) for n in (1, 2)]
    for root in roots:
        raw = yaml.safe_load((root / paths.PARAMS).read_text())
        raw["train"]["ema"] = {"decay": 0.5, "every": 2, "warmup": False, "lookahead": True}
        (root / paths.PARAMS).write_text(yaml.safe_dump(raw))
        _train(root, started)
    a, b = (load_checkpoint(root / paths.LAST_CHECKPOINT) for root in roots)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 2  # 4 steps of the global batch
    for key in ("model", "training_model"):
        x, y = (a[key], b[key]) if key == "model" else (a["ema"][key], b["ema"][key])
        for k in x:
            torch.testing.assert_close(y[k], x[k], rtol=0, atol=1e-5, msg=f"{key} {k}")
    m1, m2 = (json.loads((root / paths.TRAIN_METRICS).read_text()) for root in roots)
    assert m2["best_val_accuracy"] == m1["best_val_accuracy"]


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
    raise AssertionError(f"no worker with rank {rank}")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_rank_killed_mid_epoch_restarts_the_group_which_resumes_and_ends_bit_for_bit_the_same(
    tmp_path: Path, started: list[subprocess.Popen], reference: dict[int, Path]
) -> None:
    root = _workspace(tmp_path, 2, max_restarts=1)
    p = _start(root, started)
    _wait_for_epoch(root, 1, p)
    run_id = json.loads((root / paths.RUN_FILE).read_text())["run_id"]
    os.kill(_rank_pid(p, 1), signal.SIGKILL)
    out = _finish(p)
    assert "resuming from models/last.pt at epoch" in out
    a, b = _state(reference[2]), _state(root)
    assert all(torch.equal(a[k], b[k]) for k in a), "the restarted run differs from the uninterrupted one"
    (run,) = _mlflow_runs(root)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    steps = [h.step for h in mlflow.MlflowClient().get_metric_history(run_id, "epoch/val_loss")]
    assert sorted(set(steps)) == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_a_checkpoint_saved_by_n_processes_resumes_in_m(
    tmp_path: Path, started: list[subprocess.Popen], reference: dict[int, Path], before: int, after: int
) -> None:
    root = _workspace(tmp_path, before)
    p = _start(root, started)
    _wait_for_epoch(root, 1, p)
    os.killpg(p.pid, signal.SIGKILL)  # the launcher: its processes, in sessions of their own, get SIGTERM
    p.wait(timeout=30)
    _wait_for_lock_free(root)
    resumed_at = load_checkpoint(root / paths.LAST_CHECKPOINT)["epoch"]
    assert resumed_at < EPOCHS
    _workspace_params(root, after)
    out = _train(root, started)
    assert f"resuming from models/last.pt at epoch {resumed_at}/{EPOCHS}" in out
    ckpt = load_checkpoint(root / paths.LAST_CHECKPOINT)
    ref_before, ref_after = (load_checkpoint(reference[n] / paths.LAST_CHECKPOINT)["history"] for n in (before, after))
    history = ckpt["history"]
    assert ckpt["epoch"] == EPOCHS and len(history) == EPOCHS
    # The epochs before the interruption are the N-process run's; the schedule went on at the right step.
    learned = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")  # not the timings
    assert [{k: h[k] for k in learned} for h in history[:resumed_at]] == [
        {k: h[k] for k in learned} for h in ref_before[:resumed_at]
    ]
    assert [h["lr"] for h in history] == [h["lr"] for h in ref_after]
    # After it, the M-process optimisation. Not bit for bit: this tiny network amplifies rounding (one
    # process with 1 or 2 threads ends 4e-3 apart after 16 steps), so the figures, not the weights, compare.
    assert history[-1]["val_loss"] == pytest.approx(ref_after[-1]["val_loss"], abs=0.05)
    (run,) = _mlflow_runs(root)
    assert run.info.status == "FINISHED" and run.data.tags["distributed.world_size"] == str(after)


def _wait_for_lock_free(root: Path) -> None:
    """Until no process holds the workspace's training locks (the killed launcher's processes ended)."""
    for name in (".train.lock", ".train.writer.lock"):
        with waiting_lock(root / paths.MODELS / name, "the killed launcher's processes", timeout=60):
            pass


def test_a_second_group_is_refused_by_its_launcher_before_any_process_starts(
    tmp_path: Path, started: list[subprocess.Popen]
) -> None:
    root = _workspace(tmp_path, 2)
    hold = (
        "import time\n"
        "from resnet.lock import exclusive_lock\n"
        "with exclusive_lock('models/.train.lock', 'training'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold], cwd=root, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    started.append(holder)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    p = _start(root, started)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 1, out
    # One line, the refusal: no process started (nor restarted max_restarts times), nothing written.
    (line,) = out.strip().splitlines()
    assert f"models/.train.lock is held by pid {holder.pid}" in line, line
    assert sorted(f.name for f in (root / paths.MODELS).iterdir()) == [".train.lock"]
    holder.stdout.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_sigterm_to_the_launcher_stops_every_process_like_ctrl_c_and_a_rerun_resumes(
    tmp_path: Path, started: list[subprocess.Popen]
) -> None:
    root = _workspace(tmp_path, 2)
    p = _start(root, started)
    _wait_for_epoch(root, 1, p)
    p.send_signal(signal.SIGTERM)  # the launcher alone, as a CI runner's timeout or `kill` would
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 130, out[-3000:]
    assert "interrupted; rerun the stage (dvc repro) to resume from models/last.pt" in out
    _wait_for_lock_free(root)
    (run,) = _mlflow_runs(root)
    assert run.info.status == "KILLED"
    out = _train(root, started)
    assert "resuming from models/last.pt at epoch" in out
    (again,) = _mlflow_runs(root)
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"


def _workspace_params(root: Path, nproc: int) -> None:
    """params.yaml of ``root`` changed to ``nproc`` processes on one node, the global batch kept."""
    raw = yaml.safe_load((root / paths.PARAMS).read_text())
    raw["distributed"]["nproc_per_node"] = nproc
    raw["train"]["batch_size"] = GLOBAL_BATCH // nproc
    (root / paths.PARAMS).write_text(yaml.safe_dump(raw))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_nodes_on_loopback_train_what_two_processes_on_one_node_train(
    tmp_path: Path, started: list[subprocess.Popen], reference: dict[int, Path]
) -> None:
    # Two machines sharing one workspace (a cluster's shared file system), each running the stage.
    root = _workspace(tmp_path, 1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{_free_port()}")
    nodes = [_start(root, started) for _ in range(2)]
    outs = [_finish(p) for p in nodes]
    assert all("launching 1 process(es) on this node, 2 node(s)" in o for o in outs)
    a, b = _state(reference[2]), _state(root)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(_mlflow_runs(root)) == 1


@pytest.mark.slow
@pytest.mark.timeout(200)
@pytest.mark.parametrize("peer", ["missing", "silent"])
def test_a_rendezvous_that_cannot_happen_fails_in_bounded_time_naming_the_endpoint(
    tmp_path: Path, started: list[subprocess.Popen], peer: str
) -> None:
    port = _free_port()
    listener = socket.socket()
    if peer == "silent":  # another program holds the port: it accepts connections and never answers
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(8)
    root = _workspace(tmp_path, 1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{port}", timeout=5)
    t0 = time.monotonic()
    p = _start(root, started)
    try:
        out, _ = p.communicate(timeout=120)
    finally:
        listener.close()
    assert p.returncode == 1
    assert time.monotonic() - t0 < 60  # 5 s to meet, 2 x 5 + 10 s at most for a silent peer, plus start-up
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert errors and f"127.0.0.1:{port}" in errors[-1] and "distributed.rdzv_endpoint" in errors[-1], out[-3000:]
    assert not (root / paths.RUN_FILE).exists() and not (root / paths.LAST_CHECKPOINT).exists()


def test_one_process_never_touches_torch_distributed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (one process) trains in the stage's own process, with no process group."""
    write_stage_inputs(tmp_path, {"epochs": 1})
    monkeypatch.chdir(tmp_path)
    launched = []
    monkeypatch.setattr("resnet.distributed.launch", lambda *a: launched.append(a))
    assert load_stage_module().main() == 0
    assert not launched and not torch.distributed.is_initialized()
    assert load_checkpoint(paths.LAST_CHECKPOINT)["epoch"] == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_may_launch_the_stage_itself_when_params_yaml_says_what_it_starts(
    tmp_path: Path, started: list[subprocess.Popen]
) -> None:
    root = _workspace(tmp_path, 1, n_train=128, epochs=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(STAGE)]
    p = subprocess.run(torchrun, cwd=root, capture_output=True, text=True, timeout=240)
    assert p.returncode != 0
    assert "launched as 2 processes (2 on this node) but params.yaml says distributed.nnodes 1 x nproc_per_node 1" in (
        p.stdout + p.stderr
    )
    assert not (root / paths.LAST_CHECKPOINT).exists()
    _workspace_params(root, 2)
    p = subprocess.run(torchrun, cwd=root, capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert "global batch 32 (16 x 2 processes" in p.stdout + p.stderr
    assert load_checkpoint(root / paths.LAST_CHECKPOINT)["epoch"] == 1


def test_the_slurm_script_is_valid_bash_and_runs_the_train_stage_under_torchrun_on_every_node() -> None:
    script = ROOT / "deploy" / "slurm" / "train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    assert sbatch["ntasks-per-node"] == "1"  # one torchrun (elastic agent) per node
    command = re.search(r"^srun [^\n]*torchrun((?:[^\n]*\\\n)*[^\n]*)", text, re.M)
    assert command, "no srun ... torchrun command"
    args = command.group(0).replace("\\\n", " ").split()
    assert args[-1] == "stages/train.py" and "--rdzv-backend=c10d" in args
    assert any(a.startswith("--nnodes=") for a in args) and any(a.startswith("--nproc-per-node=") for a in args)
    # The rest of the pipeline runs after it, with the training recorded as the train stage.
    assert text.index("dvc commit --force train") > text.index("stages/train.py")


def test_the_pytorchjob_manifest_is_valid_yaml_and_runs_the_train_stage_under_torchrun() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "pytorchjob.yaml").read_text())
    assert doc["apiVersion"] == "kubeflow.org/v1" and doc["kind"] == "PyTorchJob"
    spec = doc["spec"]
    replicas = spec["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    nodes = sum(r["replicas"] for r in replicas.values())
    assert spec["elasticPolicy"]["minReplicas"] == spec["elasticPolicy"]["maxReplicas"] == nodes
    assert spec["elasticPolicy"]["rdzvBackend"] == "c10d"
    for r in replicas.values():
        pod = r["template"]["spec"]
        (container,) = pod["containers"]
        assert container["command"] == ["torchrun", "stages/train.py"]
        assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == spec["nprocPerNode"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["workspace"] == container["workingDir"]
        claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["volumes"]}
        assert claims["workspace"]["claimName"]
