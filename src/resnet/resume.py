"""What makes an interrupted training continue exactly: the run's state, RNG states, a fingerprint.

A training checkpoint (models/last.pt) holds, besides the weights and what
:func:`resnet.checkpoint.load_checkpoint` checks:

* :class:`TrainState`, the run's progress (epochs done, history, best epoch, early
  stopping counters, the caller's ``extra``), written by :meth:`TrainState.to_checkpoint`
  and read back by :meth:`TrainState.from_checkpoint`;
* optimizer, scheduler and scaler state dicts, and every RNG (:func:`rng_state`);
* with ``train.ema`` on, ``model`` is the average and ``ema`` the training weights and
  the average's counters (:mod:`resnet.ema`);
* the :func:`fingerprint` of the recipe and the data: a resume must match it.

A resumed run on CPU reproduces an uninterrupted one bit for bit: the loader derives
each epoch's order and augmentations from ``(seed, epoch)``, and the checkpoint
restores everything else. :func:`find_resume_checkpoint` decides whether models/last.pt
is a run to continue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet.checkpoint import CheckpointError, load_checkpoint
from resnet.config import ConfigError, Params, parse_params
from resnet.utils import flatten

__all__ = [
    "RUNTIME_KEYS",
    "RESUME_KEYS",
    "code_digest",
    "TrainState",
    "data_identity",
    "fingerprint",
    "rng_state",
    "set_rng_state",
    "find_resume_checkpoint",
]

log = logging.getLogger(__name__)

#: train keys that say where and how fast to run, not what to train: changing them keeps a resume valid.
RUNTIME_KEYS = ("device", "num_threads", "compile")


@dataclass
class TrainState:
    """A run's progress: everything of it that changes from epoch to epoch, besides weights and optimizer."""

    epoch: int = 0  # epochs completed
    history: list[dict[str, float]] = field(default_factory=list)  # one metrics dict per epoch
    best_metric: float | None = None  # best value of train.early_stopping_metric so far (None: no validation yet)
    best_epoch: int = 0  # the epoch of that value, the one in best.pt (1-based)
    bad_evals: int = 0  # validations since the last improvement
    stopped_early: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's, e.g. the MLflow run id

    def record(self, metrics: dict[str, float]) -> None:
        """Close an epoch: append its metrics (``metrics["epoch"]`` is 1-based) to the history."""
        self.history.append(metrics)
        self.epoch = int(metrics["epoch"])

    def to_checkpoint(self) -> dict[str, Any]:
        """The checkpoint keys of this state (numbers, lists and dicts: weights_only loading accepts them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> TrainState:
        """The state a checkpoint written with :meth:`to_checkpoint` holds."""
        return cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls)})


#: What a checkpoint needs beyond load_checkpoint's keys to resume training.
RESUME_KEYS = (
    *(f.name for f in dataclasses.fields(TrainState)),
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "fingerprint",
    "params",
)


def data_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The facts of the prepared data a resume must share: the source archive's hash and the split counts."""
    return {"source_sha256": meta.get("source_sha256"), "counts": meta.get("counts")}


def _recipe(params: Params) -> dict[str, Any]:
    """What a resume must share: the recipe with the global batch, not how it is split into
    processes and micro-batches, so a checkpoint saved by N processes resumes in M (with
    train.batch_size set to keep the global batch). Without distributed.sync_batchnorm the
    BatchNorm statistics then come from other shares of the batch, as from another device's
    arithmetic: the run goes on, not bit for bit."""
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in (*RUNTIME_KEYS, "batch_size")}
    if params.train.ema.decay == 0:  # off: the recipe of checkpoints from before train.ema, which resume as they did
        del train["ema"]
    return {"model": dataclasses.asdict(params.model), "train": train, "global_batch": params.global_batch}


def fingerprint(params: Params, meta: dict[str, Any]) -> str:
    """Hash of the model and train params (less RUNTIME_KEYS) and the data's identity; a resume must match it."""
    blob = {**_recipe(params), "data": data_identity(meta)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict[str, Any]:
    """Every RNG, as tensors/lists/ints only (weights_only loading rejects numpy arrays)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "python": [py_version, list(py_state), py_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs :func:`rng_state` saved."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))


def _explain_mismatch(ckpt: dict[str, Any], params: Params, meta: dict[str, Any]) -> str:
    """Which params or data facts differ between a checkpoint and this run, for the log."""
    try:
        old = flatten(_recipe(parse_params(ckpt["params"])))
    except (ConfigError, TypeError):  # params of an older version of this code
        old = flatten({k: ckpt["params"].get(k, {}) for k in ("model", "train")})
    new = flatten(_recipe(params))
    changed = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k)]
    if ckpt.get("data_identity") != data_identity(meta):
        changed.append("the prepared data (source_sha256 or counts)")
    return "; ".join(changed) or "the fingerprint"


def code_digest(*files: str | Path) -> str:
    """Hash of the ``resnet`` package's source and ``files`` (the stage script): which code trained."""
    package = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")) + [Path(f) for f in files]:
        h.update(str(path.relative_to(package) if path.is_relative_to(package) else path.name).encode())
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:16]


def find_resume_checkpoint(
    params: Params, meta: dict[str, Any], out_dir: str | Path, code: str | None = None
) -> dict[str, Any] | None:
    """The checkpoint ``out_dir/last.pt`` to go on from, for this very recipe and data, or None.

    An unfinished one is resumed. A finished one (all epochs, or stopped early) is
    returned too when ``code`` equals the :func:`code_digest` it was trained with
    (``extra.code``): the training is complete, and a stage killed after it (before DVC
    recorded it) or forced to rerun finishes without training again. None (a fresh start,
    with a log line saying why) when there is no last.pt, when it belongs to other
    params or data, or when a finished one came from other code. A corrupt, truncated or
    foreign last.pt raises CheckpointError: silently starting over would throw away the
    work it was meant to keep.
    """
    path = Path(out_dir) / "last.pt"
    if not path.exists():
        log.info("no %s: starting fresh", path)
        return None
    ckpt = load_checkpoint(path)
    missing = [k for k in RESUME_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} cannot be resumed (missing {missing}); delete it to start fresh")
    if ckpt["fingerprint"] != fingerprint(params, meta):
        log.info("%s is from another recipe or data (%s): starting fresh", path, _explain_mismatch(ckpt, params, meta))
        return None
    if ckpt["stopped_early"] or ckpt["epoch"] >= params.train.epochs:
        how = "stopped early" if ckpt["stopped_early"] else "finished"
        if code is not None and (ckpt.get("extra") or {}).get("code") == code:
            log.info(
                "%s holds the %s training of this recipe, data and code (epoch %d/%d): not training again "
                "(delete it to retrain)",
                path,
                how,
                ckpt["epoch"],
                params.train.epochs,
            )
            return ckpt
        log.info("%s is a %s run (epoch %d/%d): starting fresh", path, how, ckpt["epoch"], params.train.epochs)
        return None
    log.info("resuming from %s at epoch %d/%d", path, ckpt["epoch"], params.train.epochs)
    return ckpt
