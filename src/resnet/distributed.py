"""Several processes training one model: torch.distributed's DistributedDataParallel, started by its elastic launcher.

The train stage is one entry point for every case:

* ``distributed.nproc_per_node`` and ``nnodes`` 1: one process, torch.distributed untouched.
* more processes, started by ``dvc repro`` (or ``python stages/train.py``): the stage sees
  it was not launched (no ``LOCAL_RANK`` in its environment) and becomes the elastic agent
  (:func:`launch`, torchrun's own engine: c10d rendezvous, worker monitoring, restarts),
  which starts the processes that train;
* started by ``torchrun`` or ``srun`` directly on a cluster: the environment already says
  which process this is, and :func:`setup` joins the group.

Each process trains on its own device (``cuda:<local rank>``, or the CPU with gloo),
reads its share of every global batch (:class:`resnet.loader.DeviceLoader`), and DDP
averages the gradients. Global rank 0 alone writes checkpoints, metrics and the MLflow
run; validation figures are sums over all processes (:func:`all_reduce_sum`), so they
equal a one-process evaluation. On several machines the workspace is one shared folder
(as a cluster's home or project file system, or a ReadWriteMany volume), since rank 0 may
land on any machine.

PyTorch's :class:`torch.nn.SyncBatchNorm` runs on GPUs only; :class:`CpuSyncBatchNorm`
does the same sums with differentiable all-reduces so gloo runs on CPU can sync too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from resnet.config import DistributedParams
from resnet.utils import PipelineError

__all__ = [
    "DistributedError",
    "World",
    "launched",
    "needs_launcher",
    "launch",
    "setup",
    "end_with_launcher",
    "teardown",
    "all_reduce_sum",
    "all_reduce_max",
    "broadcast_object",
    "shard",
    "CpuSyncBatchNorm",
    "convert_sync_batchnorm",
    "wrap_model",
]

log = logging.getLogger(__name__)

#: Shared by every node of a run; the store behind it lives only as long as the run.
RUN_ID = "resnet-train"


class DistributedError(PipelineError, RuntimeError):
    """The processes could not start, meet or finish together."""


@dataclass(frozen=True)
class World:
    """Which process this is among how many (torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that writes files and talks to MLflow."""
        return self.rank == 0

    @classmethod
    def from_env(cls) -> World:
        """This process's place, from the launcher's variables; one process alone when there are none."""
        if not launched():
            return cls()
        env = os.environ
        size = int(env["WORLD_SIZE"])
        return cls(int(env["RANK"]), int(env["LOCAL_RANK"]), size, int(env.get("LOCAL_WORLD_SIZE", size)))


def launched() -> bool:
    """True in a process started by torchrun, the elastic launcher or srun with torchrun's variables."""
    return all(k in os.environ for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"))


def needs_launcher(d: DistributedParams) -> bool:
    """More than one process asked for, and this is not one of them yet."""
    return d.world_size > 1 and not launched()


def _endpoint(d: DistributedParams) -> str:
    # One machine and no endpoint: torchrun --standalone's choice, a free port on this machine.
    return d.rdzv_endpoint or "localhost:0"


def launch(d: DistributedParams, argv: Sequence[str]) -> None:
    """Run ``python argv...`` in ``d.nproc_per_node`` processes on this node and wait for them all.

    The elastic agent meets the other nodes at ``d.rdzv_endpoint`` (c10d), restarts every
    process up to ``d.max_restarts`` times when one fails, and raises once they cannot
    finish. Raises :class:`DistributedError` naming the endpoint or the failed ranks.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    endpoint = _endpoint(d)
    config = LaunchConfig(
        min_nodes=d.nnodes,
        max_nodes=d.nnodes,
        nproc_per_node=d.nproc_per_node,
        run_id=RUN_ID,
        rdzv_backend="c10d",
        rdzv_endpoint=endpoint,
        # join_timeout: how long a node waits for the others; read_timeout: for the store to answer.
        rdzv_configs={"join_timeout": int(d.timeout), "read_timeout": int(d.timeout), "timeout": int(d.timeout)},
        max_restarts=d.max_restarts,
        monitor_interval=0.5,
        start_method="spawn",
    )
    log.info(
        "launching %d process(es) on this node, %d node(s), rendezvous %s, up to %d restart(s)",
        d.nproc_per_node,
        d.nnodes,
        endpoint,
        d.max_restarts,
    )
    # A peer that accepts connections but never answers (a black-holed host, another program on
    # the port) can block the rendezvous past every timeout of its own: give up on it here.
    stop = threading.Event()
    deadline = 2 * d.timeout + 10
    threading.Thread(target=_watchdog, args=(endpoint, deadline, stop), daemon=True).start()
    try:
        elastic_launch(config, entrypoint=sys.executable)(*argv)
    except SignalException as e:
        # Ctrl-C or SIGTERM: the agent has stopped the processes (each ended as on Ctrl-C).
        raise KeyboardInterrupt(str(e)) from None
    except ChildFailedError as e:
        ranks = ", ".join(f"rank {r} (exit code {f.exitcode})" for r, f in sorted(e.failures.items()))
        raise DistributedError(
            f"training failed in {ranks} after {d.max_restarts} restart(s) allowed; the cause is in its log above"
        ) from None
    except (RendezvousError, TimeoutError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(
            f"the processes could not meet at the rendezvous {endpoint} within {d.timeout:.0f} s ({first}); "
            "check distributed.rdzv_endpoint (a host:port every node reaches, free on the first node), "
            "distributed.nnodes, and that every node started"
        ) from None
    finally:
        stop.set()


def _has_children() -> bool:
    """Whether this process has a child now (True where /proc cannot tell: the watchdog then never fires)."""
    me = Path(f"/proc/{os.getpid()}/task")
    try:
        return any((task / "children").read_text().strip() for task in me.iterdir())
    except OSError:
        return True


def _watchdog(endpoint: str, deadline: float, stop: threading.Event) -> None:
    """Exit the launcher when no training process has run for ``deadline`` seconds (a hung rendezvous).

    Nothing has started then (no process, no file, no MLflow run), so ending the process at
    once loses nothing; its message names the endpoint.
    """
    idle_since = time.monotonic()
    while not stop.wait(0.5):
        if _has_children():
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > deadline:
            log.error(
                "no training process started in %.0f s: the rendezvous at %s does not answer; check "
                "distributed.rdzv_endpoint (a host:port every node reaches, and no other program on it)",
                deadline,
                endpoint,
            )
            logging.shutdown()
            os._exit(1)


def setup(d: DistributedParams, device: torch.device) -> tuple[World, torch.device]:
    """Join the process group when launched; return this process's :class:`World` and device.

    On CUDA each process takes the GPU of its local rank.
    """
    if not launched():
        return World(), device
    world = World.from_env()
    if world.size != d.world_size or world.local_size != d.nproc_per_node:
        # params.yaml stays the one record of the run (the global batch, the logged params, resuming).
        raise DistributedError(
            f"launched as {world.size} processes ({world.local_size} on this node) but params.yaml says "
            f"distributed.nnodes {d.nnodes} x nproc_per_node {d.nproc_per_node}; set them to what torchrun/srun "
            "starts, or let the stage launch itself (python stages/train.py)"
        )
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)
        device = torch.device("cuda", world.local_rank)
    backend = d.backend if d.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    try:
        _init_process_group(backend, world, timedelta(seconds=d.timeout))
    except (RuntimeError, TimeoutError, ValueError) as e:
        where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        raise DistributedError(
            f"rank {world.rank} could not join the {backend} process group at {where} within "
            f"{d.timeout:.0f} s: {str(e).splitlines()[0]}"
        ) from None
    log.info("rank %d of %d (local rank %d), %s on %s", world.rank, world.size, world.local_rank, backend, device)
    return world, device


def _init_process_group(backend: str, world: World, timeout: timedelta) -> None:
    """init_process_group, with keys of their own for each restart of the group.

    Under the elastic agent the processes meet in the agent's store, which outlives a
    restart: without a prefix per attempt, a restarted gloo group reads the addresses
    its dead predecessors left there and fails with "connection refused".
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "TORCHELASTIC_RESTART_COUNT" not in env:
        dist.init_process_group(backend, timeout=timeout)  # torchrun's other modes, srun: env:// as usual
        return
    base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world.size, is_master=False, timeout=timeout)
    store = dist.PrefixStore(f"resnet/attempt-{env['TORCHELASTIC_RESTART_COUNT']}", base)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=timeout)


