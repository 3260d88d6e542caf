"""DVC stage `train`: data/prepared -> models/{best,last}.pt, models/run.json, metrics and history.

Rerunning after an interruption resumes from models/last.pt when it belongs to the
same params and data; a training that had finished with the same code too is not
redone, only its outputs and MLflow run completed (resnet.resume.find_resume_checkpoint).
With distributed.nproc_per_node or nnodes above 1 it launches itself in several
processes under torch's elastic launcher; torchrun or srun may start it too
(resnet.distributed, docs/distributed.md). Rank 0 alone writes files and MLflow.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from resnet import distributed, paths, tracking
from resnet.config import Params
from resnet.data.store import load_meta, load_split
from resnet.distributed import World
from resnet.loader import DeviceLoader
from resnet.lock import exclusive_lock, waiting_lock
from resnet.resume import code_digest, find_resume_checkpoint
from resnet.runtime import configure_torch, cpu_summary, keep_freed_memory
from resnet.stage import run_stage
from resnet.training import HISTORY_FIELDS, TrainResult, fit
from resnet.utils import atomic_path, write_json

log = logging.getLogger("stages.train")

# Not pipeline files (neither DVC nor git tracks them). TRAIN_LOCK: held by whatever started
# a training (refuses a second one at once); WRITER_LOCK: held by the process that writes
# models/ and MLflow, waited for, since a group whose launcher was killed outright (SIGKILL)
# releases TRAIN_LOCK while its rank 0, ended by SIGTERM, may still be recording the interruption.
TRAIN_LOCK = paths.MODELS / ".train.lock"
WRITER_LOCK = paths.MODELS / ".train.writer.lock"


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(history)


def _summary(result: TrainResult) -> dict[str, Any]:
    """metrics/train.json: the best checkpoint's validation numbers and the last epoch's."""
    best = next(h for h in result.history if h["epoch"] == result.best_epoch)
    last = result.history[-1]
    return {
        "epochs_completed": result.epochs_completed,
        "best_epoch": result.best_epoch,
        "best_val_accuracy": best["val_accuracy"],
        "best_val_loss": best["val_loss"],
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "final_val_loss": last.get("val_loss"),
        "final_val_accuracy": last.get("val_accuracy"),
        "train_seconds": round(result.train_seconds, 2),
        "images_per_sec": round(result.images_per_sec, 1),
        "precision": result.precision,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from,
    }


# Set by a launcher that holds TRAIN_LOCK for the group it starts on its node.
LOCK_HELD_ENV = "RESNET_TRAIN_LOCK_HELD"


def _lock() -> contextlib.AbstractContextManager[None]:
    return exclusive_lock(TRAIN_LOCK, "training")


def run(params: Params) -> None:
    d = params.distributed
    if distributed.needs_launcher(d):
        # Several processes asked for: this one becomes torchrun's elastic agent and starts
        # them, each running this very script (resnet.distributed). On one node it holds the
        # lock itself, so a refused second training starts no process (nor restarts them).
        with _lock() if d.nnodes == 1 else contextlib.nullcontext():
            if d.nnodes == 1:
                os.environ[LOCK_HELD_ENV] = str(os.getpid())
            distributed.launch(d, [__file__])
        return
    if not distributed.launched():
        # One process: refused before any work.
        with _lock():
            _run_process(params)
        return
    _run_process(params)


def _run_process(params: Params) -> None:
    """One process of the training (alone, or one rank of a group), from device setup to teardown."""
    d = params.distributed
    # Process-wide, so here: a process of a group ends (as on Ctrl-C) when its launcher is killed.
    distributed.end_with_launcher()
    if not World.from_env().is_main:
        # Rank 0 speaks for the group: the others log warnings and errors only, with no bars.
        logging.getLogger().setLevel(logging.WARNING)
        os.environ["RESNET_NO_PROGRESS"] = "1"
    device = configure_torch(params.train, processes_on_node=World.from_env().local_size)
    world, device = distributed.setup(d, device)
    try:
        if device.type == "cpu":
            # Process-wide, so here and not in the package: CPU steps then reuse freed activation memory.
            keep_freed_memory()
        with contextlib.ExitStack() as locks:
            if world.is_main:  # the others write nothing
                if distributed.launched() and LOCK_HELD_ENV not in os.environ:
                    # A group no launcher of ours locked for (several nodes, torchrun, srun).
                    locks.enter_context(_lock())
                locks.enter_context(waiting_lock(WRITER_LOCK, "the previous training's last writes", d.timeout))
            _train(params, world, device)
    finally:
        distributed.teardown()


def _loaders(params: Params, meta: dict[str, Any], world: World, device: torch.device) -> tuple[DeviceLoader, ...]:
    """This process's loaders: its share of every global batch, and its share of the validation split."""
    tp = params.train
    (train_x, train_y), (val_x, val_y) = load_split(paths.PREPARED, "train"), load_split(paths.PREPARED, "val")
    norm = {"mean": meta["mean"], "std": meta["std"], "device": device, "channels_last": tp.channels_last}
    norm["max_resident_bytes"] = params.data.max_resident_bytes
    share = {"rank": world.rank, "world_size": world.size, "accumulation": params.distributed.accumulation_steps}
    train = DeviceLoader(train_x, train_y, tp.batch_size, train=True, augment=tp.augment, seed=tp.seed, **norm, **share)
    part = distributed.shard(len(val_y), world)
    return train, DeviceLoader(val_x[part], val_y[part], tp.batch_size, train=False, **norm)


