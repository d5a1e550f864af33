"""What the machine can do, measured or read from the OS: native bf16, streaming bandwidth."""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # select imports this module
    from common.device.select import Device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def measure_read_bandwidth(device: Device, nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Streaming-read bandwidth in bytes/s: the best of a few full reductions over a buffer."""
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device.torch)
    best = float("inf")
    for _ in range(repeats):
        device.synchronize()
        t0 = time.perf_counter()
        x.sum()
        device.synchronize()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best
