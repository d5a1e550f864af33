"""What the machine can do, measured or read from the OS: CPU model and caches, native bf16,
streaming bandwidth over a buffer of a given size."""

from __future__ import annotations

import functools
import platform
import time
from pathlib import Path
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


CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


@functools.cache
def cpu_info() -> str:
    """The CPU model and its data caches as one line, e.g. "AMD EPYC (L1d 32 KiB, L2 1 MiB,
    L3 32 MiB)": kernel thresholds and bandwidth depend on them, so every table names them.
    Linux only (/proc/cpuinfo, sysfs, as lscpu reads them); elsewhere the platform's name."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                model,
            )
    except OSError:
        pass
    caches = []
    for index in sorted(CACHE_DIR.glob("index*")):
        try:
            level, kind, size = (
                (index / name).read_text().strip() for name in ("level", "type", "size")
            )
            if kind != "Instruction":
                caches.append(f"L{level}{'d' if kind == 'Data' else ''} {_kib(size)}")
        except (OSError, ValueError, KeyError, IndexError):
            continue  # an unreadable or unfamiliar entry: leave it out, keep the rest
    return f"{model} ({', '.join(caches)})" if caches else model


def _kib(size: str) -> str:
    """A sysfs cache size ("32K", "32768K", "1M") in the largest whole binary unit."""
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    kib = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size) // 1024
    if kib >= 1024 and kib % 1024 == 0:
        return f"{kib // 1024} MiB"
    return f"{kib} KiB"


def measure_read_bandwidth(device: Device, nbytes: int, min_seconds: float = 0.2) -> float:
    """Streaming-read bandwidth in bytes/s over a buffer of `nbytes`: the best of repeated
    timed samples (at least 5, for at least min_seconds), each a few full reductions so that
    a small buffer's sample reads ~64 MB and call overhead does not count. Give the size a
    decode step reads: a buffer that fits a cache level reads at that cache's speed, as the
    decode step does; a fixed large buffer would understate it (a 268 MB model fits a
    480 MB L3)."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device.torch)
    per_sample = max(1, (64 << 20) // x.nbytes)
    best, spent, n = float("inf"), 0.0, 0
    while n < 5 or (spent < min_seconds and n < 10_000):
        device.synchronize()
        t0 = time.perf_counter()
        for _ in range(per_sample):
            x.sum()
        device.synchronize()
        dt = time.perf_counter() - t0
        best, spent, n = min(best, dt), spent + dt, n + 1
    return per_sample * x.nbytes / best