def _train(params: Params, world: World, device: torch.device) -> None:
    meta = load_meta(paths.PREPARED)
    train_loader, val_loader = _loaders(params, meta, world, device)
    code = code_digest(__file__)
    # Rank 0 decides (it alone may see models/ on a machine of its own) and hands the checkpoint to all.
    resume = distributed.broadcast_object(
        find_resume_checkpoint(params, meta, paths.MODELS, code) if world.is_main else None
    )
    if not world.is_main:
        fit(params, meta, train_loader, val_loader, paths.MODELS, resume=resume, world=world)
        return

    # A resumed training logs into the MLflow run of the interrupted one.
    run_id = (resume or {}).get("extra", {}).get("run_id")
    with tracking.start_run(params, meta, device, paths.RUN_FILE, resume_run_id=run_id) as mlrun:
        mlrun.set_tags(
            {
                "distributed.world_size": world.size,
                "train.global_batch": train_loader.global_batch,
                "train.batch_size_per_process": params.train.batch_size,
            }
        )
        if resume and resume.get("history"):
            # The epoch saved just before the interruption may not have reached MLflow.
            last = resume["history"][-1]
            mlrun.log_epoch(int(last["epoch"]), last)
        result = fit(
            params,
            meta,
            train_loader,
            val_loader,
            paths.MODELS,
            resume=resume,
            extra={"run_id": mlrun.run_id, "code": code},
            on_epoch=mlrun.log_epoch,
            world=world,
        )
        # The device and CPU flags as the run's "device" and "cpu.flags" tags describe them, so they agree:
        # with "precision", what train.precision auto decided on.
        summary = {
            **_summary(result),
            "device": tracking.device_description(device),
            "cpu.flags": cpu_summary()["cpu.flags"],
        }
        write_json(paths.TRAIN_METRICS, summary)
        _write_history(paths.TRAIN_HISTORY, result.history)
        mlrun.log_results(summary)
        mlrun.log_artifacts([paths.TRAIN_METRICS, paths.TRAIN_HISTORY], artifact_path="train")
    log.info(
        "trained %d epochs: best %s %.4f at epoch %d -> %s",
        result.epochs_completed,
        result.metric_name,
        result.best_metric,
        result.best_epoch,
        result.best_path,
    )


def main() -> int:
    return run_stage(run, on_interrupt=f"rerun the stage (dvc repro) to resume from {paths.LAST_CHECKPOINT}")


if __name__ == "__main__":
    sys.exit(main())
