"""Where and how fast a run computes: threads, device defaults, the allocator, mixed precision.

Nothing here changes what a model learns (train.device, num_threads and compile are
the params that may change between a run and its resume); training and evaluation
both take their precision from :func:`resolve_precision` and :func:`autocast`, so a
checkpoint is validated the same way in both.

* Mixed precision is a GPU feature here. On CPU, ``bf16``/``fp16`` log a warning
  and run in fp32: CPU autocast is slower than fp32 on CPUs without AMX, and fp32
  keeps CPU runs exact and resumable bit for bit.
* :func:`keep_freed_memory` is process-wide (glibc's malloc), so only an entry point
  (the train stage, a benchmark) calls it; library functions never do.
"""

from __future__ import annotations

import ctypes
import logging
import os

import torch

from resnet.config import TrainParams
from resnet.utils import resolve_device

__all__ = ["configure_torch", "keep_freed_memory", "resolve_precision", "autocast"]

log = logging.getLogger(__name__)

#: glibc mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def configure_torch(tp: TrainParams, processes_on_node: int = 1) -> torch.device:
    """Apply train.num_threads and fast GPU defaults; return the device train.device names.

    Call before building the loaders, which put the data on this device. The params
    are validated already (a 'cuda' device without a GPU was refused on loading). With
    ``processes_on_node`` training processes on this machine and train.num_threads 0,
    each CPU process takes its share of the cores (torchrun would leave each all of them,
    oversubscribing the CPU).
    """
    device = resolve_device(tp.device)
    if tp.num_threads > 0:
        torch.set_num_threads(tp.num_threads)
    elif processes_on_node > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_on_node))
    if device.type == "cuda":
        # Fixed input shapes: let cuDNN pick the fastest kernels; TF32 matmuls for fp32.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    log.info("device %s, %d CPU threads", device, torch.get_num_threads())
    return device


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the OS.

    A CPU training step allocates its activations afresh, megabytes each. glibc serves
    blocks that large with mmap and unmaps them on free, so every step page-faults its
    whole working set in again: about 4,500 page faults a step for resnet20 at batch 128
    here, and 2-5% of the step time. With both thresholds raised, freed blocks stay in
    the heap and the next step reuses them. Returns whether glibc took both settings:
    False, with the default allocator left as it is, where the C library is not glibc.

    Process-wide and irreversible: call it from an entry point (stages/train.py), not a library.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not Linux/glibc (macOS, musl): the default allocator stays
        return False
    return ok


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to compute in: bf16/fp16 autocast on CUDA only; elsewhere fp32, with a warning."""
    if requested == "fp32":
        return "fp32"
    if device.type != "cuda":
        log.warning("train.precision %s needs a CUDA GPU; running in fp32 on %s", requested, device)
        return "fp32"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        log.warning("this GPU does not support bf16; using fp16 (with a GradScaler when training) instead")
        return "fp16"
    return requested


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16/fp16 autocast on ``device`` for a precision from :func:`resolve_precision`; a no-op for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")
