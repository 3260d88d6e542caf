"""Where and how fast a run computes: threads, device defaults, the allocator, mixed precision.

Apart from the precision, nothing here changes what a model learns (train.device,
num_threads and compile are the params that may change between a run and its resume).
Training and evaluation both take their precision from :func:`resolve_precision` and
:func:`autocast`; training stores the precision it resolved in its checkpoints, so
validate and evaluate compute as it did, on whatever machine.

* Mixed precision (train.precision): ``auto`` picks bf16 autocast on GPUs that have it
  (else fp16), and on CPUs with native bf16 instructions (flags ``avx512_bf16`` or
  ``amx_bf16`` in /proc/cpuinfo: resnet20 trained 1.35x faster than in fp32 on such an
  AVX-512 EPYC, issue 17); elsewhere fp32, the fastest on AVX2-only CPUs, where bf16 is
  emulated, and on machines without /proc/cpuinfo (macOS). An explicit ``bf16`` is
  honoured on any CPU (with a warning where it is emulated); ``fp16`` on a CPU runs fp32,
  with a warning. :func:`cpu_summary` gives the CPU's model and flags for the run's tags.
* :func:`keep_freed_memory` is process-wide (glibc's malloc), so only an entry point
  (the train stage, a benchmark) calls it; library functions never do.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from pathlib import Path

import torch

from resnet.config import TrainParams
from resnet.utils import resolve_device

__all__ = [
    "configure_torch",
    "keep_freed_memory",
    "cpu_info",
    "native_bf16",
    "cpu_summary",
    "resolve_precision",
    "autocast",
]

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
    cpu = cpu_summary()
    log.info(
        "device %s, %d CPU threads (%s; flags %s)", device, torch.get_num_threads(), cpu["cpu.model"], cpu["cpu.flags"]
    )
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


#: CPU flags that matter for training speed, logged with every run (as /proc/cpuinfo names them).
SPEED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, frozenset[str]]:
    """(model name, instruction-set flags) of this machine's CPU, from ``cpuinfo`` (Linux's format).

    x86 lists the flags as ``flags``, ARM as ``Features``; the first CPU's are taken. Where
    the file is missing (macOS, Windows) the flags are empty, so ``auto`` means fp32, and
    the model is what :func:`platform.processor` says, or "unknown".
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:  # not Linux (macOS, Windows): no flags, so auto means fp32
        return platform.processor() or "unknown", frozenset()
    model, flags = "unknown", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / ARM
            flags = frozenset(value.split())
    return model, flags


def native_bf16(flags: frozenset[str]) -> bool:
    """Whether a CPU with these flags computes bf16 in hardware (AVX512-BF16 or AMX-BF16)."""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_summary() -> dict[str, str]:
    """The CPU's model and which of :data:`SPEED_FLAGS` it has, as the run's ``cpu.*`` tags.

    ``cpu.flags`` is ``none`` for a CPU with none of them and ``unknown`` where the flags
    cannot be read (no /proc/cpuinfo).
    """
    model, flags = cpu_info()
    speed = " ".join(f for f in SPEED_FLAGS if f in flags)
    return {"cpu.model": model, "cpu.flags": speed or ("none" if flags else "unknown")}


def resolve_precision(requested: str, device: torch.device, *, warn: bool = True) -> str:
    """The precision to compute in (fp32, bf16 or fp16) for train.precision ``requested`` on ``device``.

    The rules are the module's notes. A deterministic function of ``requested``, the device
    and the CPU's flags, so the same params resolve alike on the same machine. ``warn``
    False: the same answer without the warnings (for a second look, as the MLflow tags take).
    """
    if requested == "fp32":
        return "fp32"
    if device.type != "cuda":
        return _cpu_precision(requested, warn)
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        if warn:
            log.warning("this GPU does not support bf16; using fp16 (with a GradScaler when training) instead")
        return "fp16"
    return requested


def _cpu_precision(requested: str, warn: bool) -> str:
    native = native_bf16(cpu_info()[1])
    if requested == "auto":
        return "bf16" if native else "fp32"
    if requested == "bf16":
        if not native and warn:
            log.warning(
                "precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so bf16 autocast is "
                "emulated and slower than fp32 (train.precision auto picks fp32 on such a CPU)"
            )
        return "bf16"
    if warn:
        log.warning("precision %s needs a CUDA GPU; running in fp32 on the CPU", requested)
    return "fp32"


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """bf16/fp16 autocast on ``device`` for a precision from :func:`resolve_precision`; a no-op for fp32."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=precision != "fp32")
