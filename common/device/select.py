"""Device selection: `auto` picks npu (torch_npu importable *and* a device present) > cuda > cpu.

torch_npu installed without the CANN toolkit raises RuntimeError/OSError on import, so the guard
catches Exception, not only ImportError. A Device also knows its place in a distributed run:
rank, world size and process group (one process, rank 0 of 1, when nothing is distributed).
"""

from __future__ import annotations

import functools
import os
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from common.core.errors import RecipeError
from common.device.probe import cpu_has_native_bf16

DEVICE_TYPES = ("auto", "npu", "cuda", "cpu")


@functools.cache
def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401

        return bool(torch.npu.is_available())
    except Exception:
        return False


def _available(kind: str) -> bool:
    return {"npu": npu_available, "cuda": torch.cuda.is_available, "cpu": lambda: True}[kind]()


@dataclass(frozen=True)
class Device:
    type: str  # "cpu" | "cuda" | "npu"
    rank: int = 0
    world_size: int = 1
    group: Any = field(default=None, compare=False)  # torch.distributed group; None = world

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


def _placement() -> tuple[int, int, Any]:
    """(rank, world size, group): from torch.distributed once initialized, else from the
    RANK / WORLD_SIZE variables torchrun sets, else one process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), None


def select_device(name: str = "auto") -> Device:
    if name not in DEVICE_TYPES:
        raise RecipeError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_TYPES)}")
    if name == "auto":
        name = next(k for k in ("npu", "cuda", "cpu") if _available(k))
    elif not _available(name):
        raise RecipeError(f"device {name!r} is not available on this machine; use hardware=auto")
    return Device(name, *_placement())


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
