"""Device selection and the few device services the engine and benchmarks need.

`auto` picks npu (torch_npu importable *and* a device present) > cuda > cpu. torch_npu
installed without the CANN toolkit raises RuntimeError/OSError on import, so the guard
catches Exception, not only ImportError.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from dataclasses import dataclass

import torch

from common.errors import RecipeError

DEVICE_TYPES = ("auto", "npu", "cuda", "cpu")


@functools.cache
def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except Exception:
        return False


@functools.cache
def cpu_has_native_bf16() -> bool:
    """bf16 matmuls are fast only with AVX512-BF16 or AMX; elsewhere they are emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _available(kind: str) -> bool:
    return {"npu": npu_available, "cuda": torch.cuda.is_available, "cpu": lambda: True}[kind]()


@dataclass(frozen=True)
class Device:
    type: str  # "cpu" | "cuda" | "npu"

    @property
    def torch(self) -> torch.device:
        return torch.device(self.type)

    @property
    def default_dtype(self) -> torch.dtype:
        if self.type == "cpu":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16

    def _module(self):
        return getattr(torch, self.type)

    def synchronize(self) -> None:
        if self.type != "cpu":
            self._module().synchronize()

    def reset_peak_memory(self) -> None:
        if self.type != "cpu":
            self._module().reset_peak_memory_stats()

    def peak_memory_bytes(self) -> int:
        """Accelerators: peak allocated device memory. CPU: the process's peak RSS (no reset)."""
        if self.type != "cpu":
            return int(self._module().max_memory_allocated())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def describe(self) -> str:
        if self.type == "cuda":
            return torch.cuda.get_device_name()
        if self.type == "npu":
            return torch.npu.get_device_name()
        return f"cpu ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def select_device(name: str = "auto") -> Device:
    if name not in DEVICE_TYPES:
        raise RecipeError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_TYPES)}")
    if name == "auto":
        return Device(next(k for k in ("npu", "cuda", "cpu") if _available(k)))
    if not _available(name):
        raise RecipeError(f"device {name!r} is not available on this machine; use hardware=auto")
    return Device(name)


def resolve_dtype(name: str, device: Device) -> torch.dtype:
    """`auto` -> the device default; otherwise a torch dtype name such as bfloat16 or float32."""
    if name == "auto":
        return device.default_dtype
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RecipeError(
            f"unknown model.dtype {name!r}; choose auto, bfloat16, float16 or float32"
        )
    return dtype


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