def end_with_launcher() -> bool:
    """Have the kernel send this process SIGTERM when the elastic agent that started it dies.

    The agent starts each process in a session of its own, so a launcher killed outright
    (``kill -9``, an out-of-memory kill) would leave them training as orphans, holding the
    workspace's lock. SIGTERM ends a stage as Ctrl-C does. Process-wide (prctl): for the
    entry point to call. Returns whether it took effect (Linux, under an elastic agent).
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # it died before the request: nobody will send the signal
        os.kill(os.getpid(), signal.SIGTERM)
    return True


#: prctl option (linux/prctl.h): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def teardown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over every process, in place (unchanged with one process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """The largest ``t`` of every process, in place (unchanged with one process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (pickled; for a checkpoint or a run id)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(n: int, world: World) -> slice:
    """This process's contiguous share of ``n`` items (sizes differ by at most one)."""
    per, extra = divmod(n, world.size)
    start = world.rank * per + min(world.rank, extra)
    return slice(start, start + per + (world.rank < extra))


class _SumOverProcesses(torch.autograd.Function):
    """A tensor summed over the processes; the gradient of each share is the sum of the gradients.

    Every process's loss depends on the sum, so the gradient flowing back into one share
    adds up what every process's backward pass sends (the same sum again).
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process, on any device (gloo included).

    The mean and the variance are sums over the global batch, computed in two
    differentiable all-reduces, so the backward pass sums their gradients over the
    processes too, as one process with the whole batch would. Same state dict as
    BatchNorm2d: checkpoints load into either.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and _active()):
            return super().forward(x)
        c = x.shape[1]
        count = x.new_full((1,), x.numel() // c)
        sums = _SumOverProcesses.apply(torch.cat([x.sum((0, 2, 3)), count]))
        total = sums[-1]
        mean = sums[:c] / total
        centred = x - mean.view(1, c, 1, 1)
        var = _SumOverProcesses.apply((centred * centred).sum((0, 2, 3))) / total
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), total.detach())
        scale = torch.rsqrt(var + self.eps)
        y = centred * scale.view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y

    @torch.no_grad()
    def _update_running(self, mean: Tensor, var: Tensor, total: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = var * total / (total - 1).clamp_min(1)  # running_var is unbiased, as in BatchNorm2d
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased, factor)


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d of ``model`` made to sync: PyTorch's SyncBatchNorm on GPUs, :class:`CpuSyncBatchNorm` else."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            sync.load_state_dict(child.state_dict())
            sync.train(child.training)
            for p_new, p_old in zip(sync.parameters(), child.parameters(), strict=True):
                p_new.requires_grad_(p_old.requires_grad)
            setattr(model, name, sync.to(device))
        else:
            convert_sync_batchnorm(child, device)
    return model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there is a process group, else itself.

    DDP broadcasts rank 0's weights and buffers at construction and averages gradients
    during backward. ``find_unused_parameters`` stays off: every parameter that requires
    a gradient takes part in every step (a frozen backbone has none to find).
    """
    if not _active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
